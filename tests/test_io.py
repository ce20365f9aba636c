"""runner.io: atomic result files, and the values every task's output shares."""
import json
import math
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from runner import io


def test_io_does_not_import_torch():
    code = "import sys, runner.io; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_writes_replace_the_file_whole_and_leave_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    io.write_json({"status": "completed", "x": [1, 2]}, path)
    assert path.read_text() == json.dumps({"status": "completed", "x": [1, 2]}, indent=2) + "\n"
    with pytest.raises(RuntimeError):
        with io.atomic_open(path) as f:
            f.write("half a fi")
            raise RuntimeError("killed")
    assert io.read_json(path)["status"] == "completed"   # the previous file stays
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_csv_columns_and_float_format(tmp_path):
    rows = [{"depth": 4, "error": 1 / 3, "extra": "x"}, {"depth": 8, "error": 0.25}]
    io.write_csv(rows, tmp_path / "a.csv", ["depth", "error"], float_format=".6g")
    assert (tmp_path / "a.csv").read_text().splitlines() == ["depth,error", "4,0.333333", "8,0.25"]
    io.write_csv(rows, tmp_path / "b.csv")
    assert io.read_csv(tmp_path / "b.csv")[1] == {"depth": "8", "error": "0.25", "extra": ""}


def test_jsonl(tmp_path):
    path = tmp_path / "metrics.jsonl"
    io.append_jsonl({"step": 1}, path)
    io.append_jsonl({"step": 2}, path)
    assert io.read_jsonl(path) == [{"step": 1}, {"step": 2}]


def test_fit_slope():
    assert io.fit_slope([4, 8, 16], [0.3 / 4, 0.3 / 8, 0.3 / 16]) == pytest.approx(-1)
    assert io.fit_slope([4, 8, 16, 32], [1.0, 0.25, 0.0, math.nan]) == pytest.approx(-2)
    assert math.isnan(io.fit_slope([4, 4], [1.0, 2.0]))
    assert math.isnan(io.fit_slope([4], [1.0]))


def test_format_size():
    assert [io.format_size(v) for v in (512, 262144, "8192", 3 * 2**30, "nan", None)] == [
        "512 B", "256.0 KiB", "8.0 KiB", "3.0 GiB", "–", "–"]


def test_plain():
    cfg = OmegaConf.create({"a": 1, "b": "${a}", "c": {"d": [1, 2]}, "out_dir": "${oops:x}"})
    assert io.plain(cfg, exclude=["out_dir"]) == {"a": 1, "b": 1, "c": {"d": [1, 2]}}
    assert io.plain(cfg.c) == {"d": [1, 2]} and io.plain(3) == 3
