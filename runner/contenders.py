"""The contenders of ``rode bench``: ways to get one training step's gradients
through the same N residual functions.

Each contender wraps the residual functions (shared, not copied) into a module
mapping x_0 to x_S, the output of the Euler or Heun ResNet. Every contender
computes that same function in its forward pass; they differ in what they keep
for the backward pass and so in time, memory and gradient accuracy:

- ``plain``: a plain eager loop over the same modules, with autograd: no
  stack, no grad mode, no integrator object. The floor any wrapper is compared
  with (exact, memory O(N)).
- ``backprop``: autograd through every step (exact, memory O(N)).
- ``adjoint`` / ``adjoint_shared``: the discrete adjoint, ``Adjoint(vjp="exact")``
  or ``Adjoint(vjp="shared")`` (memory O(1), approximate gradients).
- ``checkpoint``: ``torch.utils.checkpoint.checkpoint_sequential`` with about
  sqrt(S) segments (exact, memory O(sqrt N), one extra forward pass).
- ``torchdiffeq``: ``torchdiffeq.odeint_adjoint`` on the ResNet's own grid
  (``euler``, or ``heun2`` for Heun) with an ODE function that picks θ_n by time
  index: the continuous adjoint, discretised by the same scheme.
- ``memcnn``: memcnn's ``InvertibleModuleWrapper`` around each step, with the
  step run backward as its inverse (what the paper authors' code uses).

The last two are optional (the ``bench`` extra of setup.cfg); a missing one is
reported by :meth:`Contender.missing` and skipped by the benchmark.

The exact reversible schemes (``rev_heun``, ``momentum``, ``coupled``) are methods,
not contenders: ``backprop``, ``adjoint`` and ``checkpoint`` run them (``rode bench
methods=[rev_heun]``), and the adjoint's gradient is then exact. ``build`` takes
``step_size`` (default: ``depth_step(len(functions), alpha)``): a sequential
transformer block is two functions per layer, each a full step 1/depth, as in
``runner.transformer.build_transformer``.
"""
from __future__ import annotations

import functools
import importlib.util
import math
from typing import Sequence

import torch
from torch import nn

from . import names
from .gradmodes import Adjoint
from .integrators import get_integrator
from .stack import ResidualStack, depth_step


class Contender:
    """A way to differentiate through the residual functions."""

    name = ""
    description = ""
    methods: tuple[str, ...] = ("euler", "heun")
    requires: str | None = None   # an optional package, from the `bench` extra
    exact = True                  # gradients equal backprop's up to rounding

    def missing(self) -> str | None:
        """Why this contender cannot run here (a missing package), or None."""
        if self.requires and importlib.util.find_spec(self.requires) is None:
            return (f"{self.name} skipped: the optional package {self.requires!r} is not "
                    f"installed (pip install -e '.[bench]')")
        return None

    def build(self, functions: Sequence[nn.Module], method: str, **options) -> nn.Module:
        """A module x_0 -> x_S over ``functions`` (the same objects, so the same
        parameters, for every contender)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


EVERY_METHOD = ("euler", "heun", "rev_heun", "momentum", "coupled")


def _step(functions, alpha: float, step_size: float | None) -> float:
    """The step a contender takes: ``step_size`` where given, else ResidualStack's default
    (``depth_step(len(functions), alpha)``)."""
    return step_size if step_size is not None else depth_step(len(functions), alpha)


class _PlainLoop(nn.Module):
    """x_0 -> x_S by a bare Python loop over the functions: Euler or Heun with
    step 1/N, written out as a user would."""

    def __init__(self, functions, method, alpha: float = 1.0, step_size: float | None = None):
        super().__init__()
        self.functions = nn.ModuleList(functions)
        self.heun = method == "heun"
        self.h = _step(functions, alpha, step_size)

    def forward(self, x):
        fs = list(self.functions)
        h = self.h
        if not self.heun:
            for f in fs:
                x = x + h * f(x)
            return x
        half = 0.5 * h
        for f, g in zip(fs[:-1], fs[1:], strict=True):
            k1 = f(x)
            k2 = g(x + h * k1)
            x = x + half * (k1 + k2)
        return x


class PlainContender(Contender):
    name = "plain"
    description = "a plain eager loop over the same modules, with autograd (the floor)"

    def build(self, functions, method, alpha: float = 1.0, step_size: float | None = None,
              **options):
        return _PlainLoop(functions, method, alpha, step_size)


class BackpropContender(Contender):
    name = "backprop"
    description = "autograd through every step"
    methods = EVERY_METHOD

    def build(self, functions, method, alpha: float = 1.0, step_size: float | None = None,
              **options):
        return ResidualStack(functions, method, "backprop", alpha=alpha, step_size=step_size)


class AdjointContender(Contender):
    """The discrete adjoint of :class:`runner.gradmodes.Adjoint`."""

    exact = False                 # except with rev_heun and momentum
    methods = EVERY_METHOD

    def __init__(self, vjp: str):
        self.vjp = vjp
        self.name = "adjoint" if vjp == "exact" else f"adjoint_{vjp}"
        self.description = f"discrete adjoint, Adjoint(vjp={vjp!r})"

    def build(self, functions, method, compile: bool = False, alpha: float = 1.0,
              step_size: float | None = None, **options):
        return ResidualStack(functions, method, Adjoint(vjp=self.vjp, compile=compile), alpha=alpha,
                             step_size=step_size)


class _Checkpointed(nn.Module):
    def __init__(self, functions, method, alpha: float = 1.0, step_size: float | None = None):
        super().__init__()
        self.stack = ResidualStack(functions, method, "backprop", alpha=alpha, step_size=step_size)
        self.segments = max(1, round(math.sqrt(self.stack.num_steps)))

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint_sequential

        seed = self.stack.new_pass_seed()
        steps = [functools.partial(self.stack.step, n, seed=seed)
                 for n in range(self.stack.num_steps)]
        integrator = self.stack.integrator   # rev_heun, momentum: augmented states
        return integrator.output(checkpoint_sequential(
            steps, self.segments, integrator.init_state(x), use_reentrant=False))


class CheckpointContender(Contender):
    name = "checkpoint"
    description = "torch.utils.checkpoint.checkpoint_sequential, ~sqrt(N) segments"
    methods = EVERY_METHOD

    def build(self, functions, method, alpha: float = 1.0, step_size: float | None = None,
              **options):
        return _Checkpointed(functions, method, alpha, step_size)


class IndexedField(nn.Module):
    """dx/dt = f_n(x) with n = round(t/h), clipped to the layers: θ(t) piecewise
    constant on the ResNet's grid, so that an Euler (or Heun) solver on the grid
    t_n = n h reproduces the ResNet's forward pass."""

    def __init__(self, functions: Sequence[nn.Module], h: float):
        super().__init__()
        self.functions = nn.ModuleList(functions)
        self.h = h

    def forward(self, t, x):
        n = min(max(round(t.detach().item() / self.h), 0), len(self.functions) - 1)
        return self.functions[n](x)


