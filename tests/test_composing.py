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
    assert sorted(map(tuple, calls)) == [("dataset=digits",), ("dataset=synthetic",)]


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
