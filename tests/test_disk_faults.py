"""A write that fails (a full disk, a quota, a read-only or lost mount) names the file
it was writing: one line, exit 1, a failed summary where one can be written.

The kernel reports ENOSPC on write(), flush() or fsync(), with no file name; the
fault is simulated there, under the real command (runner.cli.main, in process)."""
import errno
import io as pyio
import json
import os
from pathlib import Path

import pytest

TINY = ["dataset=synthetic", "dataset.num_samples=200", "depth=2", "width=8", "device=cpu",
        "threads=1"]


class _FullFile(pyio.StringIO):
    """A file on a full disk: opening works, writing fails as the kernel says it."""

    def __init__(self, err):
        super().__init__()
        self.err = err

    def write(self, text):
        raise OSError(self.err, os.strerror(self.err))


@pytest.fixture
def full_disk(monkeypatch):
    """``full_disk(name, err)``: every write of the file ``name`` (or of its temporary
    file beside it) fails with ``err``; other files are written as usual."""
    from runner import io

    def install(name, err=errno.ENOSPC):
        real = open

        def fake_open(path, mode="r", *args, **kwargs):
            base = Path(str(path)).name
            if ("w" in mode or "a" in mode) and (base == name or base.startswith(f".{name}.")):
                real(path, mode, *args, **kwargs).close()   # the file exists, empty
                return _FullFile(err)
            return real(path, mode, *args, **kwargs)
        monkeypatch.setattr(io, "open", fake_open, raising=False)
    return install


def one_line_naming(r, task, cause, name):
    assert r.code == 1, r.err[-2000:]
    assert "Traceback" not in r.err
    line = r.err.strip().splitlines()[-1]
    assert line.startswith(f"rode {task}: error: {cause}"), line
    assert name in line, line


@pytest.mark.parametrize("err", [errno.ENOSPC,
                                 pytest.param(errno.EDQUOT, marks=pytest.mark.slow),
                                 pytest.param(errno.EROFS, marks=pytest.mark.slow)])
def test_a_failed_result_write_names_its_file(rode_cli, tmp_path, full_disk, err):
    full_disk("grad_error.csv", err)
    run = tmp_path / "run"
    r = rode_cli("gradcheck", *TINY, f"hydra.run.dir={run}")
    one_line_naming(r, "gradcheck", os.strerror(err).lower(), "grad_error.csv")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "grad_error.csv" in summary["error"]
    assert not list(run.glob(".*.tmp"))


def test_a_full_disk_while_logging_a_measurement_names_metrics_jsonl(rode_cli, tmp_path,
                                                                      full_disk):
    """metrics.jsonl lines of the measurement hooks, appended while training."""
    full_disk("metrics.jsonl")
    run = tmp_path / "run"
    r = rode_cli("train", *TINY, "dataset.val_fraction=0", "monitor=train_loss", "epochs=1",
                 "hooks.smoothness.every=1", f"hydra.run.dir={run}")
    one_line_naming(r, "train", "no space left on device", "metrics.jsonl")
    assert json.loads((run / "summary.json").read_text())["status"] == "failed"


def test_a_full_disk_under_a_tracker_names_the_trackers_dir(rode_cli, tmp_path, monkeypatch):
    """A tracker's own files (TensorBoard's event file here) are written by its library,
    which reports a full disk without a file name: the error names the tracker's dir."""
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(SummaryWriter, "add_scalar", full)
    run = tmp_path / "run"
    r = rode_cli("train", *TINY, "epochs=1", "logger=tensorboard", f"hydra.run.dir={run}")
    one_line_naming(r, "train", "no space left on device while writing tensorboard", str(run))
    assert json.loads((run / "summary.json").read_text())["status"] == "failed"
