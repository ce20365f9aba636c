"""Every bad input a new user could try, for every task in TASKS.

Each case goes through the real entry point (runner.cli.main, in-process: the same
code as the console script, without a new interpreter per case) and must give exit
code 2 and one line on stderr naming the bad key, before the task runs (its run()
is replaced by a tripwire) and without touching what is already on disk.
"""
import hashlib
from pathlib import Path

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


def bad_values(spec) -> list[str]:
    """Command-line values that ``spec`` must refuse, derived from its type and range."""
    from runner import schema as S

    if isinstance(spec, S.Int):
        bad = ["abc", "2.5", "1.0", "true"]
        bad += [str(spec.low - 1)] if spec.low is not None else []
        bad += [str(spec.high + 1)] if spec.high is not None else ["99999999999999999999999"]
        return bad + ([] if spec.null else ["null"])
    if isinstance(spec, S.Float):
        bad = ["abc", "inf", "nan", "true"]
        if spec.low is not None:
            bad.append(str(spec.low if spec.open_low else spec.low - 1))
        if spec.high is not None:
            bad.append(str(spec.high if spec.open_high else spec.high + 1))
        return bad
    if isinstance(spec, S.Bool):
        return ["maybe", "2"]
    if isinstance(spec, S.Choice):
        return ["nope", "true"]
    if isinstance(spec, S.ListOf):
        empty = [] if spec.empty else ["[]"]
        return empty + [f"[{v}]" for v in bad_values(spec.item)[:2] if v not in ("null", "true")]
    if isinstance(spec, S.IntOrList):
        return ["abc", "[]", "[0]", "2.5"]
    if isinstance(spec, S.Text):
        return ["''"] + ([] if spec.null else ["null"])
    return []


def schema_cases(task: str, sample: bool = False) -> list[tuple[list[str], list[str]]]:
    """Every key of the task's schema, each with every bad value its type implies (with
    ``sample``: one of them per key, a different kind from one key to the next); each
    case names the key in its message. Group options with their own keys (dataset=...,
    model=...) are selected first. A group shared with `train` (the same spec object:
    dataset, model, adjoint, hooks) is walked once, in train's table."""
    from runner import schema as S

    cases = []
    shared = {id(v) for v in S.TASK_SCHEMAS["train"].fields.values()} if task != "train" else set()

    def walk(fields, prefix, select):
        for key, spec in fields.items():
            name = prefix + key
            if not prefix and id(spec) in shared and isinstance(spec, (S.Group, S.Variants, S.Hooks)):
                continue
            if isinstance(spec, S.Variants):
                for option, group in spec.options.items():
                    walk({k: v for k, v in group.fields.items() if k != "name"},
                         name + ".", [*select, f"{name}={option}"])
            elif isinstance(spec, S.Group):
                walk(spec.fields, name + ".", select)
            elif isinstance(spec, S.Hooks):
                for hook, group in spec.hooks.items():
                    walk(group.fields, f"{name}.{hook}.", select)
            elif isinstance(spec, S.Anything):
                continue
            else:
                plus = "+" if not spec.required else ""
                mine = [([*select, f"{plus}{name}={bad}"], [name]) for bad in bad_values(spec)]
                if spec.required and not prefix:
                    mine.append(([*select, f"~{name}"], [name]))
                if sample and mine:   # one bad value per key, a different kind key by key
                    mine = [mine[len(cases) % len(mine)]]
                cases.extend(mine)

    walk(S.TASK_SCHEMAS[task].fields, "", [])
    return cases


