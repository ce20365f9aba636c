"""scripts/gpu_check.sh: the smoke variant runs every check at toy size on CPU, so that
the GPU script cannot rot; a failing check is recorded and never stops the others."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
CHECKS = ["bench_w256", "bench_w1024", "deep", "transformer", "gradcheck", "conv_amp", "ddp_train",
          "ddp_backend"]


def run_script(out, **env):
    environ = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(["bash", str(SCRIPT), "smoke", str(out)], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=600)


# The default suite's share: one check through the whole script (the low-precision
# gradient check, which no other test runs); the slow test runs them all (the transformer
# step and the two-process DDP step among them).
QUICK = ["gradcheck"]


def _smoke(tmp_path, checks):
    done = run_script(tmp_path / "out", CHECKS=" ".join(checks))
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + summary
    result = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert list(result["checks"]) == checks
    assert all(c["pass"] for c in result["checks"].values())
    assert result["versions"]["torch"]
    for name in checks:
        assert f"| {name} | PASS |" in summary and f"## {name}:" in summary
    assert "| gradcheck | PASS |" in summary and "bfloat16" in summary
    if "ddp_backend" in checks:
        assert "gloo, world size 2" in summary


def test_smoke_runs_the_checks_no_other_test_runs(tmp_path):
    _smoke(tmp_path, QUICK)


@pytest.mark.slow
def test_smoke_runs_every_check_and_writes_the_summary(tmp_path):
    _smoke(tmp_path, CHECKS)


def test_a_failing_check_fails_the_script_but_not_the_others(tmp_path):
    done = run_script(tmp_path / "out", RODE="false", CHECKS="bench_w256 gradcheck")
    assert done.returncode == 1
    result = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert list(result["checks"]) == ["bench_w256", "gradcheck"]
    assert not any(c["pass"] for c in result["checks"].values())
    assert all("exit 1" in c["problems"][0] for c in result["checks"].values())
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| bench_w256 | FAIL |" in summary and "| gradcheck | FAIL |" in summary
