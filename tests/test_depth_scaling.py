"""alpha (the residual scaling: step h = N^-alpha) reaches the stack of every task that
builds one; alpha=1 is today's 1/N bit for bit; parametrization=completep|depth_mup give
the optimizer the published per-group values; bad values are refused with one line."""
import json
import math

import pytest
import torch

from conftest import compose_config
from runner.optim import ADAM_EPS, build_optimizer, depth_factors
from runner.stack import ResidualStack, depth_step

DATA = ["width=8", "dataset=synthetic", "dataset.num_samples=96", "device=cpu"]
TINY = [*DATA, "progress=false"]


@pytest.fixture
def steps_seen(monkeypatch):
    """(depth, step size, alpha) of every ResidualStack forward pass in this process."""
    seen = []
    forward = ResidualStack.forward

    def recording(self, x):
        seen.append((self.depth, self.step_size, self.alpha))
        return forward(self, x)

    monkeypatch.setattr(ResidualStack, "forward", recording)
    return seen


def test_depth_step_is_the_one_formula():
    assert depth_step(16, 1.0) == 1.0 / 16 and depth_step(7, 1) == 1.0 / 7
    assert depth_step(16, 0.5) == 0.25 and depth_step(16, 0.0) == 1.0
    assert ResidualStack([torch.nn.Linear(2, 2)] * 9, alpha=0.5).step_size == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="alpha"):
        depth_step(4, 1.5)


@pytest.mark.parametrize("task, args", [
    ("train", ["depth=4", "epochs=1", "method=heun", "grad=adjoint", *TINY]),
    ("gradcheck", ["depth=4", "batch_size=8", *DATA]),
    pytest.param("memory", ["depths=[4]", "grads=[adjoint]", "steps=1", "batch_size=8", *TINY],
                 marks=pytest.mark.slow),
    ("bench", ["depths=[4]", "methods=[euler]", "contenders=[backprop,adjoint]", "width=8",
               "batch_size=8", "repeats=1", "warmup=0", "memory=false", "progress=false"]),
    pytest.param("discretization", ["depths=[4]", "cases=[tanh]", "weights=[smooth]",
                                    "methods=[euler]", "trials=1", "ref_steps=64", "progress=false"],
                 marks=pytest.mark.slow),
])
def test_alpha_reaches_the_stack_of_every_task(rode_cli, tmp_path, steps_seen, task, args):
    r = rode_cli(task, "alpha=0.5", *args, f"hydra.run.dir={tmp_path / 'run'}")
    assert r.code == 0, r.err
    assert steps_seen, "no residual stack ran"
    for depth, h, alpha in steps_seen:
        assert alpha == 0.5 and h == pytest.approx(depth ** -0.5), (task, depth, h)


@pytest.mark.slow
def test_finetune_keeps_the_checkpoints_alpha_at_the_new_depth(rode_cli, tmp_path, steps_seen):
    run = tmp_path / "run"
    assert rode_cli("train", "depth=4", "init=tied", "alpha=0.0", "epochs=1", *TINY,
                    f"hydra.run.dir={run}").code == 0
    steps_seen.clear()
    r = rode_cli("finetune", f"checkpoint={run}", "depth=8", "epochs=1", "bn_recalibration=0",
                 "progress=false", "device=cpu", f"hydra.run.dir={tmp_path / 'ft'}")
    assert r.code == 0, r.err
    assert (4, 1.0, 0.0) in steps_seen and (8, 1.0, 0.0) in steps_seen   # h = N^0 = 1


