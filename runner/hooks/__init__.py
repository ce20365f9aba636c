"""Measurement hooks: small objects the training loop calls at fixed points.

A hook subclasses :class:`Hook`, overrides the points it needs, and logs with
``run.log(self.name, {...})`` (a line in metrics.jsonl with a ``hook`` field).
Register it in ``HOOKS`` to make it available from the config
(``hooks.<name>.every=K``; 0 or absent means off, and an off hook is never built).
"""
from __future__ import annotations

from ..errors import ConfigError
from .base import Hook
from .grad_error import GradErrorHook
from .memory import MemoryHook
from .recon import ReconHook
from .smoothness import SmoothnessHook

HOOKS: dict[str, type[Hook]] = {
    "grad_error": GradErrorHook, "memory": MemoryHook, "recon": ReconHook,
    "smoothness": SmoothnessHook,
}


def build_hooks(cfg) -> list[Hook]:
    """cfg: the ``hooks`` node, ``{name: {every: K, ...}}``; hooks with every<=0 are skipped."""
    hooks = []
    for name, options in (cfg or {}).items():
        if name not in HOOKS:
            raise ConfigError(f"hooks.{name} is not a hook; choose from {', '.join(HOOKS)}")
        options = dict(options or {})
        every = options.get("every", 0)
        if isinstance(every, bool) or not isinstance(every, int):
            raise ConfigError(f"hooks.{name}.every={every!r} must be an integer (0 = off)")
        if every <= 0:
            continue
        hooks.append(HOOKS[name](**options))
    return hooks
