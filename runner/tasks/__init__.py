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
}


def load_task(name: str):
    return importlib.import_module(TASKS[name][0])