def test_alpha_one_is_bit_identical_to_the_default(rode_cli, tmp_path):
    runs = {}
    for name, extra in (("default", ["~alpha"]), ("one", ["alpha=1.0"])):
        assert rode_cli("train", "depth=4", "epochs=1", "seed=3", *TINY, *extra,
                        f"hydra.run.dir={tmp_path / name}").code == 0
        runs[name] = json.loads((tmp_path / name / "summary.json").read_text())
    for key in ("train_loss", "test_loss", "test_acc"):
        assert runs["default"][key] == runs["one"][key], key
    a = torch.load(tmp_path / "default" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def optimizer_at(tmp_path, depth, *overrides):
    from runner.data import build_dataset
    from runner.models import build_model

    cfg = compose_config("train", [f"depth={depth}", *TINY, *overrides], tmp_path)
    data = build_dataset(cfg.dataset)
    model = build_model(cfg, data.input_shape, data.num_classes)
    return model, build_optimizer(cfg, model)


@pytest.mark.parametrize("depth", [4, 64])
def test_completep_adam_groups(tmp_path, depth):
    model, opt = optimizer_at(tmp_path, depth, "parametrization=completep", "alpha=0.5",
                              "lr=0.01", "weight_decay=0.001")
    groups = {g["name"]: g for g in opt.param_groups}
    io, hidden = groups["io"], groups["hidden:0"]
    assert io["lr"] == 0.01 and io["eps"] == ADAM_EPS and io["weight_decay"] == 0.001
    assert hidden["lr"] == pytest.approx(0.01 * depth ** -0.5)
    assert hidden["eps"] == pytest.approx(ADAM_EPS * depth ** -0.5)
    assert hidden["weight_decay"] == pytest.approx(0.001 * depth ** 0.5)
    stack_params = {id(p) for p in model.stack.functions.parameters()}
    assert {id(p) for p in hidden["params"]} == stack_params
    assert {id(p) for p in io["params"]} == {id(p) for p in model.parameters()} - stack_params
    # The flat buffers carry the groups' values into torch's Adam.
    assert sorted(g["lr"] for g in opt.inner.param_groups) == sorted([io["lr"], hidden["lr"]])


@pytest.mark.parametrize("depth", [4, 64])
def test_depth_mup_and_completep_sgd_groups(tmp_path, depth):
    _, opt = optimizer_at(tmp_path, depth, "parametrization=depth_mup", "optimizer=sgd", "lr=0.1")
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.1]   # SGD: constant in depth
    _, opt = optimizer_at(tmp_path, depth, "parametrization=depth_mup", "lr=0.1", "alpha=1.0")
    hidden = opt.param_groups[1]
    assert hidden["lr"] == pytest.approx(0.1 / math.sqrt(depth))
    assert hidden["eps"] == pytest.approx(ADAM_EPS / math.sqrt(depth))
    _, opt = optimizer_at(tmp_path, depth, "parametrization=completep", "optimizer=sgd",
                          "lr=0.1", "alpha=1.0")
    assert opt.param_groups[1]["lr"] == pytest.approx(0.1 * depth)   # Marion et al.: lr ~ N


def test_standard_is_todays_single_group(tmp_path):
    _, opt = optimizer_at(tmp_path, 16, "alpha=0.5")
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["lr"] == 0.003
    assert depth_factors("standard", "adam", 1000, 0.0) == {"lr": 1.0, "eps": 1.0,
                                                            "weight_decay": 1.0}


@pytest.mark.parametrize("task, arg, expected", [
    ("train", "alpha=1.5", "alpha=1.5 must be a finite number in [0, 1]"),
    ("train", "alpha=-0.1", "alpha=-0.1 must be a finite number in [0, 1]"),
    ("train", "alpha=half", "alpha='half' must be a finite number in [0, 1]"),
    ("gradcheck", "alpha=2", "alpha=2 must be a finite number in [0, 1]"),
    ("bench", "alpha=nan", "must be a finite number in [0, 1]"),
    ("train", "parametrization=mup", "parametrization='mup' is not a valid choice; choose from "
     "standard, completep, depth_mup"),
])
def test_bad_values_are_refused_with_one_line(rode_cli, tmp_path, task, arg, expected):
    r = rode_cli(task, arg, f"hydra.run.dir={tmp_path / 'run'}")
    assert r.code == 2 and expected in r.err
    assert len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err
    assert not (tmp_path / "run").exists()
