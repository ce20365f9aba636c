"""The task registry: ``rode <task>`` runs ``runner.tasks.<module>.run(cfg)``.

A task module defines ``run(cfg)`` (a pure function of its config that writes
into ``cfg.out_dir``) and ``validate(cfg)`` (raises ConfigError on bad input,
runs before anything is written). Its config is ``conf/<task>.yaml``. Modules
are imported only when their task runs, so ``rode --help`` stays fast.
"""
import importlib

# task name -> (module, one-line description for `rode --help`)
TASKS: dict[str, tuple[str, str]] = {
    "train": ("runner.tasks.train", "train a ResNet classifier (Euler/Heun, backprop/adjoint)"),
    "gradcheck": ("runner.tasks.gradcheck", "adjoint vs backprop gradient, per layer (gradient error vs depth)"),
    "memory": ("runner.tasks.memory", "saved activations and peak memory of a training step vs depth"),
    "discretization": ("runner.tasks.discretization",
                       "ResNet vs Neural ODE error as depth grows (smooth/rough/iid weights)"),
    "linear": ("runner.tasks.linear", "linear ResNet: do weights stay smooth in depth while training?"),
    "report": ("runner.tasks.report", "tables and figures from a sweep directory: rode report <dir>"),
    "bench": ("runner.tasks.bench",
              "time, memory and gradient error of a training step vs depth, adjoint vs alternatives"),
    "finetune": ("runner.tasks.finetune",
                 "untie a tied-weights checkpoint, change its depth, fine-tune with the adjoint"),
}


def load_task(name: str):
    return importlib.import_module(TASKS[name][0])
