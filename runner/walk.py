"""Walking modules fast: ``module.modules()`` and ``module.parameters()`` without
nn.Module's generators, and calling a module without ``nn.Module.__call__``'s
dispatch where it would do nothing.

The grad modes walk a stack's modules and parameters at every pass, and call its
residual functions several times a step: thousands of each at depth 1000, where
this overhead shows in the step time. Same order, deduplication and results as
the generators and the calls.
"""
from __future__ import annotations

from torch import nn

from . import compat


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


def hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` does more than call its ``forward``: it has a
    hook, or was compiled with ``module.compile()``."""
    return compat.hooked(module)


def hooks_anywhere() -> bool:
    """Whether a global module hook is set, or a module call is being traced:
    then every module must be called through ``nn.Module.__call__``."""
    return compat.global_hooks() or compat.is_tracing()


def compose(parts: list):
    """x -> parts[-1](...parts[0](x)): an ``nn.Sequential``'s forward pass over
    its children's calls, without ``nn.Module.__call__``'s dispatch (about 5 µs a
    call at depth 1000: as much as a 64-wide layer's arithmetic)."""
    if len(parts) == 3:   # the common residual block, without a loop
        a, b, c = parts
        return lambda x: c(b(a(x)))

    def run(x):
        for part in parts:
            x = part(x)
        return x
    return run
