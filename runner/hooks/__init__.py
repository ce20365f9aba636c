"""Measurement hooks: small objects the training loop calls at fixed points.

A hook subclasses :class:`Hook`, overrides the points it needs, and logs with
``run.log(self.name, {...})`` (a line in metrics.jsonl with a ``hook`` field).
Register it in ``HOOKS`` to make it available from the config
(``hooks.<name>.every=K``; 0 or absent means off, and an off hook is never built).
"""
from __future__ import annotations

from .. import names
from ..schema import HOOK_SCHEMA
from .base import Hook
from .grad_error import GradErrorHook
from .memory import MemoryHook
from .recon import ReconHook
from .smoothness import SmoothnessHook

HOOKS: dict[str, type[Hook]] = {
    "grad_error": GradErrorHook, "memory": MemoryHook, "recon": ReconHook,
    "smoothness": SmoothnessHook,
}
names.agree(HOOKS, names.HOOKS, "HOOKS")


def build_hooks(cfg) -> list[Hook]:
    """cfg: the ``hooks`` node, ``{name: {every: K, ...}}``, checked against the config
    schema (ConfigError on a bad option); hooks with every=0 are off and not built."""
    HOOK_SCHEMA.check("hooks", cfg)
    hooks = []
    for name, options in (cfg or {}).items():
        options = dict(options or {})
        if options.get("every", 0) > 0:
            hooks.append(HOOKS[name](**options))
    return hooks
