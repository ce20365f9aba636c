"""The `rode` command: outputs, multirun, bad input, failures.

Most tests run it in process (the `rode_cli` fixture: the same entry point as the
console script); a few smoke tests start the installed console script for real."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

FAST = ["depth=4", "epochs=1", "width=16", "progress=false", "device=cpu"]


def rode(*args, cwd):
    """Run the installed console script (falls back to `python -m runner`)."""
    exe = Path(sys.executable).with_name("rode")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "runner"]
    return subprocess.run(cmd + list(args), cwd=cwd, capture_output=True, text=True, timeout=300)


def test_help_lists_tasks_and_config(rode_cli):
    out = rode_cli("--help")
    assert out.code == 0 and "train" in out.out and "usage: rode" in out.out
    out = rode_cli("train", "--help")
    assert out.code == 0
    assert "method: euler" in out.out
    groups = out.out.split("== Config ==")[0]
    assert "digits" in groups and "synthetic" in groups and "mlp" in groups


def test_train_writes_metrics_summary_checkpoint(tmp_path):
    # the installed console script, end to end (synthetic data: no scikit-learn to import)
    run_dir = tmp_path / "run"
    out = rode("train", *FAST, "dataset=synthetic", "dataset.num_samples=400",
               f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "test accuracy" in out.stdout
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 1
    assert {"epoch", "step", "train_loss", "test_loss", "test_acc", "seconds"} <= lines[0].keys()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {"test_acc", "best_test_acc", "seconds", "steps", "peak_memory_bytes"} <= summary.keys()
    assert summary["steps"] == lines[0]["step"] > 0 and summary["peak_memory_bytes"] > 0
    import torch
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert {"model", "optimizer", "epoch", "config"} <= ckpt.keys()
    assert ckpt["config"]["depth"] == 4 and ckpt["epoch"] == 1


def test_single_run_goes_under_outputs_of_cwd(rode_cli, tmp_path):
    out = rode_cli("train", *FAST, "dataset=synthetic")
    assert out.code == 0, out.err
    assert len(list((tmp_path / "outputs").glob("*/*/summary.json"))) == 1


# -m before or after the task word: the same sweep (the second spelling at a smaller size).
@pytest.mark.parametrize("spelling,methods", [(["-m", "train"], ["euler", "heun"]),
                                              (["train", "-m"], ["heun"])])
def test_multirun_writes_one_job_dir_per_combination(rode_cli, tmp_path, spelling, methods):
    out = rode_cli(*spelling, *FAST, "dataset=synthetic", "dataset.num_samples=200", "depth=2,4",
                   f"method={','.join(methods)}")
    assert out.code == 0, out.err
    sweeps = list((tmp_path / "outputs" / "multirun").iterdir())
    assert len(sweeps) == 1
    jobs = [dict(kv.split("=") for kv in p.parent.name.split(","))
            for p in sweeps[0].glob("*/summary.json")]
    assert sorted((j["depth"], j["method"]) for j in jobs) == [
        (d, m) for d in ("2", "4") for m in methods]


BAD = [
    (["nosuchtask"], "unknown task 'nosuchtask'; choose from"),
    (["train", "method=rk9"],
     "method='rk9' is not a valid choice; choose from euler, heun, rev_heun, momentum, coupled"),
    (["train", "grad=magic"], "grad='magic' is not a valid choice; choose from backprop, adjoint"),
    (["train", "init=random"], "init='random' is not a valid choice; choose from"),
    (["train", "depth=0"], "depth=0 is out of range"),
    (["train", "depth=-3"], "depth=-3 is out of range"),
    (["train", "depth=1", "method=heun"], "depth=1 is too small for method=heun"),
    (["train", "batch_size=0"], "batch_size=0 is out of range"),
    (["train", "depth=abc"], "depth='abc' must be an integer"),
    (["train", "depth=2.5"], "depth=2.5 must be an integer"),
    (["train", "lr=-1"], "lr=-1 must be a finite number > 0"),
    (["train", "lr=inf"], "lr=inf must be a finite number > 0"),
    (["train", "weight_decay=nan"], "weight_decay=nan must be a finite number >= 0"),
    (["train", "momentum=nan"], "momentum=nan must be a finite number in [0, 1]"),
    (["train", "epochs=1.0"], "epochs=1.0 must be an integer"),
    (["train", "batch_size=64.0"], "batch_size=64.0 must be an integer"),
    (["train", "seed=99999999999999999999"], "seed=99999999999999999999 is out of range"),
    (["train", "~depth"], "depth is missing: it is required"),
    (["train", "resume="], "resume is empty"),
    (["train", "hydra.run.dir="], "hydra.run.dir is empty"),
    (["train", "hooks.grad_error.every=-1"], "hooks.grad_error.every=-1 is out of range"),
    (["train", "dataset=synthetic", "dataset.num_samples=0"], "dataset.num_samples=0 is out of range"),
    (["train", "dataset=synthetic", "dataset.num_classes=0"], "dataset.num_classes=0 is out of range"),
    (["train", "dataset=synthetic", "dataset.shape=[]"], "dataset.shape=[] is empty"),
    (["train", "dataset.test_fraction=1.5"], "dataset.test_fraction=1.5 must be a finite number in (0, 1)"),
    (["train", "model.activation=sigmoid"], "model.activation='sigmoid' is not a valid choice"),
    (["train", "model.hidden=-3"], "model.hidden=-3 is out of range"),
    (["train", "model.hidden=0"], "model.hidden=0 is out of range"),
    (["train", "adjoint.anchor_every=0"], "adjoint.anchor_every=0 is out of range"),
    (["train", "+foo=1"], "unknown key 'foo'"),
    (["bench", "batch=0"], "batch_size=0 is out of range"),
    (["train", "dataset=nope"], "dataset='nope' is not a valid choice; choose from"),
    (["train", "model=nope"], "model='nope' is not a valid choice; choose from"),
    (["train", "nosuchkey=1"], "unknown key 'nosuchkey'"),
    (["train", "optimizer=lbfgs"], "optimizer='lbfgs' is not a valid choice; choose from sgd, adam"),
    (["train", "depth=4,8"], "is a sweep; add -m"),
    (["-m", "train", "depth=4,0"], "depth=0 is out of range"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2(tmp_path, monkeypatch, capsys, args, message):
    # In-process through the same entry point as the console script (fast: no new
    # interpreter per case); test_bad_input_in_a_real_subprocess covers the process.
    from runner.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(args)
    out = capsys.readouterr()
    assert exit_.value.code == 2, (out.out, out.err)
    lines = out.err.strip().splitlines()
    assert len(lines) == 1, out.err
    assert message in lines[0]
    assert not (tmp_path / "outputs").exists()   # nothing ran, nothing written


def test_refusals_and_help_do_not_load_torch(tmp_path):
    """`rode --help` and a bad value are answered before torch would load (seconds)."""
    code = ("import sys\n"
            "from runner.cli import main\n"
            "for argv in (['--help'], ['train', '--help'], ['--version'], ['train', 'method=rk9'],\n"
            "             ['bench', 'depths=[0]']):\n"
            "    try:\n"
            "        main(argv)\n"
            "    except SystemExit:\n"
            "        pass\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr


def test_old_key_spelling_still_works_with_a_note(tmp_path, monkeypatch, capsys):
    from runner.cli import renamed_keys

    notes = []
    assert renamed_keys("gradcheck", ["batch=32", "depth=4"], notes) == ["batch_size=32", "depth=4"]
    assert renamed_keys("train", ["batch_size=32"], notes) == ["batch_size=32"]
    assert len(notes) == 1 and "batch= is now batch_size=" in notes[0]


def test_bad_input_in_a_real_subprocess(tmp_path):
    out = rode("train", "method=rk9", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip() == ("rode train: error: method='rk9' is not a valid choice; "
                                  "choose from euler, heun, rev_heun, momentum, coupled")
    assert "Traceback" not in out.stdout


def test_no_task_writes_into_a_dir_holding_another_run(rode_cli, tmp_path):
    """A finished sweep is never rewritten by the same command, and `train` does not
    move into another task's run dir."""
    sweep = tmp_path / "sweep"
    args = ["-m", "train", "dataset=synthetic", "dataset.num_samples=200", "depth=2", "width=8",
            "epochs=1", "progress=false", "device=cpu", f"hydra.sweep.dir={sweep}"]
    assert rode_cli(*args).code == 0
    before = {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file()}
    again = rode_cli(*args)
    assert again.code == 2 and "already holds the jobs of an earlier sweep" in again.err
    assert len(again.err.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file()} == before

    grad_dir = tmp_path / "gradcheck"
    assert rode_cli("gradcheck", "dataset=synthetic", "depth=2", "width=8", "device=cpu",
                    f"hydra.run.dir={grad_dir}").code == 0
    summary = (grad_dir / "summary.json").read_bytes()
    moved = rode_cli("train", "dataset=synthetic", "depth=2", f"hydra.run.dir={grad_dir}")
    assert moved.code == 2 and "already holds a run" in moved.err
    assert (grad_dir / "summary.json").read_bytes() == summary


