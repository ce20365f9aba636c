"""runner.composing: the pre-flight's compose gives what hydra.compose gives (config,
hydra node, errors), composes Hydra's defaults once per group selection, and sees a
config file that changed."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from runner import composing, routes

CONF = Path(__file__).resolve().parents[1] / "conf"


def _plain(cfg):
    c = OmegaConf.to_container(cfg, resolve=False)
    if "hydra" in c:
        c["hydra"]["runtime"].pop("output_dir", None)
    return c


def _both(task, overrides, hydra_node):
    """(hydra.compose's answer, composing.compose's answer twice), each a config or an error."""
    from hydra import compose

    def answer(f):
        try:
            return _plain(f())
        except Exception as e:   # the same exception, with the same message
            return f"{type(e).__name__}: {e}"

    real = answer(lambda: compose(config_name=task, overrides=overrides,
                                  return_hydra_config=hydra_node))
    mine = [answer(lambda: composing.compose(task, overrides, hydra_node)) for _ in range(2)]
    return real, mine


CASES = [
    ("train", ["depth=4"], True),
    ("train", ["dataset=mnist", "depth=8", "hydra.run.dir=/tmp/x", "+extra=1"], True),
    ("train", ["model=conv", "dataset=cifar10", "method=heun", "~seed"], False),
    ("train", ["dataset.val_fraction=0.5", "dataset=synthetic", "hydra/launcher=basic"], True),
    ("gradcheck", ["width=16", "hydra.job.name=mine"], True),
    # errors: an unknown key, an unknown group option, a sweep without -m
    ("train", ["nosuchkey=1"], False),
    ("train", ["dataset=nope"], False),
    ("train", ["depth=4,8"], False),
    ("train", ["+depth=4"], False),
]


@pytest.mark.parametrize("task,overrides,hydra_node", CASES)
def test_same_config_and_errors_as_hydra_compose(task, overrides, hydra_node):
    composing.clear()
    with routes.initialize(None):
        real, mine = _both(task, overrides, hydra_node)
    assert mine[0] == real and mine[1] == real


def test_a_sweep_composes_the_defaults_once_per_group_selection(rode_cli, tmp_path, monkeypatch):
    import hydra

    from runner.tasks import load_task

    calls = []
    real = hydra.compose

    def counting(*args, **kwargs):
        calls.append(kwargs.get("overrides"))
        return real(*args, **kwargs)

    module = load_task("train")
    ran = []
    monkeypatch.setattr(hydra, "compose", counting)
    monkeypatch.setattr(module, "run", lambda cfg: ran.append(cfg.depth))
    composing.clear()
    r = rode_cli("-m", "train", "depth=2,4", "dataset=synthetic,digits",
                 f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert r.code == 0, r.err
    assert sorted(ran) == [2, 2, 4, 4]   # 4 jobs, all ran
    # hydra.mode's check (no group choice: the dataset is swept), then each job's choice
    assert sorted(map(tuple, calls)) == [(), ("dataset=digits",), ("dataset=synthetic",)]


def test_a_changed_config_file_is_read_again(rode_cli, tmp_path):
    """A dataset option in a --config-dir, edited between two commands of one process:
    the second command composes the edited file."""
    conf = tmp_path / "conf"
    (conf / "dataset").mkdir(parents=True)
    mine = conf / "dataset" / "mine.yaml"
    synthetic = (CONF / "dataset" / "synthetic.yaml").read_text()
    mine.write_text(synthetic.replace("num_samples: 2000", "num_samples: -7"))
    composing.clear()
    r = rode_cli("train", "--config-dir", conf, "dataset=mine")
    assert r.code == 2 and "dataset.num_samples" in r.err and "-7" in r.err, r.err
    mine.write_text(synthetic.replace("val_fraction: 0.1", "val_fraction: 3.5"))
    r = rode_cli("train", "--config-dir", conf, "dataset=mine")
    assert r.code == 2 and "dataset.val_fraction" in r.err and "3.5" in r.err, r.err


@pytest.mark.parametrize("overrides", [["hydra.mode=MULTIRUN"], ["depth=4,8", "method=heun"],
                                       ["experiment=bench"], ["hparams_search=optuna"],
                                       ["dataset=synthetic,mnist"], ["nosuchkey=1"], []])
def test_hydra_mode_as_hydra_reads_it(overrides):
    """routes reads hydra.mode through composing (multirun=True), as Hydra.get_mode does."""
    from hydra.core.global_hydra import GlobalHydra

    composing.clear()
    with routes.initialize(None):
        real = GlobalHydra.instance().hydra.get_mode(config_name="train", overrides=overrides)
        for _ in range(2):
            try:
                mine = composing.compose("train", overrides, True, multirun=True).hydra.mode
            except Exception:
                mine = None
            assert mine == real


def _hydra_files(root):
    """Every YAML file Hydra wrote under root (.hydra/*, multirun.yaml), root made X."""
    return {p.relative_to(root).as_posix(): p.read_text().replace(str(root), "X")
            for p in sorted(root.rglob("*.yaml"))}


def test_the_apps_loads_reuse_the_preflight_and_write_what_hydra_writes(rode_cli, tmp_path,
                                                                        monkeypatch):
    """Inside the app, Hydra's config loads (its mode check, the run, each job of a sweep)
    go through composing: the same .hydra/ files as Hydra's own loads, and no
    composition from the YAML files that the pre-flight already made."""
    import contextlib

    from runner.tasks import load_task

    monkeypatch.setattr(load_task("train"), "run", lambda cfg: None)
    commands = [["train", "model=conv", "dataset=synthetic", "dataset.shape=[1,8,8]", "lr=0.01",
                 "hydra.run.dir=X/run"],
                ["-m", "train", "dataset=synthetic", "depth=2,3", "method=heun",
                 "hydra.sweep.dir=X/sweep"]]
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    written, real = {}, ConfigLoaderImpl._load_configuration_impl
    for cached in (True, False):
        root = tmp_path / ("cached" if cached else "hydra")
        root.mkdir()
        composing.clear()
        loads = []   # compositions from the YAML files
        monkeypatch.setattr(ConfigLoaderImpl, "_load_configuration_impl",
                            lambda self, *a, loads=loads, **k: loads.append(a) or real(self, *a, **k))
        if not cached:
            monkeypatch.setattr(composing, "cached_loads", contextlib.nullcontext)
        for command in commands:
            r = rode_cli(*[w.replace("X", str(root)) for w in command], cwd=root)
            assert r.code == 0, r.err
        written[cached] = _hydra_files(root)
        # cached: one per command (its mode check's, which the pre-flight's reuses); Hydra's
        # own: also the app's mode check and run, a sweep's multirun config and each job's
        assert len(loads) == 2 if cached else len(loads) >= 10, len(loads)
    assert len(written[True]) == 10   # run: 3 files; sweep: 2 jobs x 3, multirun.yaml
    assert written[True] == written[False]


@pytest.mark.parametrize("overrides", [["depth=4,8", "dataset=mnist"], ["hydra.run.dir=/tmp/x"],
                                       ["experiment=bench"], ["dataset=synthetic,mnist"]])
def test_the_mode_checks_composition_is_hydras_multirun_one(overrides):
    """hydra.mode's composition (multirun) reuses a run's of the same group choices:
    the whole config is what Hydra's multirun composition gives, before and after."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    composing.clear()
    with routes.initialize(None):
        real = _plain(GlobalHydra.instance().hydra.compose_config(
            config_name="train", overrides=overrides, run_mode=RunMode.MULTIRUN,
            with_log_configuration=False, validate_sweep_overrides=False))
        for _ in range(2):
            assert _plain(composing.compose("train", overrides, True, multirun=True)) == real
