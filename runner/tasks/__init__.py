"""The task registry: ``rode <task>`` runs ``runner.tasks.<module>.run(cfg)``.

A task is declared once, here (:class:`Task`: its module, result files, sweeper
objective, report section). Its module defines ``run(cfg)``, a pure function of its
config that writes into ``cfg.out_dir``, and may define ``validate(cfg)`` for the checks that need torch
or the disk (a checkpoint's weights, a dataset's files, a CUDA device). Types,
ranges, choices and cross-field rules come first, from ``runner.schema`` and
``runner.config``. Its config is ``conf/<task>.yaml``. Task modules are imported
only when their task runs, so ``rode --help`` and refusals of bad input stay fast.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    """A task's one declaration: what the CLI and ``rode report`` need of it."""

    module: str
    description: str
    positional: str | None = None   # `rode <task> <word>` means `<positional>=<word>`
    writes_runs: bool = True        # False: writes beside other runs' results (report)
    results: tuple[str, ...] = ()   # the result files of its job dirs (report finds its jobs by them)
    objective: str | None = None    # "module.function(cfg, summary)": what a sweeper optimises
    section: bool = False           # its module's report_section(jobs, out, figures) -> markdown
    result_line: bool = False       # its module's report_result(job) -> one line for "All jobs"

    def objective_function(self):
        """The function that turns a run's result into a sweeper's objective, or None."""
        if self.objective is None:
            return None
        module, _, name = self.objective.rpartition(".")
        return getattr(importlib.import_module(module), name)


_OBJECTIVE = "runner.selection.objective"
TASKS: dict[str, Task] = {
    "train": Task("runner.tasks.train", "train a ResNet classifier (Euler/Heun, backprop/adjoint)",
                  results=("metrics.jsonl",), objective=_OBJECTIVE, section=True, result_line=True),
    "gradcheck": Task("runner.tasks.gradcheck",
                      "adjoint vs backprop gradient, per layer (gradient error vs depth)",
                      results=("grad_error.csv",), section=True, result_line=True),
    "memory": Task("runner.tasks.memory", "saved activations and peak memory of a training step vs depth",
                   results=("memory.csv",), section=True),
    "bench": Task("runner.tasks.bench",
                  "time, memory and gradient error of a training step vs depth, adjoint vs alternatives",
                  results=("bench.csv",), section=True),
    "discretization": Task("runner.tasks.discretization",
                           "ResNet vs Neural ODE error as depth grows (smooth/rough/iid weights)",
                           results=("discretization.csv",), section=True, result_line=True),
    "linear": Task("runner.tasks.linear", "linear ResNet: do weights stay smooth in depth while training?",
                   results=("linear_metrics.csv",), section=True, result_line=True),
    "report": Task("runner.tasks.report", "tables and figures from a sweep directory: rode report <dir>",
                   positional="dir", writes_runs=False),
    "finetune": Task("runner.tasks.finetune",
                     "untie a tied-weights checkpoint, change its depth, fine-tune with the adjoint",
                     objective=_OBJECTIVE, section=True, result_line=True),
}


def load_task(name: str):
    return importlib.import_module(TASKS[name].module)


def environment_check(name: str):
    """The third stage of a job's checks (``runner.config.validate``): the task module's
    own ``validate`` (files, devices, checkpoints), as a callable of the config. The
    module (and torch) is imported only when the stage runs."""
    def check(cfg) -> None:
        module = load_task(name)
        if hasattr(module, "validate"):
            module.validate(cfg)
    return check
