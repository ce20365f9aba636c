"""The task registry: ``rode <task>`` runs ``runner.tasks.<module>.run(cfg)``.

A task module defines ``run(cfg)``, a pure function of its config that writes into
``cfg.out_dir``, and may define ``validate(cfg)`` for the checks that need torch
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
    module: str
    description: str
    positional: str | None = None   # `rode <task> <word>` means `<positional>=<word>`
    writes_runs: bool = True        # False: writes beside other runs' results (report)


TASKS: dict[str, Task] = {
    "train": Task("runner.tasks.train", "train a ResNet classifier (Euler/Heun, backprop/adjoint)"),
    "gradcheck": Task("runner.tasks.gradcheck",
                      "adjoint vs backprop gradient, per layer (gradient error vs depth)"),
    "memory": Task("runner.tasks.memory", "saved activations and peak memory of a training step vs depth"),
    "bench": Task("runner.tasks.bench",
                  "time, memory and gradient error of a training step vs depth, adjoint vs alternatives"),
    "discretization": Task("runner.tasks.discretization",
                           "ResNet vs Neural ODE error as depth grows (smooth/rough/iid weights)"),
    "linear": Task("runner.tasks.linear", "linear ResNet: do weights stay smooth in depth while training?"),
    "report": Task("runner.tasks.report", "tables and figures from a sweep directory: rode report <dir>",
                   positional="dir", writes_runs=False),
    "finetune": Task("runner.tasks.finetune",
                     "untie a tied-weights checkpoint, change its depth, fine-tune with the adjoint"),
}


def load_task(name: str):
    return importlib.import_module(TASKS[name].module)
