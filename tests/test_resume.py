"""Checkpoints, preemption (SIGTERM/SIGINT), resume, and divergence."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import RESUMABLE_RUN as FAST
from conftest import compose_config, epoch_records, validate_job
from runner import checkpoint
from runner.engine import train
from runner.errors import ConfigError, Interrupted, RunFailed
from runner.hooks import Hook
from runner.tasks.train import resume_config


class SignalAt(Hook):
    """Sends this process a signal at the end of a given step, as a cluster would."""

    name = "signal_at"

    def __init__(self, step, signum=signal.SIGTERM):
        super().__init__()
        self.at, self.signum = step, signum

    def on_step_end(self, run):
        if run.step == self.at:
            os.kill(os.getpid(), self.signum)


class PoisonAt(Hook):
    """Makes the weights NaN at a given step: the next loss is NaN."""

    name = "poison_at"

    def __init__(self, step):
        super().__init__()
        self.at = step

    def on_step_end(self, run):
        if run.step == self.at:
            with torch.no_grad():
                for p in run.model.parameters():
                    p.fill_(float("nan"))


def resume(run_dir):
    cfg = compose_config("train", [*FAST, f"resume={run_dir}"], run_dir)
    ckpt = checkpoint.load(run_dir, "resume")
    return train(resume_config(cfg, ckpt), resume=ckpt)


@pytest.mark.parametrize("signum,stop_step", [(signal.SIGTERM, 37), (signal.SIGINT, 25)],
                         ids=["SIGTERM mid-epoch", "SIGINT at an epoch's last step"])
def test_interrupted_then_resumed_run_ends_like_an_uninterrupted_one(tmp_path, signum, stop_step):
    whole = tmp_path / "whole"
    train(compose_config("train", FAST, whole))

    cut = tmp_path / "cut"
    with pytest.raises(Interrupted) as stopped:
        train(compose_config("train", FAST, cut), hooks=[SignalAt(stop_step, signum)])
    assert stopped.value.exit_code == 128 + signum
    assert f"resume={cut}" in str(stopped.value)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # handlers restored
    ckpt = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == stop_step                  # the step in progress was kept
    assert not (cut / "summary.json").exists()        # not over: the report says unfinished
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["event"] == "interrupted"

    summary = resume(cut)
    assert epoch_records(cut) == epoch_records(whole)   # appended, once per epoch, same values
    assert summary["steps"] == 75 and summary["status"] == "completed"
    a = torch.load(whole / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(cut / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_divergence_keeps_the_last_good_checkpoint(tmp_path):
    # NaN weights after step 30 (epoch 2): the loss of step 31 is NaN.
    with pytest.raises(RunFailed, match="loss became nan at epoch 2, step 31"):
        train(compose_config("train", FAST, tmp_path), hooks=[PoisonAt(30)])
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["step"] == 25      # the end of epoch 1, untouched
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "loss became nan" in summary["error"]
    assert len(epoch_records(tmp_path)) == 1
    # ... and that checkpoint resumes.
    assert resume(tmp_path)["status"] == "completed"


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save({"model": {"w": torch.ones(3)}, "config": {}}, path)
    before = path.read_bytes()

    def torn_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save({"model": {"w": torch.zeros(3)}, "config": {}}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]   # no temporary left


def test_resuming_a_finished_run_is_refused(tmp_path):

    train(compose_config("train", [*FAST, "epochs=1"], tmp_path))
    with pytest.raises(ConfigError, match="already finished its 1 epochs"):
        validate_job("train", compose_config("train", [*FAST, f"resume={tmp_path}"], tmp_path))


@pytest.mark.slow
def test_sigterm_to_the_cli_checkpoints_and_resume_continues(tmp_path):
    """The real command: SIGTERM during epoch 2, exit 143, then `rode train resume=<dir>`."""
    run_dir = tmp_path / "depth=4,method=euler"       # a sweep job's dir name: '=' and ','
    args = [*FAST, "epochs=8", f"hydra.run.dir='{run_dir}'"]
    cmd = [sys.executable, "-m", "runner", "train"]
    proc = subprocess.Popen(cmd + args, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("rode train: error: stopped by SIGTERM at epoch")
    assert "Traceback" not in err
    done = torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"]
    assert done >= 25

    out = subprocess.run(cmd + [f"resume={run_dir}", "epochs=9"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "only device, progress, threads, save can be set" in out.stderr
    out = subprocess.run(cmd + [f"resume={run_dir}", "progress=false"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    records = epoch_records(run_dir)
    assert [r["epoch"] for r in records] == list(range(1, 9))
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 8 * 25
    overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert "resume" not in overrides and "epochs=8" in overrides   # the run's own config kept


@pytest.mark.slow
def test_sigterm_stops_a_whole_sweep(tmp_path):
    """A preempted sweep stops: the job in progress checkpoints, no further job starts."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner", "-m", "train", "depth=4,8,16", "epochs=500",
         "progress=false", "device=cpu"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sweep = tmp_path / "outputs" / "multirun"
    deadline = time.time() + 120
    while not list(sweep.glob("*/*/checkpoint.pt")) and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in err and "resume=" in err
    jobs = [p for p in next(sweep.iterdir()).iterdir() if p.is_dir()]
    assert len(jobs) == 1 and (jobs[0] / "checkpoint.pt").exists()
