"""rode: residual networks as discretized Neural ODEs.

The public surface is the residual stack; everything else is the command-line
runner built on it. The names below are imported on first use, so that
``import runner`` (and ``rode --help``) does not import torch.
"""
from __future__ import annotations

# First, before anything else is imported: as the `rode` command, Ctrl-C while the
# command is still importing is one line and exit 130, not a traceback.
# os, sys and _signal are imported by Python's start-up already: no time passes here.
# (``signal`` wraps _signal in enums: slower to import, and an interrupt while it imports
# would be a traceback in this file.)
import _signal
import os as _os
import sys as _sys


def _interrupted_early(signum, frame):
    """Ctrl-C before the command has started anything: one line; nothing was written."""
    _os.write(2, b"rode: error: interrupted (Ctrl-C) before the run started; nothing was run\n")
    _os._exit(128 + _signal.SIGINT)


def _catch_early_interrupt() -> bool:
    """Install :func:`_interrupted_early` for SIGINT, only for the `rode` command (not
    when a program or a test imports rode, nor over a handler someone else set);
    ``runner.cli.main`` puts Python's own handler back once everything is imported."""
    argv0 = _sys.argv[0] if _sys.argv else ""
    command = (_os.path.basename(argv0) == "rode"
               or argv0.endswith(_os.path.join("runner", "__main__.py")))
    if command and _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
        _signal.signal(_signal.SIGINT, _interrupted_early)
    return _signal.getsignal(_signal.SIGINT) is _interrupted_early


_catch_early_interrupt()

import importlib  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

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
