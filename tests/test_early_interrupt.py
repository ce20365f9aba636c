"""Ctrl-C at any moment of `rode ...` before the run starts (while Python imports rode,
torch and Hydra, while the command line is checked): one line, exit 130, nothing
written; never a traceback from rode's code.

Before Python's own handler is installed, SIGINT ends the process as it ends any
program (killed by the signal: a shell says 130), printing nothing. Before the first
line of rode's code runs (Python's `site` processing the environment's .pth files,
the import system finding the package), a KeyboardInterrupt is Python's, not rode's:
its traceback holds no frame of rode's code."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

RODE = Path(sys.executable).parent / "rode"   # the installed console script


def interrupt_at(delay: float, run_dir: Path) -> subprocess.CompletedProcess:
    # Ctrl-C's default disposition in the child, whatever this process has (a job started
    # in the background of a non-interactive shell inherits SIGINT ignored, and Python then
    # leaves it ignored: nothing would interrupt the run).
    proc = subprocess.Popen([str(RODE), "train", "dataset=synthetic", "depth=2", "device=cpu",
                             "threads=1", "progress=false", f"hydra.run.dir={run_dir}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def check(r: subprocess.CompletedProcess, run_dir: Path) -> str:
    """-> what the interrupt met: 'killed' (before Python's handler), 'python' (Python's
    start-up, before rode's code) or 'rode'; fails on anything else."""
    assert not run_dir.exists(), f"{run_dir} was written"
    if r.returncode == -signal.SIGINT and not r.stderr:
        return "killed"
    if "Traceback" in r.stderr and "/runner/" not in r.stderr \
            and r.stderr.strip().endswith("KeyboardInterrupt"):
        return "python"
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 130 and len(lines) == 1, f"exit {r.returncode}:\n{r.stderr[-3000:]}"
    assert lines[0].startswith("rode") and "interrupted (Ctrl-C)" in lines[0], lines[0]
    assert "nothing was run" in lines[0]
    return "rode"


pytestmark = pytest.mark.skipif(not RODE.is_file(), reason="the rode console script is not installed")


def test_ctrl_c_early_is_one_line_and_exit_130(tmp_path):
    met = [check(interrupt_at(d, tmp_path / f"run{d}"), tmp_path / f"run{d}")
           for d in (0.15, 0.3, 0.6, 1.2)]
    assert "rode" in met   # at least one interrupt reached rode's code (the machine may be slow)


@pytest.mark.slow
def test_ctrl_c_at_any_early_moment(tmp_path):
    met = [check(interrupt_at(d / 40, tmp_path / f"run{d}"), tmp_path / f"run{d}")
           for d in range(0, 60)]
    assert met.count("rode") > len(met) // 2, met