def cases_for(task: str, files, sample: bool = False) -> list[tuple[list[str], list[str]]]:
    """(overrides, words the one-line message must hold): the schema's table (``sample``:
    one bad value per key), then the cross-field rules and the files."""
    cfg = compose_config(task, base_overrides(task, files), files["root"] / "compose")
    has = lambda key: key in cfg  # noqa: E731
    cases = schema_cases(task, sample)
    if has("depth") and has("method"):
        cases += [(["depth=1", "method=heun"], ["depth", "method=heun"])]
    if has("depths") and has("method"):
        cases += [(["depths=[1]", "method=heun"], ["depth", "method=heun"])]
    if has("dataset") and "name" in (cfg.dataset or {}):
        cases += [(["dataset=nope"], ["dataset", "choose from"])]
        if has("model"):
            cases += [(["model=conv", "dataset=synthetic"], ["model=conv", "image data"])]
    if "model" in cfg and "name" in (cfg.model or {}):
        cases += [(["model=nope"], ["model", "choose from"])]
    if has("hooks"):
        cases += [(["hooks=nope"], ["hooks", "choose from"]),
                  (["+hooks.nope.every=1"], ["hooks.nope", "choose from"])]
    cases += [(["nosuchkey=1"], ["nosuchkey"]), (["+nosuchkey=1"], ["nosuchkey"])]
    if task == "discretization":
        cases += [(["depths=[1024]", "ref_steps=100"], ["ref_steps"])]
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
                    f"model.pretrained={files['missing']}"], ["model.pretrained"]),
                  (["model=resnet", "dataset=synthetic", "dataset.shape=[3,8,8]",
                    f"model.pretrained={files['text']}"], ["model.pretrained"]),
                  (["model=resnet", "dataset=synthetic", "dataset.shape=[3,8,8]",
                    f"model.pretrained={files['run'] / 'checkpoint.pt'}"], ["model.pretrained"]),
                  ([f"resume={files['run']}", "depth=8"], ["resume", "depth"])]
    if task == "report":
        cases += [([f"dir={files['missing'].parent}"], ["dir"]), ([f"dir={files['text']}"], ["dir"])]
    # one line for what Hydra and OmegaConf would answer with a traceback
    cases += [(["hydra.run.dir=outputs/${nonexistent}"], ["hydra.run.dir", "nonexistent"])]
    for key in [k for k in ("lr", "width", "depth", "depths") if has(k)][:1]:
        cases += [([f"{key}=${{nonexistent}}"], [key, "nonexistent"]),
                  ([f"{key}=${{oc.env:RODE_NO_SUCH_VARIABLE}}"], [key, "RODE_NO_SUCH_VARIABLE"])]
    if has("method"):
        cases += [(["method=éuler"], ["method=éuler", "euler, heun"])]
    if "logger" in cfg:
        cases += [(["logger=null"], ["logger", "tensorboard"]),
                  (["logger=[tensorboard,nope]"], ["logger", "nope", "choose from"])]
    if has("dataset") and "name" in (cfg.dataset or {}) and has("depth"):
        cases += [(["dataset=synthetic", "dataset.num_samples=100", "dataset.val_fraction=0.999"],
                   ["dataset.val_fraction", "none to train"])]
    if task == "gradcheck":
        cases += [([f"checkpoint={files['run']}", "width=64"], ["width=64", "contradicts"]),
                  ([f"checkpoint={files['run']}", "model=conv"], ["model=conv", "contradicts"])]
    cases += [(["hydra.run.dir=/proc/forbidden/run"], ["hydra.run.dir", "cannot"]),
              ([f"hydra.run.dir={files['afile']}/run"], ["hydra.run.dir", "cannot"]),
              (["hydra.run.dir="], ["hydra.run.dir", "empty"])]
    return cases


def test_the_table_covers_every_key_of_every_task(files):
    """The README quotes this count; every key of every task has at least one case."""
    from runner import schema as S

    total = sum(len(cases_for(task, files)) for task in TASKS)
    assert total > 600
    for task in TASKS:
        named = {w for _, words in schema_cases(task) for w in words}
        assert named, task
        for key, spec in S.TASK_SCHEMAS[task].fields.items():
            if not isinstance(spec, (S.Anything, S.Group, S.Variants, S.Hooks)):
                assert key in named, f"{task}: {key} has no bad-input case"


