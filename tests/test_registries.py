"""Tests generic over the registries: every entry of a registry is held to what it declares,
so a new integrator (or model, dataset, hook, ...) is tested by being registered."""
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf, open_dict
from torch import nn

from runner import ResidualStack, names, schema
from runner.contenders import CONTENDERS
from runner.data import DATASETS
from runner.gradmodes import GRAD_MODES
from runner.hooks import HOOKS
from runner.inits import INITS
from runner.integrators import INTEGRATORS
from runner.models import ACTIVATIONS, MODELS
from runner.selection import MONITORS
from runner.tasks import TASKS
from runner.tracking import BACKENDS

CONF = Path(__file__).resolve().parents[1] / "conf"


class Linear(nn.Module):
    """f(x) = A x, with a fixed A."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.register_buffer("a", a)

    def forward(self, x):
        return x @ self.a.T


def linear_problem(dim: int = 4):
    """dx/dt = A(t) x on [0, 1] with A(t) = cos(3t) M + t M², smooth in t.

    The A(t) commute (all are polynomials in M), so x(1) = exp(∫_0^1 A) x(0)
    = exp(sin(3)/3 M + M²/2) x(0) exactly.
    """
    g = torch.Generator().manual_seed(0)
    m = torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim ** 0.5
    x0 = torch.randn(3, dim, generator=g, dtype=torch.float64)
    exact = x0 @ torch.linalg.matrix_exp(math.sin(3.0) / 3 * m + 0.5 * m @ m).T
    return (lambda t: math.cos(3 * t) * m + t * (m @ m)), x0, exact


def fitted_slope(depths, errors) -> float:
    """Least-squares slope of log(error) against log(depth)."""
    xs, ys = [math.log(d) for d in depths], [math.log(e) for e in errors]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / \
        sum((x - mx) ** 2 for x in xs)


# Large depths: momentum with its default γ = 0.9 solves ε ẍ + ẋ = f with ε = h / (1 - γ) = 10 h,
# so its error falls at order 1 only once ε is small (N in the hundreds); at depths 16..256 its
# fitted slope is still about -0.5.
DEPTHS = [256, 512, 1024, 2048, 4096]


@pytest.mark.parametrize("name", list(INTEGRATORS))
def test_discretization_error_falls_at_the_declared_order(name):
    """Function n is f(·, t_n) with t_n = n h and h = 1 / (number of steps), so the last step
    ends at t = 1; the error against the exact x(1) falls like depth^-order."""
    a_of, x0, exact = linear_problem()
    errors = []
    for depth in DEPTHS:
        integrator = INTEGRATORS[name]()
        h = 1.0 / integrator.num_steps(depth)
        stack = ResidualStack([Linear(a_of(n * h)) for n in range(depth)], integrator,
                              "backprop", step_size=h)
        with torch.no_grad():
            out = stack(x0)
        errors.append(((out - exact).norm() / exact.norm()).item())
    order, slope = INTEGRATORS[name].order, fitted_slope(DEPTHS, errors)
    assert abs(slope + order) < 0.15, (name, order, slope, errors)
    assert errors[-1] < 0.1 ** (order + 1), errors   # it converges to x(1)


@pytest.mark.parametrize("name", list(INTEGRATORS))
def test_fewest_functions_is_what_the_integrator_declares(name):
    fewest = INTEGRATORS[name].min_functions
    x = torch.randn(2, 3, dtype=torch.float64)

    def functions(count):
        return [Linear(torch.eye(3, dtype=torch.float64)) for _ in range(count)]

    stack = ResidualStack(functions(fewest), name)
    assert stack.num_steps >= 1 and stack(x).shape == x.shape
    with pytest.raises(ValueError, match=f"at least {fewest}"):
        ResidualStack(functions(fewest - 1), name)


def conf_options(group: str) -> set[str]:
    return {p.stem for p in (CONF / group).glob("*.yaml")}


def test_each_registry_has_one_list_of_names():
    """runner.names is the one list of each registry's names: the schema offers them, each
    registry agrees with it at import (or fails to import), each config group has a file
    per name."""
    assert schema.METHODS is names.METHODS and schema.GRADS is names.GRADS
    assert names.METHODS == {name: cls.min_functions for name, cls in INTEGRATORS.items()}
    for registry, listed in [(GRAD_MODES, names.GRADS), (INITS, names.INITS), (MODELS, names.MODELS),
                             (DATASETS, names.DATASETS), (HOOKS, names.HOOKS),
                             (CONTENDERS, names.CONTENDERS), (BACKENDS, names.LOGGERS),
                             (MONITORS, names.MONITORS), (ACTIVATIONS, names.ACTIVATIONS)]:
        assert set(registry) == set(listed)
    assert set(names.MODELS) == conf_options("model")
    assert set(names.DATASETS) == conf_options("dataset")
    assert set(names.LOGGERS) == conf_options("logger")
    assert {p.stem for p in CONF.glob("*.yaml")} == set(TASKS)
    with pytest.raises(RuntimeError, match=r"has \['extra'\] that runner/names.py lacks"):
        names.agree({**INITS, "extra": None}, names.INITS, "INITS")


def experiment_tasks() -> dict[str, set[str]]:
    """Each experiment -> the tasks that its usage lines (`rode [-m] <task> experiment=<name>`,
    in the comments of conf/experiment/*.yaml) run it with."""
    tasks: dict[str, set[str]] = {}
    for path in (CONF / "experiment").glob("*.yaml"):
        for task, name in re.findall(r"rode (?:-m )?(\w+) experiment=(\w+)\b", path.read_text()):
            tasks.setdefault(name, set()).add(task)
    return tasks


def test_every_experiment_names_its_task_and_fits_its_schema():
    """Each experiment file (the GPU-scale ones too, which no CPU test runs) is named in a usage
    line with one task, and its values, and every value its sweep lists, pass that task's
    schema: a misspelt key or a bad value in an experiment fails here, not on a cluster."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    tasks = experiment_tasks()
    assert set(tasks) == {p.stem for p in (CONF / "experiment").glob("*.yaml")}, tasks
    for name, named in tasks.items():
        assert len(named) == 1 and named <= set(TASKS), (name, named)
        assert name.split("_")[0] == next(iter(named)), (name, named)   # found by its task
        (task,) = named
        GlobalHydra.instance().clear()
        with initialize_config_module("runner.conf", version_base="1.3"):
            cfg = compose(task, [f"experiment={name}"], return_hydra_config=True)
        GlobalHydra.instance().clear()
        sweep = dict(cfg.hydra.sweeper.params or {})
        with open_dict(cfg):
            del cfg["hydra"]
            cfg.out_dir = "unused"
        for key in cfg:
            if OmegaConf.is_missing(cfg, key):   # left to the command line (checkpoint=<dir>)
                cfg[key] = "given"
        schema.check_config(task, cfg)
        for key, values in sweep.items():
            assert not (CONF / key).is_dir(), f"{name}: sweeps a config group ({key})"
            for value in str(values).split(","):
                job = cfg.copy()
                OmegaConf.update(job, key, yaml.safe_load(value), merge=False)
                schema.check_config(task, job)


def test_each_task_declares_what_the_cli_and_the_report_use():
    """A task's declaration (runner.tasks.TASKS) says what its module offers: its report
    section and result line, its sweeper objective; nothing undeclared is probed for."""
    from runner.tasks import load_task

    for name, task in TASKS.items():
        module = load_task(name)
        assert hasattr(module, "report_section") == task.section, name
        assert hasattr(module, "report_result") == task.result_line, name
        assert callable(module.run)
        if task.objective:
            assert callable(task.objective_function())
    assert TASKS["train"].objective_function()(OmegaConf.create({"objective": ["val_acc"]}),
                                               {"best_metrics": {"val_acc": 0.5}}) == [0.5]
