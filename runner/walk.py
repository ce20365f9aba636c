"""Walking modules fast: ``module.modules()`` and ``module.parameters()`` without
nn.Module's generators, and calling a module without ``nn.Module.__call__``'s
dispatch where it would do nothing.

The grad modes walk a stack's modules and parameters at every pass, and call its
residual functions several times a step: thousands of each at depth 1000, where
this overhead shows in the step time. Same order, deduplication and results as
the generators and the calls.
"""
from __future__ import annotations

import itertools
import operator

from torch import nn
from torch.utils.hooks import RemovableHandle

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


_MODULE_CALL = nn.Module.__call__


def plain_call(module: nn.Module) -> bool:
    """Whether calling ``module`` is calling its class's ``forward``: its class
    keeps ``nn.Module.__call__``, it has no hooks, is not compiled, and no
    ``forward`` was set on the instance. Otherwise it must be called as it is."""
    return (type(module).__call__ is _MODULE_CALL and not hooked(module)
            and "forward" not in module.__dict__)


_chain = itertools.chain.from_iterable
_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_TRAINING = operator.attrgetter("training")
_MODULES = operator.attrgetter("_modules")
_PARAMETERS = operator.attrgetter("_parameters")
_BUFFERS = operator.attrgetter("_buffers")
_REPEAT_FORWARD = itertools.repeat("forward")
_REPEAT_COMPILED = itertools.repeat("_compiled_call_impl")


def _signatures(modules: list) -> tuple:
    """What of each module, besides its class and hooks, decides how it is called,
    read without a Python call per module: its instance ``forward`` and its
    compiled call (``module.compile()``), or None."""
    dicts = list(map(vars, modules))
    return (list(map(dict.get, dicts, _REPEAT_FORWARD)),
            list(map(dict.get, dicts, _REPEAT_COMPILED)))


def hook_count() -> int:
    """How many hooks were ever registered in this process (each
    ``register_*hook`` of torch makes a ``RemovableHandle``, which numbers them)."""
    return RemovableHandle.next_id


class Structure:
    """What a walk of ``root`` found: its modules, parameters and buffers, and
    what decides how each module is called; :meth:`unchanged` says, much faster
    than walking again, whether a new walk would find the same.

    The check is sound: it compares, module by module, the objects registered in
    ``_modules``, ``_parameters`` and ``_buffers`` (by identity, in order: so a
    module or tensor added, removed, replaced or moved is seen), each module's
    class (its ``forward``, ``__call__``), its hooks, a compiled call or an
    instance ``forward``, its training flag, each parameter's ``requires_grad``,
    and the global module hooks and tracing state. The root's own hooks are not
    part of it (what is under the root is walked; the root is called by its
    owner). Strong references to everything found are held, so no identity can
    be reused while the structure is kept."""

    def __init__(self, root: nn.Module):
        self.root = root
        self.modules = mods = modules_of(root)
        self.types = list(map(type, mods))
        self.children = _slots(list(map(_MODULES, mods)))
        self.slots = _slots(list(map(_PARAMETERS, mods)))
        self.buffer_slots = _slots(list(map(_BUFFERS, mods)))
        self.parameters = [p for p in self.slots[2] if p is not None]
        self.buffers = [b for b in self.buffer_slots[2] if b is not None]
        self.requires_grad = list(map(_REQUIRES_GRAD, self.parameters))
        below = mods[1:]   # the root's own hooks are its owner's business
        self.signatures = _signatures(below)
        self.hooks = hook_count()
        self.hooked = [hooked(m) for m in below]
        self.training = list(map(_TRAINING, mods))
        self.anywhere = hooks_anywhere()

    def unchanged(self) -> bool:
        """Whether a walk now would find what this one found (see the class)."""
        mods = self.modules
        return (hooks_anywhere() == self.anywhere and hook_count() == self.hooks
                and list(map(_TRAINING, mods)) == self.training
                and list(map(type, mods)) == self.types
                and _same_slots(list(map(_MODULES, mods)), self.children)
                and _same_slots(list(map(_PARAMETERS, mods)), self.slots)
                and _same_slots(list(map(_BUFFERS, mods)), self.buffer_slots)
                and list(map(_REQUIRES_GRAD, self.parameters)) == self.requires_grad
                # instance forwards and compiled calls by identity
                and _signatures(mods[1:]) == self.signatures)


def _slots(dicts: list) -> tuple:
    """(the dicts' lengths, their names, their values), each flat, in order."""
    return (list(map(len, dicts)), list(_chain(dicts)), list(_chain(map(dict.values, dicts))))


def _same_slots(dicts: list, slots: tuple) -> bool:
    """Whether each dict holds the same names, in order, bound to the same objects
    (tensors compare by identity here, never by value)."""
    lengths, names, values = slots
    if list(map(len, dicts)) != lengths or list(_chain(dicts)) != names:
        return False
    return all(map(operator.is_, _chain(map(dict.values, dicts)), values))
