"""What the console tells a newcomer: the epoch line, --help, --version, unknown keys,
and a report of a dir without jobs. In process through the `rode` entry point."""
import re

import pytest

from runner import schema

TINY = ["epochs=1", "depth=2", "width=8", "dataset=synthetic", "dataset.num_samples=200",
        "threads=1", "progress=false", "device=cpu"]


def _one_error(r, code=2) -> str:
    assert r.code == code, (r.out, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1, r.err
    return lines[0]


# ------------------------------------------------------------------ the epoch line
def test_the_epoch_line_shows_the_monitored_metric(rode_cli, tmp_path):
    import json

    monitor = "val_loss"

    run = tmp_path / "run"
    r = rode_cli("train", *TINY, f"monitor={monitor}", f"hydra.run.dir={run}")
    assert r.code == 0, r.err
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    line = next(x for x in (run / "train.log").read_text().splitlines() if "epoch 1/1" in x)
    # the monitored metric, its value in the record, marked as the monitor
    assert re.search(rf"{monitor} {record[monitor]:.4f} \(monitor; best {record[monitor]:.4f} "
                     rf"at epoch 1\)", line), line
    assert f"test_acc {record['test_acc']:.4f}" in line


def test_the_epoch_line_marks_train_loss_or_a_missing_metric():
    from runner.engine import epoch_line
    from runner.selection import Selection

    record = {"epoch": 2, "train_loss": 0.5, "test_loss": 0.4, "test_acc": 0.9}
    sel = Selection(monitor="val_acc")
    sel.update(record)
    assert "val_acc n/a (monitor)" in epoch_line(record, 3, sel)
    sel = Selection(monitor="train_loss", best_value=0.25, best_epoch=1)
    sel.update(record)
    line = epoch_line(record, 3, sel)
    assert line.startswith("epoch 2/3  train_loss 0.5000 (monitor; best 0.2500 at epoch 1)")


# ------------------------------------------------------------------------- --help
def _help_rows(text: str) -> dict[str, tuple[str, str]]:
    """key -> (value now, what it accepts), from the == Config == part of --help."""
    rows, last = {}, None
    for line in text.split("== Config ==", 1)[1].splitlines():
        m = re.match(r"^([\w.]+): (\S+)(?:\s{2,}(.*))?$", line)
        if m:
            last = m.group(1)
            rows[last] = (m.group(2), m.group(3) or "")
        elif last and line.startswith(" ") and line.strip():
            rows[last] = (rows[last][0], line.strip())
    return rows


def test_task_help_shows_each_keys_allowed_values_from_the_schema(rode_cli):
    r = rode_cli("train", "--help")
    assert r.code == 0, r.err
    rows = _help_rows(r.out)
    assert rows["method"] == ("euler", "one of " + ", ".join(schema.METHODS))
    assert rows["depth"] == ("16", f"an integer in [1, {schema.MAX_DEPTH}]")
    assert rows["monitor"][1] == "one of " + ", ".join(schema.MONITORS)
    assert rows["model.hidden"][1] == f"an integer in [1, {schema.MAX_WIDTH}] or null"
    assert rows["adjoint.anchor_every"][1].startswith("an integer >= 1 or null")
    assert rows["dataset"][1] == "a config group: one of " + ", ".join(schema.DATASET.options)
    # every key of the schema is there: the list is read from it, not written by hand
    from runner.keyhelp import walk

    cfg_keys = {k for k, _, _ in walk(schema.TASK_SCHEMAS["train"], {})}
    top = set(schema.TASK_SCHEMAS["train"].fields) - {"dataset", "model", "hooks", "adjoint",
                                                      "save", "early_stopping", "logger"}
    assert top <= set(rows) and top <= cfg_keys
    assert {"hooks.grad_error.every", "save.every_steps", "early_stopping.patience"} <= set(rows)


def test_task_help_follows_the_overrides(rode_cli):
    r = rode_cli("-m", "train", "dataset=synthetic", "depth=32,64", "--help")
    assert r.code == 0, r.err
    rows = _help_rows(r.out)
    assert rows["depth"][0] == "32"   # a sweep: shown at its first value
    assert rows["dataset"][0] == "synthetic"
    assert rows["dataset.num_samples"][1] == "an integer in [2, 10000000]"
    assert "dataset.split_seed" not in rows   # a key of digits, not of synthetic
    assert "dataset.name" not in rows         # shown as the group itself


def test_every_task_has_a_help(rode_cli):
    from runner.keyhelp import render
    from runner.tasks import TASKS

    for task in TASKS:   # every key of every schema has words for what it accepts
        text = render(task, None, {})
        assert all(_help_rows(text).values()), task
    r = rode_cli("report", "--help")   # the task with a positional key, for real
    assert r.code == 0 and _help_rows(r.out)["dir"] == ("???", "a non-empty string (rode report <dir>)")


# ----------------------------------------------------------------------- --version
def test_version_names_rode_torch_and_hydra(rode_cli):
    import hydra
    import torch

    import runner

    r = rode_cli("--version")
    assert r.code == 0 and r.err == ""
    rode, torch_line, hydra_line = r.out.splitlines()
    assert rode == f"rode {runner.__version__}" and hydra_line == f"hydra-core {hydra.__version__}"
    # the installed distribution's version (torch.__version__ may add a build tag: +cu130)
    assert torch_line.startswith(f"torch {torch.__version__.split('+')[0]}")
    assert rode_cli("train", "--version").out == r.out   # not Hydra's own answer


# -------------------------------------------------------------------- unknown keys
@pytest.mark.parametrize("word,nearest", [("dept=4", "depth"), ("+dept=4", "depth"),
                                          ("batch_sise=8", "batch_size"),
                                          ("dataset.test_fractio=0.3", "dataset.test_fraction"),
                                          ("val_fraction=0", "dataset.val_fraction")])
def test_an_unknown_key_suggests_the_nearest_valid_one(rode_cli, tmp_path, word, nearest):
    line = _one_error(rode_cli("train", word))
    key = word.split("=")[0].lstrip("+")
    assert f"unknown key {key!r}" in line and f"did you mean {nearest}?" in line, line
    assert "+" + key not in line          # train takes no new keys: no +key= advice
    assert not any(tmp_path.iterdir())


def test_an_unknown_key_far_from_any_says_where_the_keys_are(rode_cli):
    line = _one_error(rode_cli("train", "xyzzy=1"))
    assert "unknown key 'xyzzy'" in line and "rode train --help" in line
    assert "did you mean" not in line and "+xyzzy" not in line


def test_plus_key_is_suggested_only_where_the_task_takes_new_keys(monkeypatch):
    from dataclasses import replace

    from runner import keyhelp

    assert not keyhelp.accepts_new("train", "dept")
    assert "+dept" not in keyhelp.unknown_key("train", "dept")
    monkeypatch.setitem(schema.TASK_SCHEMAS, "report",
                        replace(schema.TASK_SCHEMAS["report"], open=True))
    assert keyhelp.accepts_new("report", "title")
    assert "use +title=... to add it" in keyhelp.unknown_key("report", "title")


# ------------------------------------------------------------ report of no jobs
def test_report_of_a_dir_without_jobs_writes_nothing(rode_cli, tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("not a job\n")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    line = _one_error(rode_cli("report", empty))
    assert "holds no job directories" in line and "nothing written" in line
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
