"""Every private torch call rode makes, each behind one feature check with a public
fallback that gives the same results.

rode supports a range of torch releases (setup.cfg; docs/torch-versions.md). A few
hot paths call torch internals because they are measurably faster at depth 1000
(docs/benchmarks.md). Internals move between releases, so each one is looked up
once, here, when this module is imported: where it exists (and
``RODE_TORCH_PUBLIC=1`` is not set), the fast private call runs; where it does not,
a public equivalent does. ``AVAILABLE`` says which private feature this torch has
and is used; tests compare the two paths where both exist.

=======================  =====================================  =========================================
feature                  private call                           public fallback
=======================  =====================================  =========================================
``execution_engine``     ``Variable._execution_engine``         ``torch.autograd.grad``
                         ``.run_backward`` (no argument checks)
``foreach_copy``         ``torch._foreach_copy_``               ``dst.copy_(src)`` per tensor
``foreach_add``          ``torch._foreach_add_``                ``dst.add_(src)`` per tensor
``fused_check``          ``torch.optim.optimizer``              one step of the optimizer with
                         ``._device_dtype_check_for_fused``     ``fused=True`` on a one-element tensor
``tracing_state``        ``torch._C._get_tracing_state``        ``torch.jit.is_tracing``
``module_hooks``         ``nn.Module._forward_hooks`` & co.,    every module called through
                         ``nn.modules.module._global_*_hooks``  ``nn.Module.__call__`` (slower, same)
=======================  =====================================  =========================================

Adding one: a ``_has_<feature>()`` check, an entry in ``AVAILABLE``, a function
here that branches on it, and a case in tests/test_compat.py.
"""
from __future__ import annotations

import functools
import os

import torch
from torch import nn

#: Set to 1 to use every public fallback (the compatibility check runs both ways).
PUBLIC_ENV = "RODE_TORCH_PUBLIC"
FORCE_PUBLIC = os.environ.get(PUBLIC_ENV, "").strip().lower() in ("1", "true", "yes", "on")

_HOOK_ATTRS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = tuple("_global" + a for a in _HOOK_ATTRS)


def _has_execution_engine() -> bool:
    engine = getattr(torch.autograd.Variable, "_execution_engine", None)
    return callable(getattr(engine, "run_backward", None))


def _has_foreach(name: str) -> bool:
    return callable(getattr(torch, name, None))


def _has_fused_check() -> bool:
    try:
        from torch.optim.optimizer import _device_dtype_check_for_fused  # noqa: F401
    except ImportError:
        return False
    return True


def _has_tracing_state() -> bool:
    return callable(getattr(getattr(torch, "_C", None), "_get_tracing_state", None))


def _has_module_hooks() -> bool:
    m = nn.Linear(1, 1)
    return (all(isinstance(getattr(m, a, None), dict) for a in _HOOK_ATTRS)
            and all(isinstance(getattr(nn.modules.module, g, None), dict) for g in _GLOBAL_HOOKS))


#: Which private feature this torch has *and* rode uses (False: its public fallback runs).
AVAILABLE: dict[str, bool] = {
    "execution_engine": _has_execution_engine(),
    "foreach_copy": _has_foreach("_foreach_copy_"),
    "foreach_add": _has_foreach("_foreach_add_"),
    "fused_check": _has_fused_check(),
    "tracing_state": _has_tracing_state(),
    "module_hooks": _has_module_hooks(),
}
if FORCE_PUBLIC:
    AVAILABLE = dict.fromkeys(AVAILABLE, False)

# ---------------------------------------------------------------- autograd


def _grad(output, inputs, grad):
    return torch.autograd.grad(output, inputs, grad, allow_unused=True)


if AVAILABLE["execution_engine"]:
    _ENGINE = torch.autograd.Variable._execution_engine

    def vjp(output: torch.Tensor, inputs: list, grad: torch.Tensor) -> tuple:
        """``torch.autograd.grad(output, inputs, grad, allow_unused=True)``, the graph
        freed. Where ``grad`` matches ``output`` in shape, dtype and device (every
        backward step of the adjoint), the autograd engine is called directly: the
        same computation without ``autograd.grad``'s Python-side argument checks, a
        measurable part of a step at small widths (docs/benchmarks.md)."""
        if (grad.shape == output.shape and grad.dtype == output.dtype
                and grad.device == output.device and output.grad_fn is not None):
            return _ENGINE.run_backward((output,), (grad,), False, False, tuple(inputs), True, False)
        return _grad(output, inputs, grad)
else:
    def vjp(output: torch.Tensor, inputs: list, grad: torch.Tensor) -> tuple:
        """``torch.autograd.grad(output, inputs, grad, allow_unused=True)``, the graph freed."""
        return _grad(output, inputs, grad)

# ---------------------------------------------------------------- multi-tensor ops


def foreach_copy_(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """``d.copy_(s)`` for each pair: one kernel call where torch has it."""
    if AVAILABLE["foreach_copy"]:
        torch._foreach_copy_(dst, src)
    else:
        for d, s in zip(dst, src, strict=True):
            d.copy_(s)


def foreach_add_(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """``d.add_(s)`` for each pair: one kernel call where torch has it."""
    if AVAILABLE["foreach_add"]:
        torch._foreach_add_(dst, src)
    else:
        for d, s in zip(dst, src, strict=True):
            d.add_(s)

# ---------------------------------------------------------------- optimizers


@functools.lru_cache(maxsize=None)
def _fused_probe(inner: type, device: torch.device, dtype: torch.dtype) -> bool:
    try:
        p = torch.zeros(1, device=device, dtype=dtype, requires_grad=True)
        p.grad = torch.zeros_like(p)
        inner([p], fused=True).step()
    except (RuntimeError, ValueError, TypeError):
        return False
    return True


def fused_supported(inner: type, p: torch.Tensor) -> bool:
    """Whether ``inner(..., fused=True)`` steps ``p`` (its device and dtype): the check
    torch's fused optimizers make at their first step, made now."""
    if AVAILABLE["fused_check"]:
        from torch.optim.optimizer import _device_dtype_check_for_fused
        try:
            _device_dtype_check_for_fused(p)
        except RuntimeError:
            return False
        return True
    return _fused_probe(inner, p.device, p.dtype)

# ---------------------------------------------------------------- module calls


def hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` does more than call its ``forward``: it has a
    hook, or was compiled with ``module.compile()``. Without the private hook
    dictionaries: always (every module is called as it is; the same results)."""
    if not AVAILABLE["module_hooks"]:
        return True
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks
                or getattr(module, "_compiled_call_impl", None) is not None)


def global_hooks() -> bool:
    """Whether a global module hook is set (always, without the private dictionaries)."""
    if not AVAILABLE["module_hooks"]:
        return True
    g = nn.modules.module
    return bool(g._global_forward_hooks or g._global_forward_pre_hooks
                or g._global_backward_hooks or g._global_backward_pre_hooks)


def is_tracing() -> bool:
    """Whether a ``torch.jit.trace`` is recording."""
    if AVAILABLE["tracing_state"]:
        return torch._C._get_tracing_state() is not None
    return bool(torch.jit.is_tracing())

# ---------------------------------------------------------------- optional packages


def require_torchvision(what: str) -> None:
    """A one-line ConfigError where torchvision (the optional ``vision`` extra) is not
    installed: ``what`` (e.g. ``dataset=cifar10``) needs it."""
    import importlib.util

    from .errors import ConfigError

    if importlib.util.find_spec("torchvision") is None:
        raise ConfigError(f"{what} needs torchvision, which is not installed: "
                          f"pip install 'rode[vision]' (or the torchvision that matches your torch)")
