"""Each check stage once per job.

A job's config goes through three stages of checks (``runner.config.validate``):
``schema`` (types, ranges, choices: ``runner.schema``), ``rules`` (keys that tie
together: ``runner.config.RULES``) and ``environment`` (files, devices,
checkpoints: the task module's ``validate``). The command line's pre-flight
(``runner.cli.validate_overrides``) runs them for every job it can foresee and
records here which ones passed, keyed by the job's composed config; the Hydra app
inside the job then runs only the stages this process has not already seen pass
for that config. A job the pre-flight did not foresee (a point a sweeper samples,
a job on another machine) has no record and gets every stage.

Torch-free. (A checkpoint is read once per process by ``runner.checkpoint.load``.)
"""
from __future__ import annotations

import hashlib

STAGES = ("schema", "rules", "environment")

_passed: dict[str, set[str]] = {}


def job_key(task: str, cfg) -> str:
    """A digest of ``task`` and the job's config as composed (interpolations unresolved,
    so the pre-flight's config and the app's hash alike)."""
    from omegaconf import OmegaConf

    text = OmegaConf.to_yaml(cfg, resolve=False) if OmegaConf.is_config(cfg) else repr(cfg)
    return hashlib.sha256(f"{task}\n{text}".encode()).hexdigest()


def record(key: str, stages) -> None:
    """``stages`` passed for the job ``key``."""
    _passed.setdefault(key, set()).update(stages)


def passed(key: str) -> frozenset[str]:
    """The stages already passed for the job ``key`` in this process."""
    return frozenset(_passed.get(key, ()))


def forget() -> None:
    """A new command line: nothing has been checked yet."""
    _passed.clear()
