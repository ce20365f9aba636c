"""rode: residual networks as discretized Neural ODEs.

The public surface is the residual stack; everything else is the command-line
runner built on it. The names below are imported on first use, so that
``import runner`` (and ``rode --help``) does not import torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .gradmodes import GRAD_MODES, Adjoint, Backprop
    from .guard import AdjointStateError
    from .integrators import INTEGRATORS
    from .stack import ResidualStack

__all__ = ["ResidualStack", "INTEGRATORS", "GRAD_MODES", "Adjoint", "Backprop",
           "AdjointStateError"]
__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {"ResidualStack": "stack", "INTEGRATORS": "integrators", "GRAD_MODES": "gradmodes",
         "Adjoint": "gradmodes", "Backprop": "gradmodes", "AdjointStateError": "guard"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value   # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
