"""What the adjoint's backward pass relies on, recorded in the forward pass and
checked before the rebuild.

The adjoint evaluates the residual functions again in the backward pass: it
assumes that the functions, their parameters and their state are what they were
in the forward pass. Backprop raises or stays right where these assumptions
break; the adjoint would return a wrong gradient. So the forward pass records,
cheaply (version counters, training flags, the stack's structure, the random
state), what the rebuild needs, and the backward pass refuses with one
:class:`AdjointStateError` naming the cause and the remedy. Randomness is not
refused: where the forward pass drew random numbers without replay, it is run
again with replay on (see :func:`rng_state`), so the rebuild draws them again.
"""
from __future__ import annotations

import operator

import torch
from torch import nn

_BatchNorm = nn.modules.batchnorm._BatchNorm
_VERSION = operator.attrgetter("_version")

BACKPROP = "or use grad='backprop' (it keeps every activation instead of rebuilding them)"


class AdjointStateError(RuntimeError):
    """The adjoint's backward pass would rebuild the forward pass from a stack
    that is no longer what the forward pass ran, and return a wrong gradient."""


# ------------------------------------------------------------------ randomness
def rng_state(x: torch.Tensor) -> tuple:
    """The random state that calls on ``x``'s device draw from: the CPU
    generator's, and the CUDA device's where ``x`` is on one."""
    cpu = torch.random.get_rng_state()
    if x.is_cuda:
        return cpu, torch.cuda.get_rng_state(x.device)
    return (cpu,)


def rng_consumed(before: tuple, x: torch.Tensor) -> bool:
    """Whether random numbers were drawn since ``before = rng_state(x)``."""
    return not all(map(torch.equal, before, rng_state(x)))


def set_rng_state(state: tuple, x: torch.Tensor) -> None:
    torch.random.set_rng_state(state[0])
    if len(state) > 1:
        torch.cuda.set_rng_state(state[1], x.device)


# --------------------------------------------------------------------- record
def _running_stats(structure) -> set:
    """ids of the running statistics of the BatchNorms in training mode: the
    forward pass updates them, the rebuild does not use them (batch statistics)
    and does not update them again (``ResidualStack.recomputing``)."""
    out = set()
    for m in structure.modules:
        if isinstance(m, _BatchNorm) and m.training and m.track_running_stats:
            out.update(id(b) for b in m._buffers.values() if b is not None)
    return out


class Record:
    """What the backward pass of one adjoint pass relies on.

    Made before the forward pass (:meth:`done` after it): the stack's structure
    (its modules, parameters and buffers, their training flags and
    ``requires_grad``: :class:`runner.walk.Structure`), the integrator and step
    size, and the version counters of the parameters and buffers (BatchNorm's
    running statistics in training mode aside)."""

    def __init__(self, stack, structure):
        self.structure = structure
        self.integrator, self.step_size = stack.integrator, stack.step_size
        skip = _running_stats(structure)
        self.tensors = [*structure.parameters,
                        *(b for b in structure.buffers if id(b) not in skip)]
        self.before = list(map(_VERSION, self.tensors))
        self.after = self.before

    def done(self) -> None:
        """The forward pass has run: record the versions it left."""
        self.after = list(map(_VERSION, self.tensors))

    def check(self, stack) -> None:
        """Raise :class:`AdjointStateError` if the rebuild would not see what the
        forward pass saw; nothing otherwise."""
        if self.after != self.before:   # the forward pass itself changed state
            names = self._names(stack, self.before, self.after)
            raise AdjointStateError(
                f"grad=adjoint: the residual functions changed {names} in the forward pass "
                "(a side effect: e.g. a counter or a cache kept in a buffer). The adjoint "
                "evaluates each function again in the backward pass (up to three times per "
                "step), so it would compute from changed state, and the state would drift. "
                "Keep the functions free of side effects on their parameters and buffers "
                f"(BatchNorm's running statistics are handled), {BACKPROP}")
        if stack.integrator is not self.integrator or stack.step_size != self.step_size:
            raise AdjointStateError(
                "grad=adjoint: the stack's method or step_size changed between the forward "
                "and the backward pass; call backward before changing them, " + BACKPROP)
        structure = self.structure
        if not structure.unchanged():
            self._structure_changed(stack)
        now = list(map(_VERSION, self.tensors))
        if now != self.after:
            names = self._names(stack, self.after, now)
            raise AdjointStateError(
                f"grad=adjoint: {names} changed in place between the forward and the "
                "backward pass (e.g. an optimizer step, or `with torch.no_grad(): p.add_(...)`, "
                "before this loss's backward). The adjoint rebuilds the forward pass from "
                "their current values and would return a wrong gradient (backprop raises "
                "here too). Call backward before changing them, " + BACKPROP)

    def _structure_changed(self, stack) -> None:
        """Raise for what changed in the structure, if it matters to the rebuild."""
        from .walk import Structure

        old, new = self.structure, Structure(stack)
        if list(map(id, old.modules)) == list(map(id, new.modules)) and \
                old.training != new.training:
            names = {id(m): n for n, m in stack.named_modules(remove_duplicate=False)}
            flipped = [repr(names.get(id(m), "?")) if names.get(id(m)) else "the stack"
                       for m, a, b in zip(new.modules, old.training, new.training, strict=True)
                       if a != b]
            shown = ", ".join(flipped[:3]) + (f" and {len(flipped) - 3} more"
                                              if len(flipped) > 3 else "")
            raise AdjointStateError(
                f"grad=adjoint: the training flag of {shown} changed between the forward and "
                "the backward pass (e.g. stack.eval() or model.train()). BatchNorm, dropout "
                "and any module reading self.training would be rebuilt in the other mode: a "
                "wrong gradient. Switch modes after backward, " + BACKPROP)
        same = (list(map(id, old.modules)) == list(map(id, new.modules))
                and old.types == new.types
                and list(map(id, old.parameters)) == list(map(id, new.parameters))
                and list(map(id, old.buffers)) == list(map(id, new.buffers))
                and old.requires_grad == new.requires_grad
                and old.signatures == new.signatures)
        if not same:
            raise AdjointStateError(
                "grad=adjoint: the stack's structure changed between the forward and the "
                "backward pass (a module or tensor added, removed or replaced, requires_grad "
                "switched, a module compiled or its forward replaced); call backward before "
                "changing the stack, " + BACKPROP)
        # Otherwise only hooks were registered somewhere: the rebuild uses the calls
        # the forward pass made, as backprop's graph does.

    def _names(self, stack, old: list, new: list) -> str:
        """'parameter "a", buffer "b"' for the tensors whose versions differ."""
        names = {id(t): f"parameter {n!r}"
                 for n, t in stack.named_parameters(remove_duplicate=False)}
        names.update({id(t): f"buffer {n!r}"
                      for n, t in stack.named_buffers(remove_duplicate=False)})
        changed = [names.get(id(t), "a tensor")
                   for t, a, b in zip(self.tensors, old, new, strict=True) if a != b]
        shown = ", ".join(changed[:3])
        return shown + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")