def _digest(root):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


class Ran(Exception):
    pass


def check(task, overrides, words, files, tmp_path, monkeypatch, capsys, flags=()):
    from runner import cli
    from runner.tasks import load_task

    module = load_task(task)

    def tripwire(cfg):
        raise Ran(f"rode {task} {' '.join(overrides)}: validation let it through; the task ran")
    monkeypatch.setattr(module, "run", tripwire)
    monkeypatch.chdir(tmp_path)
    before = _digest(files["root"])
    args = [task, *flags, *[o for o in base_overrides(task, files)
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


CONF = str(Path(__file__).resolve().parents[1] / "conf")


def run_flags(task: str) -> list[list[str]]:
    """Hydra's flags that run one job, as users type them (short and long, '=' or not)."""
    return [[], ["--run"], ["-r"], ["--config-dir", CONF], [f"-cd={CONF}"],
            ["--config-name", task], [f"-cn={task}"], ["--config-path", CONF], [f"-cp={CONF}"],
            ["hydra.mode=RUN"], ["-r", "-cd", CONF, f"--config-name={task}"]]


# The default suite's tasks: train (the most keys), the two that read checkpoints, report;
# every task's table runs with the slow tests (test_every_bad_value_of_every_key).
QUICK_TASKS = ("train", "gradcheck", "finetune", "report")


@pytest.mark.parametrize("task", [t if t in QUICK_TASKS else pytest.param(t, marks=pytest.mark.slow)
                                  for t in TASKS])
def test_every_bad_input_is_one_line_exit_2(task, files, tmp_path, monkeypatch, capsys):
    """Every key with one of its bad values, every rule and file case; each case through
    one of Hydra's routes (in turn, shifted per task), since bad input must be refused
    whichever flags start the task. The whole table (every bad value of every key) is
    the slow test below. Train's schema has over a hundred keys: the default suite takes
    every other one (the rules and file cases all), the slow table every key."""
    cases = cases_for(task, files, sample=True)
    if task == "train":
        keys = len(schema_cases(task, sample=True))
        cases = cases[:keys:2] + cases[keys:]
    _run_table(task, cases, files, tmp_path, monkeypatch, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("task", list(TASKS))
def test_every_bad_value_of_every_key(task, files, tmp_path, monkeypatch, capsys):
    """The whole table: every bad value the schema implies for every key."""
    _run_table(task, cases_for(task, files), files, tmp_path, monkeypatch, capsys)


def _run_table(task, cases, files, tmp_path, monkeypatch, capsys):
    failures = []
    routes = run_flags(task)
    shift = list(TASKS).index(task)
    for i, (overrides, words) in enumerate(cases):
        cwd = tmp_path / f"case{i}"
        cwd.mkdir()
        flags = routes[(i + shift) % len(routes)]
        try:
            check(task, overrides, words, files, cwd, monkeypatch, capsys, flags)
        except (AssertionError, pytest.fail.Exception) as e:
            failures.append(str(e).splitlines()[0][:300])
        except Exception as e:   # a traceback is a failure of this test too
            failures.append(f"rode {task} {' '.join(flags)} {' '.join(overrides)}: "
                            f"{type(e).__name__}: "
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


def test_every_flag_of_hydra_is_covered():
    """A flag Hydra adds is either one that only prints (no job runs) or one the
    table runs its cases with: a new flag cannot open a way around the checks."""
    from hydra._internal.utils import get_args_parser

    from runner.routes import _ONLY_PRINT

    typed = {f.split("=")[0] for flags in run_flags("train") for f in flags if f.startswith("-")}
    typed |= {"--multirun", "-m", "--experimental-rerun"}   # test_multirun_routes, refused
    for action in get_args_parser()._actions:
        if action.dest in _ONLY_PRINT or action.dest in ("overrides", "resolve", "package"):
            continue
        assert set(action.option_strings) <= typed, f"{action.option_strings} not in the table"


def test_multirun_routes(files, tmp_path, monkeypatch, capsys):
    """A sweep and a search space through the multirun routes (in turn): every value
    checked (choice(4, 0, -3) refused before trial 1), nothing written."""
    routes = [["-m"], ["--multirun", "-cd", CONF], ["hydra.mode=MULTIRUN"]]
    cases = [(["depth=4,0"], ["depth=0"]),
             (["method=euler,éuler"], ["éuler", "euler, heun"]),
             (["hparams_search=optuna", "hydra.sweeper.params.depth=choice(4,0,-3)"], ["depth=0"]),
             (["hparams_search=optuna", "hydra.sweeper.params.method=choice(heun,nope)"],
              ["method", "nope"]),
             (["depth=4,8", "hydra.sweep.dir=outputs/${nonexistent}"], ["hydra.sweep.dir"])]
    for i, (overrides, words) in enumerate(cases):
        cwd = tmp_path / f"case{i}"
        cwd.mkdir()
        try:
            check("train", overrides, words, files, cwd, monkeypatch, capsys,
                  routes[i % len(routes)])
        finally:
            monkeypatch.undo()


def test_experimental_rerun_is_refused(files, tmp_path, monkeypatch, capsys):
    check("train", ["depth=4"], ["--experimental-rerun"], files, tmp_path, monkeypatch, capsys,
          ["--experimental-rerun", str(files["root"] / "config.pickle")])


def test_a_refused_search_space_value_says_where_the_space_came_from(rode_cli, tmp_path):
    """A value a sweeper's search space gives a key that cannot take it: the one line
    names the value and what the key accepts, that it came from the search space, and
    where that was written (the command line, or the hparams_search config)."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = f"hydra.sweep.dir={tmp_path / 's'}"
    r = rode_cli("-m", "train", "hparams_search=optuna",
                 "hydra.sweeper.params.depth=choice(4,0,-3)", sweep)
    assert r.code == 2 and len(r.err.splitlines()) == 1, r.err
    assert "depth=0" in r.err and "[1, 100000]" in r.err
    assert "search space, hydra.sweeper.params.depth=choice(4,0,-3) on the command line" in r.err

    # the same space in an hparams_search config of the user's (--config-dir)
    conf = tmp_path / "conf" / "hparams_search"
    conf.mkdir(parents=True)
    (conf / "mine.yaml").write_text((Path(CONF) / "hparams_search" / "optuna.yaml").read_text()
                                    .replace("choice(euler, heun)", "choice(euler, nope)"))
    r = rode_cli("-m", "train", "--config-dir", tmp_path / "conf", "hparams_search=mine", sweep)
    assert r.code == 2 and len(r.err.splitlines()) == 1, r.err
    assert "method='nope'" in r.err and "choose from euler, heun" in r.err
    assert ("hydra.sweeper.params.method: choice(euler, nope) in the hparams_search=mine config"
            in r.err)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("subdir,words", [("${oops}", ["hydra.sweep.subdir", "oops"]),
                                          ("/dev/null/x", ["hydra.sweep.subdir=/dev/null/x",
                                                           "cannot create"])])
def test_a_sweep_job_dir_that_cannot_be_made_is_refused_before_anything_is_written(
        rode_cli, tmp_path, subdir, words):
    """Each job's dir (hydra.sweep.dir/hydra.sweep.subdir, as the launcher makes it) is
    checked by the pre-flight: exit 2, one line, not even the sweep's multirun.yaml."""
    r = rode_cli("-m", "train", "depth=2", f"hydra.sweep.dir={tmp_path / 's'}",
                 f"hydra.sweep.subdir={subdir}")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1, r.err[-2000:]
    assert all(w in r.err for w in words), r.err
    assert not (tmp_path / "s").exists()