def test_divergence_stops_with_one_line_after_writing(rode_cli, tmp_path):
    """No traceback and no Hydra "Error executing job" line: ours only, and the summary."""
    run = tmp_path / "run"
    out = rode_cli("train", "dataset=synthetic", "depth=2", "width=8", "epochs=2", "optimizer=sgd",
                   "lr=1e8", "progress=false", "device=cpu", f"hydra.run.dir={run}")
    assert out.code == 1
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rode train: error: loss became"), out.err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "loss became" in summary["error"]


def test_a_launcher_without_its_plugin_names_the_extra():
    from hydra.errors import MissingConfigException

    from runner.cli import _hydra_message

    e = MissingConfigException("In 'hydra/launcher/local': Could not load "
                               "'hydra/launcher/submitit_local'.", missing_cfg_file="x")
    assert _hydra_message(e, ["hydra/launcher=local"]) == (
        "hydra/launcher=local needs the launcher plugins: pip install 'rode[cluster]'")


def test_experiments_are_a_group_named_by_task_and_old_names_still_work(rode_cli, tmp_path):
    from runner.cli import renamed_keys

    notes = []
    assert renamed_keys("gradcheck", ["+experiment=grad_error"], notes) == ["experiment=gradcheck"]
    assert renamed_keys("train", ["experiment=test_error_full"], notes) == ["experiment=train_full"]
    assert renamed_keys("bench", ["experiment=bench"], notes) == ["experiment=bench"]
    assert len(notes) == 2 and "+experiment= is now experiment=" in notes[0]
    # the old form, end to end: the note, then the experiment's config
    r = rode_cli("linear", "+experiment=linear", "--cfg", "job")
    assert r.code == 0 and "+experiment= is now experiment=" in r.err, r.err
    assert "depths:" in r.out
