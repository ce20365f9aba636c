"""Faults and stops: every stop resumable, every fault one line with a failed summary,
resume=auto, checkpoints within epochs, corrupted checkpoints, stale temporaries."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import RESUMABLE_RUN as FAST
from conftest import compose_config, epoch_records
from runner import checkpoint, engine
from runner.engine import train
from runner.errors import ConfigError, Interrupted, RunFailed
from runner.hooks import Hook
from runner.tasks.train import resume_config


def weights(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


def same_weights(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def resume(run_dir, *extra):
    cfg = compose_config("train", [*FAST, *extra, f"resume={run_dir}"], run_dir)
    ckpt = checkpoint.load(run_dir, "resume")
    return train(resume_config(cfg, ckpt), resume=ckpt)


class Killed(BaseException):
    """Stands for SIGKILL: the process ends at once, nothing runs after."""


class KillAt(Hook):
    name = "kill_at"

    def __init__(self, step):
        super().__init__()
        self.at = step

    def on_step_end(self, run):
        run.log(self.name, {"probe": run.step})     # a line per step, to see duplicates
        if run.step == self.at:
            raise Killed


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """An uninterrupted run to compare with."""
    out = tmp_path_factory.mktemp("whole")
    summary = train(compose_config("train", FAST, out))
    return out, summary


# ----------------------------------------------------------- item 2: stops
def test_signal_during_the_last_evaluation_still_finishes(tmp_path, monkeypatch, whole):
    evaluate, calls = engine.evaluate, []

    def evaluate_then_sigterm(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:                               # the last epoch's evaluation
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(*args, **kwargs)
    monkeypatch.setattr(engine, "evaluate", evaluate_then_sigterm)
    summary = train(compose_config("train", FAST, tmp_path))
    assert summary["status"] == "completed" and summary["steps"] == 75
    assert summary["test_acc"] == whole[1]["test_acc"]


def test_killed_between_last_checkpoint_and_summary_is_resumable(tmp_path, whole):
    train(compose_config("train", FAST, tmp_path))
    done = json.loads((tmp_path / "summary.json").read_text())
    (tmp_path / "summary.json").unlink()                 # as if killed before writing them
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    summary = resume(tmp_path)
    assert summary["status"] == "completed" and summary["test_acc"] == done["test_acc"]
    assert epoch_records(tmp_path) == epoch_records(whole[0])


# ------------------------------------------- items 6, 9: kills, within-epoch checkpoints
def test_kill_mid_epoch_costs_only_the_steps_since_the_last_checkpoint(tmp_path, whole):
    cfg = compose_config("train", [*FAST, "save.every_steps=10"], tmp_path)
    with pytest.raises(Killed):
        train(cfg, hooks=[KillAt(37)])
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 30
    (tmp_path / f".checkpoint.pt.{2 ** 22 + 17}.tmp").write_bytes(b"torn")  # a killed save's
    ckpt = checkpoint.load(tmp_path, "resume")
    again = compose_config("train", [*FAST, f"resume={tmp_path}"], tmp_path)
    train(resume_config(again, ckpt), hooks=[KillAt(-1)], resume=ckpt)
    assert not list(tmp_path.glob(".*.tmp"))
    assert epoch_records(tmp_path) == epoch_records(whole[0])
    probes = [json.loads(x)["probe"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if '"probe"' in x]
    assert probes == list(range(1, 76))                  # steps 31..37 once, not twice
    assert same_weights(weights(tmp_path), weights(whole[0]))


def test_checkpoint_every_minutes(tmp_path, monkeypatch):
    saves = []
    save = checkpoint.save
    def counting(state, path):   # checkpoint.pt only (best.pt is saved the same way)
        if path.name == checkpoint.FILENAME:
            saves.append(state["step"])
        save(state, path)

    monkeypatch.setattr(checkpoint, "save", counting)
    train(compose_config("train", [*FAST, "epochs=1", "save.every_minutes=1e-9"], tmp_path))
    assert saves == [*range(1, 26), 25]                  # every step, then the epoch's end


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGUSR2])
def test_sigusr_stops_like_sigterm(tmp_path, signum):
    class SignalAt(Hook):
        name = "signal_at"

        def on_step_end(self, run):
            if run.step == 30:
                os.kill(os.getpid(), signum)
    with pytest.raises(Interrupted) as stopped:
        train(compose_config("train", FAST, tmp_path), hooks=[SignalAt()])
    assert stopped.value.exit_code == 128 + signum
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 30
    assert signal.getsignal(signum) is signal.SIG_DFL


# ---------------------------------------------------------- item 6: checksum
def test_corrupted_checkpoint_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    marker = torch.full((256,), 1.2345)
    checkpoint.save({"model": {"w": marker}, "config": {}}, path)
    assert torch.equal(checkpoint.load(path)["model"]["w"], marker)
    data = bytearray(path.read_bytes())
    at = bytes(data).index(marker[:4].numpy().tobytes())
    data[at + 5] ^= 0x40                                # one bit of one weight
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"checkpoint\.pt is corrupted"):
        checkpoint.load(path)


# ------------------------------------------------------------ item 4: faults
@pytest.mark.parametrize("err,cause", [(errno.ENOSPC, "no space left on device"),
                                       (errno.EACCES, "permission denied")])
def test_write_fault_during_checkpoint_is_one_line_and_a_failed_summary(
        rode_cli, tmp_path, monkeypatch, err, cause):
    run_dir = tmp_path / "run"
    real, calls = torch.save, []

    def failing_save(obj, f, *a, **k):
        calls.append(".checkpoint.pt." in str(getattr(f, "name", "")))
        if sum(calls) == 2 and calls[-1]:                # epoch 2's checkpoint
            f.write(b"part of a checkpoint")
            raise OSError(err, os.strerror(err))
        return real(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", failing_save)
    r = rode_cli("train", *FAST, f"hydra.run.dir={run_dir}")
    assert r.code == 1, r.err
    line = r.err.strip().splitlines()[-1]
    assert line.startswith(f"rode train: error: {cause} while writing checkpoint.pt"), r.err
    assert "Traceback" not in r.err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and cause in summary["error"]
    assert checkpoint.load(run_dir)["epoch"] == 1        # the last good one, intact
    assert len(epoch_records(run_dir)) == 1
    assert not list(run_dir.glob(".*.tmp"))


def test_write_fault_in_another_task_is_one_line(rode_cli, tmp_path, monkeypatch):
    from runner import io
    from runner.tasks import linear  # imported first: it must not keep the failing writer

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / ".x.csv.1.tmp"))
    monkeypatch.setattr(io, "write_csv", full)
    monkeypatch.setattr(linear, "write_csv", full)
    r = rode_cli("linear", "depths=[2]", "steps=2", "log_every=1", "snapshots=[0]",
                 "progress=false", f"hydra.run.dir={tmp_path / 'run'}")
    assert r.code == 1, r.err
    assert r.err.strip().splitlines()[-1].startswith(
        "rode linear: error: no space left on device: x.csv"), r.err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "failed"


# ------------------------------------------------------------ item 7: resume=auto
def test_resume_auto(rode_cli, tmp_path, whole):
    run_dir = tmp_path / "run"
    args = [*FAST, "resume=auto", f"hydra.run.dir={run_dir}"]
    cfg = compose_config("train", [*FAST, "resume=auto"], run_dir)
    with pytest.raises(Killed):                           # preempted in epoch 2
        train(cfg, hooks=[KillAt(37)])
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"] == 25

    config_yaml = tmp_path / "config.yaml"
    r = rode_cli("train", *[a.replace("depth=4", "depth=8") for a in args])
    assert r.code == 2, r.err
    assert "another config" in r.err and "depth: 8 here, 4 in the checkpoint" in r.err
    assert not (run_dir / ".hydra").exists() and not config_yaml.exists()   # nothing written

    r = rode_cli("train", *args)                          # the same command line again
    assert r.code == 0, r.err
    assert epoch_records(run_dir) == epoch_records(whole[0])
    assert same_weights(weights(run_dir), weights(whole[0]))

    r = rode_cli("train", *args)                          # ... and once more: nothing to do
    assert r.code == 0 and "already finished" in r.out

    fresh = tmp_path / "fresh"                            # no checkpoint: a new run
    r = rode_cli("train", *FAST, "epochs=1", "resume=auto", f"hydra.run.dir={fresh}")
    assert r.code == 0 and (fresh / "summary.json").exists(), r.err


def test_resume_refuses_other_keys_but_allows_checkpoint_every(tmp_path):
    from runner.rundir import prepare_resume
    assert prepare_resume(["resume=auto", "depth=8"], False) == ["resume=auto", "depth=8"]
    train(compose_config("train", [*FAST, "epochs=1"], tmp_path))
    out = prepare_resume([f"resume={tmp_path}", "save.every_steps=5"], False)
    assert f"hydra.run.dir='{tmp_path}'" in out
    with pytest.raises(ConfigError, match="only device, progress, threads, save"):
        prepare_resume([f"resume={tmp_path}", "epochs=9"], False)


# ------------------------------------------------- item 8: submitit requeue (real signals)
@pytest.mark.slow
def test_submitit_preemption_requeues_and_resumes(tmp_path):
    """hydra/launcher=local (submitit's local executor): SIGUSR2 to the job, as SLURM sends
    before the time limit; it checkpoints, submitit requeues it, resume=auto continues."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        # depth 64: epochs long enough that the signal lands mid-run
        [sys.executable, "-m", "runner", "-m", "train", *FAST, "epochs=6", "depth=64", "resume=auto",
         "hydra/launcher=local", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    ckpts = []
    while time.time() < deadline and not ckpts:
        ckpts = list(sweep.glob("*/checkpoint.pt"))
        time.sleep(0.2)
    assert ckpts, proc.stderr.read() if proc.poll() is not None else "no checkpoint"
    job_dir = ckpts[0].parent
    pids = [int(p.name) for p in os.scandir("/proc") if p.name.isdigit()
            and _cmdline(p.name).count("submitit.core._submit")]
    assert pids, "no submitit job process"
    for pid in pids:
        os.kill(pid, signal.SIGUSR2)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    summary = json.loads((job_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 6 * 25
    events = [json.loads(x).get("event") for x in (job_dir / "metrics.jsonl").read_text().splitlines()]
    assert "interrupted" in events and "resumed" in events
    assert [r["epoch"] for r in epoch_records(job_dir)] == list(range(1, 7))


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_divergence_in_auto_run_is_a_failed_summary(tmp_path):
    """A fault is exit 1 with a failed summary (the lines above); it is no ConfigError."""
    assert issubclass(checkpoint.WriteFailed, RunFailed)
