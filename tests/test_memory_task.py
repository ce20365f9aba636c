"""rode memory: backprop's saved activations grow with depth, the adjoint's do not."""
import csv
import json

import pytest

from conftest import compose_config, validate_job
from runner.errors import ConfigError


def test_memory_table_backprop_grows_adjoint_flat(tmp_path, rode_cli):
    proc = rode_cli("memory", "depths=[16,256]", "grads=[backprop,adjoint]", "dataset=synthetic",
                    "width=16", "batch_size=32", "steps=1", "device=cpu", f"hydra.run.dir={tmp_path}")
    assert proc.code == 0, proc.err
    with open(tmp_path / "memory.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["depth", "grad", "method", "saved_bytes", "peak_bytes",
                                     "seconds_per_step"]
        rows = {(int(r["depth"]), r["grad"]): r for r in reader}
    assert set(rows) == {(d, g) for d in (16, 256) for g in ("backprop", "adjoint")}
    saved = {k: int(r["saved_bytes"]) for k, r in rows.items()}
    peak = {k: int(r["peak_bytes"]) for k, r in rows.items()}
    assert saved[16, "adjoint"] == saved[256, "adjoint"] > 0
    assert saved[256, "backprop"] >= 10 * saved[256, "adjoint"]
    assert saved[256, "backprop"] > 8 * saved[16, "backprop"]
    assert peak[256, "backprop"] > peak[256, "adjoint"]
    assert all(float(r["seconds_per_step"]) > 0 and r["method"] == "euler" for r in rows.values())

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["peak_kind"] in ("cpu_peak_rss_growth", "process_peak_rss")
    assert summary["init"] == "tied" and len(summary["rows"]) == 4
    assert summary["status"] == "completed"
    table = proc.out.splitlines()
    assert "peak" in table[1] and len([row for row in table if row.split()[:1] in (["16"], ["256"])]) == 4


@pytest.mark.parametrize("override, message", [
    ("grads=[backprop,sideways]", "grads"), ("depths=[16,0]", "depths"),
    ("depths=[]", "depths"), ("method=heun depths=[1]", "depths"), ("threads=0", "threads")])
def test_bad_input_is_a_config_error(tmp_path, override, message):
    cfg = compose_config("memory", override.split(), tmp_path)
    with pytest.raises(ConfigError, match=message):
        validate_job("memory", cfg)
