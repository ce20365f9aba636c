"""Each check stage runs once per job, and a checkpoint is read once per process."""
import json
from collections import Counter

import pytest

from runner import checkpoint, config, once
from runner.tasks import train as train_task

TINY = ["dataset=synthetic", "dataset.num_samples=64", "dataset.val_fraction=0", "monitor=train_loss",
        "depth=2", "width=4", "epochs=1", "batch_size=32", "progress=false", "device=cpu",
        "threads=1"]


@pytest.fixture
def counts(monkeypatch):
    """How often each stage ran for each job config, and how often a checkpoint file was read."""
    seen = Counter()

    def counted(stage, fn):
        def wrapper(*args, **kwargs):
            task, cfg = (args[0], args[1]) if stage == "schema" else ("train", args[0])
            seen[(stage, once.job_key(task, cfg))] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(config, "check_config", counted("schema", config.check_config))
    monkeypatch.setitem(config.RULES, "train", counted("rules", config.RULES["train"]))
    monkeypatch.setattr(train_task, "validate", counted("environment", train_task.validate))
    read = checkpoint._read

    def counted_read(path, *args):
        seen[("read", str(path))] += 1
        return read(path, *args)

    monkeypatch.setattr(checkpoint, "_read", counted_read)
    return seen


def stages(seen, stage):
    return [n for (s, _), n in seen.items() if s == stage]


def test_a_plain_run_checks_each_stage_once(rode_cli, tmp_path, counts):
    r = rode_cli("train", *TINY, f"hydra.run.dir={tmp_path / 'run'}")
    assert r.code == 0, r.err
    # one job: one config, each stage once (the app ran none the pre-flight passed)
    for stage in once.STAGES:
        assert stages(counts, stage) == [1], (stage, counts)
    assert not stages(counts, "read")


def test_resume_and_resume_auto_read_the_checkpoint_once(rode_cli, tmp_path, counts):
    run = tmp_path / "run"
    assert rode_cli("train", *TINY, f"hydra.run.dir={run}").code == 0
    # A run stopped between its last checkpoint and its summary: resume= finishes it.
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    counts.clear()
    checkpoint._LOADED.clear()   # a new process
    r = rode_cli("train", f"resume={run}", "threads=1")
    assert r.code == 0 and "test accuracy" in r.out, r.err
    assert stages(counts, "read") == [1], counts
    # the command line's config and the checkpoint's: each stage once for each
    for stage in once.STAGES:
        assert stages(counts, stage) == [1, 1], (stage, counts)

    # resume=auto of the now finished run: one read, each stage once per config
    counts.clear()
    checkpoint._LOADED.clear()   # a new process
    r = rode_cli("train", *TINY, "resume=auto", f"hydra.run.dir={run}")
    assert r.code == 0 and "already finished" in r.out, r.err
    assert stages(counts, "read") == [1], counts
    for stage in once.STAGES:
        assert set(stages(counts, stage)) == {1}, (stage, counts)


def test_a_changed_checkpoint_is_read_again(tmp_path):
    state = {"model": {}, "config": {"depth": 1}}
    checkpoint.save(state, tmp_path / "checkpoint.pt")
    assert checkpoint.load(tmp_path)["config"] == {"depth": 1}
    checkpoint.save({**state, "config": {"depth": 22}}, tmp_path / "checkpoint.pt")
    assert checkpoint.load(tmp_path)["config"] == {"depth": 22}
