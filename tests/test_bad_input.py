"""Every bad input a new user could try, for every task in TASKS.

Each case goes through the real entry point (runner.cli.main, in-process: the same
code as the console script, without a new interpreter per case) and must give exit
code 2 and one line on stderr naming the bad key, before the task runs (its run()
is replaced by a tripwire) and without touching what is already on disk.
"""
import hashlib

import pytest
import torch

from conftest import compose_config
from runner.tasks import TASKS

# Minimal valid overrides for tasks that need a value to run at all.
NEEDS = {"finetune": "checkpoint", "report": "dir"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A real checkpoint, one of another architecture, and files that are not checkpoints."""
    from runner.engine import train

    root = tmp_path_factory.mktemp("files")
    run = root / "run"
    cfg = compose_config("train", ["dataset=synthetic", "depth=2", "width=8", "epochs=1",
                                   "init=tied", "progress=false", "device=cpu"], run)
    train(cfg)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    other = root / "other_arch"
    other.mkdir()
    ckpt["config"]["width"] = 16          # the config says width 16, the weights are width 8
    torch.save(ckpt, other / "checkpoint.pt")
    text = root / "notes.txt"
    text.write_text("not a checkpoint\n")
    tensor = root / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    state = root / "state_dict.pt"
    torch.save({"weight": torch.zeros(2, 2)}, state)
    afile = root / "afile"
    afile.write_text("")
    return {"run": run, "other": other, "text": text, "tensor": tensor, "state": state,
            "missing": root / "nope" / "checkpoint.pt", "afile": afile, "root": root}


def base_overrides(task, files) -> list[str]:
    need = NEEDS.get(task)
    if need == "checkpoint":
        return [f"checkpoint={files['run']}"]
    if need == "dir":
        return [f"dir={files['run']}"]
    return []


def cases_for(task: str, files) -> list[tuple[list[str], list[str]]]:
    """(overrides, words the one-line message must hold) for the keys this task has."""
    cfg = compose_config(task, base_overrides(task, files), files["root"] / "compose")
    has = lambda key: key in cfg  # noqa: E731
    cases = []
    if has("depth"):
        cases += [([f"depth={bad}"], ["depth"]) for bad in ("0", "-3", "1000000000", "abc", "2.5")]
    for key in ("width", "batch_size", "epochs", "batch", "steps", "dim"):
        if has(key):
            cases += [([f"{key}=0"], [key]), ([f"{key}=abc"], [key])]
    if has("depths"):
        cases += [(["depths=[0]"], ["depth"]), (["depths=[-3]"], ["depth"]),
                  (["depths=[1000000000]"], ["depth"]), (["depths=[abc]"], ["depth"])]
    for key, bad in (("lr", "-1"), ("lr", "abc"), ("seed", "abc"), ("seed", "-1"),
                     ("trials", "0"), ("scale", "abc")):
        if has(key):
            cases += [([f"{key}={bad}"], [key])]
    if has("progress"):
        cases += [(["progress=maybe"], ["progress"])]
    if has("device"):
        cases += [(["device=tpu"], ["device", "choose from"])]
    if "dataset" in cfg and "name" in (cfg.dataset or {}):
        cases += [(["dataset=nope"], ["dataset", "choose from"])]
    if "model" in cfg and "name" in (cfg.model or {}):
        cases += [(["model=nope"], ["model", "choose from"])]
    for key, bad in (("method", "rk9"), ("grad", "magic"), ("init", "random"),
                     ("optimizer", "lbfgs"), ("schedule", "weekly"), ("dtype", "float8")):
        if has(key):
            cases += [([f"{key}={bad}"], [key, "choose from"])]
    for key, bad in (("methods", "rk9"), ("grads", "magic"), ("contenders", "magic"),
                     ("weights", "wobbly"), ("cases", "cubic")):
        if has(key):
            cases += [([f"{key}=[{bad}]"], [bad, "choose from"])]
    if has("hooks"):
        cases += [(["hooks=nope"], ["hooks", "choose from"]),
                  (["+hooks.nope.every=1"], ["hooks.nope", "choose from"])]
    cases += [(["nosuchkey=1"], ["nosuchkey"])]
    ckpt_key = {"train": "resume"}.get(task, "checkpoint" if has("checkpoint") else None)
    if ckpt_key:
        cases += [([f"{ckpt_key}={files['missing']}"], [ckpt_key, "does not exist"
                                                        if task == "train" else ckpt_key]),
                  ([f"{ckpt_key}={files['missing'].parent}"], [ckpt_key]),
                  ([f"{ckpt_key}={files['text']}"], [ckpt_key, "not"]),
                  ([f"{ckpt_key}={files['tensor']}"], [ckpt_key, "not"]),
                  ([f"{ckpt_key}={files['state']}"], [ckpt_key, "not"]),
                  ([f"{ckpt_key}={files['other']}"], [ckpt_key, "architecture"])]
    if task == "train":
        cases += [(["model=resnet", "dataset=synthetic", "dataset.shape=[3,8,8]",
                    f"model.weights={files['missing']}"], ["model.weights"]),
                  (["model=resnet", "dataset=synthetic", "dataset.shape=[3,8,8]",
                    f"model.weights={files['text']}"], ["model.weights"]),
                  (["model=resnet", "dataset=synthetic", "dataset.shape=[3,8,8]",
                    f"model.weights={files['run'] / 'checkpoint.pt'}"], ["model.weights"])]
    if task == "report":
        cases += [([f"dir={files['missing'].parent}"], ["dir"]), ([f"dir={files['text']}"], ["dir"])]
    cases += [(["hydra.run.dir=/proc/forbidden/run"], ["hydra.run.dir", "cannot"]),
              ([f"hydra.run.dir={files['afile']}/run"], ["hydra.run.dir", "cannot"])]
    return cases


def _digest(root):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


class Ran(Exception):
    pass


def check(task, overrides, words, files, tmp_path, monkeypatch, capsys):
    from runner import cli
    from runner.tasks import load_task

    module = load_task(task)

    def tripwire(cfg):
        raise Ran(f"rode {task} {' '.join(overrides)}: validation let it through; the task ran")
    monkeypatch.setattr(module, "run", tripwire)
    monkeypatch.chdir(tmp_path)
    before = _digest(files["root"])
    args = [task, *[o for o in base_overrides(task, files)
                    if o.split("=")[0] != overrides[0].split("=")[0]], *overrides]
    try:
        with pytest.raises(SystemExit) as exit_:
            cli.main(args)
    except Ran as e:
        pytest.fail(str(e))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1, f"rode {' '.join(args)}: exit " \
        f"{exit_.value.code}, stderr:\n{err[-1500:]}"
    for word in words:
        assert word in lines[0], f"rode {' '.join(args)}: {word!r} not in {lines[0]!r}"
    assert _digest(files["root"]) == before, "an existing file changed"
    assert not (tmp_path / "outputs").exists(), f"rode {' '.join(args)} created outputs/"


@pytest.mark.parametrize("task", list(TASKS))
def test_every_bad_input_is_one_line_exit_2(task, files, tmp_path, monkeypatch, capsys):
    failures = []
    for i, (overrides, words) in enumerate(cases_for(task, files)):
        cwd = tmp_path / f"case{i}"
        cwd.mkdir()
        try:
            check(task, overrides, words, files, cwd, monkeypatch, capsys)
        except (AssertionError, pytest.fail.Exception) as e:
            failures.append(str(e).splitlines()[0][:300])
        except Exception as e:   # a traceback is a failure of this test too
            failures.append(f"rode {task} {' '.join(overrides)}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''}")
        finally:
            monkeypatch.undo()
            capsys.readouterr()
    assert not failures, f"{len(failures)} bad inputs of `rode {task}` not handled:\n" + \
        "\n".join(failures)


def test_unknown_task_is_one_line_exit_2(capsys):
    from runner import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["nosuchtask", "depth=4"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1
    assert "unknown task 'nosuchtask'; choose from" in lines[0] and "train" in lines[0]


def test_existing_run_dir_is_not_overwritten(files, tmp_path, capsys):
    from runner import cli

    before = _digest(files["run"])
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", f"hydra.run.dir={files['run']}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "already holds a run" in err[0]
    assert _digest(files["run"]) == before
