"""``module.modules()`` and ``module.parameters()`` without nn.Module's generators.

The grad modes walk a stack's modules and parameters at every pass: thousands of
them at depth 1000, where the generators' overhead shows in the step time. Same
order and deduplication as the generators.
"""
from __future__ import annotations

from torch import nn


def modules_of(module: nn.Module) -> list[nn.Module]:
    """``list(module.modules())``."""
    out, seen, todo = [], set(), [module]
    while todo:
        m = todo.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        out.append(m)
        todo.extend(c for c in reversed(m._modules.values()) if c is not None)
    return out


def parameters_of(module: nn.Module) -> list[nn.Parameter]:
    """``list(module.parameters())``."""
    out, seen = [], set()
    for m in modules_of(module):
        for p in m._parameters.values():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out