class _ODEAdjoint(nn.Module):
    _SOLVER = {"euler": "euler", "heun": "heun2"}   # heun2: Heun's (trapezoid) tableau

    def __init__(self, functions, method, alpha: float = 1.0, step_size: float | None = None):
        super().__init__()
        integrator = get_integrator(method)
        self.h = _step(functions, alpha, step_size)
        self.steps = integrator.num_steps(len(functions))
        self.field = IndexedField(functions, self.h)
        self.solver = self._SOLVER[integrator.name]

    def forward(self, x):
        from torchdiffeq import odeint_adjoint

        steps = self.steps

        def grid(func, y0, t):   # the ResNet's S steps, forward and (reversed) backward
            return torch.linspace(float(t[0]), float(t[-1]), steps + 1,
                                  dtype=t.dtype, device=t.device)

        t = torch.tensor([0.0, steps * self.h], dtype=x.dtype, device=x.device)
        options = {"grid_constructor": grid}
        return odeint_adjoint(self.field, x, t, method=self.solver, options=options,
                              adjoint_options=dict(options))[-1]


class TorchdiffeqContender(Contender):
    name = "torchdiffeq"
    description = "torchdiffeq.odeint_adjoint, fixed grid of the ResNet's steps"
    requires = "torchdiffeq"
    exact = False

    def build(self, functions, method, alpha: float = 1.0, step_size: float | None = None,
              **options):
        return _ODEAdjoint(functions, method, alpha, step_size)


class _InvertibleStep(nn.Module):
    """Step n of the ResNet with ``inverse`` = the step run backward (approximate).
    Holds only the functions this step uses, so memcnn differentiates only their
    parameters."""

    def __init__(self, functions, integrator, n: int, h: float):
        super().__init__()
        self.indices = integrator.functions_of_step(n)
        self.parts = nn.ModuleList(functions[i] for i in self.indices)
        self.integrator, self.n, self.h = integrator, n, h

    def _call(self, i, x):
        return self.parts[self.indices.index(i)](x)

    def forward(self, x):
        return self.integrator.step(self._call, self.n, x, self.h)

    def inverse(self, y):
        return self.integrator.reverse(self._call, self.n, y, self.h)


class _MemcnnStack(nn.Module):
    def __init__(self, functions, method, alpha: float = 1.0, step_size: float | None = None):
        super().__init__()
        from memcnn import InvertibleModuleWrapper

        integrator = get_integrator(method)
        h = _step(functions, alpha, step_size)
        self.steps = nn.ModuleList(
            InvertibleModuleWrapper(_InvertibleStep(functions, integrator, n, h), keep_input=False)
            for n in range(integrator.num_steps(len(functions))))

    def forward(self, x):
        # memcnn frees each step's input storage (and refills it in the backward
        # pass): give it a copy, not the caller's batch.
        import warnings

        x = x.clone()
        with warnings.catch_warnings():   # memcnn's use of the deprecated TypedStorage
            warnings.simplefilter("ignore", UserWarning)
            for step in self.steps:
                x = step(x)
        return x


class MemcnnContender(Contender):
    name = "memcnn"
    description = "memcnn.InvertibleModuleWrapper around each step"
    requires = "memcnn"
    exact = False

    def build(self, functions, method, alpha: float = 1.0, step_size: float | None = None,
              **options):
        import warnings

        with warnings.catch_warnings():   # memcnn's torch.cuda.amp deprecation notices
            warnings.simplefilter("ignore", FutureWarning)
            return _MemcnnStack(functions, method, alpha, step_size)


CONTENDERS: dict[str, Contender] = {c.name: c for c in [
    PlainContender(), BackpropContender(), AdjointContender("exact"), AdjointContender("shared"),
    CheckpointContender(), TorchdiffeqContender(), MemcnnContender(),
]}
names.agree(CONTENDERS, names.CONTENDERS, "CONTENDERS")
