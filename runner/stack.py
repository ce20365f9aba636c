"""ResidualStack: N residual functions integrated as an ODE from t=0 to t≈1."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from .gradmodes import GradMode, get_grad_mode
from .integrators import Integrator, get_integrator
from .walk import Structure, compose, hooks_anywhere, modules_of, plain_call

_BatchNorm = nn.modules.batchnorm._BatchNorm
_Dropout = nn.modules.dropout._DropoutNd
_SPECIAL = (_BatchNorm, _Dropout)
_SEQUENTIAL_FORWARD = nn.Sequential.forward


def _draws(dropout: nn.Module) -> bool:
    """Whether a dropout module draws random numbers when called: in training mode
    with p > 0 (at p = 0 torch returns its input without drawing). Should a module
    draw anyway, the adjoint's guard sees the random state move and replays."""
    return dropout.training and dropout.p > 0


def depth_step(depth: int, alpha: float = 1.0) -> float:
    """The step h = N^(-alpha) of a stack of N residual functions: the one place the
    residual scaling is computed. alpha = 1 is the ODE view (h = 1/N, exactly
    ``1.0 / depth``, so results are unchanged), alpha = 1/2 Depth-muP's 1/sqrt(N),
    alpha = 0 the standard ResNet (h = 1)."""
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha!r} must be in [0, 1] (the step is depth**-alpha)")
    if depth < 1:
        raise ValueError(f"depth={depth} must be >= 1")
    if alpha == 1.0:
        return 1.0 / depth
    return float(depth) ** -alpha


def set_alpha(model: nn.Module, alpha: float = 1.0) -> None:
    """Give every ResidualStack of ``model`` the step N^(-alpha) (N: its number of
    residual functions) and remember ``alpha`` on it (``stack.alpha``)."""
    for m in model.modules():
        if isinstance(m, ResidualStack):
            m.alpha = float(alpha)
            m.step_size = depth_step(m.depth, alpha)


@dataclass
class Layout:
    """The structure of a stack as one pass needs it, found in one walk over its
    modules (at depth 1000, thousands of them: one walk per pass, not one per use).

    Attributes:
        calls: for each function index, a callable equal to calling the function
            (a plain list: indexing an ``nn.ModuleList`` costs more than the call
            it serves at small widths), without
            ``nn.Module.__call__``'s dispatch where it would only call ``forward``
            (an ``nn.Sequential``'s children composed, each module's ``forward``);
            a module with hooks, and every module under a global hook or while
            tracing, is called as it is.
        parameters: the trainable parameters of the stack, distinct, in
            ``stack.parameters()`` order.
        of_function: for each function index, the distinct trainable parameters of
            that function (tied functions share one list).
        batchnorms: the functions' BatchNorm modules (see :meth:`recomputing`).
        dropouts: the functions' dropout modules.
        dropout: whether one of them draws random numbers now (training mode and
            p > 0: read at each use, so a flag or a p changed since the walk is seen).
    """

    calls: list
    parameters: list
    of_function: list
    batchnorms: list
    dropouts: list

    @property
    def dropout(self) -> bool:
        return any(map(_draws, self.dropouts))


class ResidualStack(nn.Module):
    """A ResNet seen as an ODE solver: x_{n+1} = x_n + h f_n(x_n) (Euler), Heun, or
    an exactly invertible scheme (reversible Heun, momentum).

    Args:
        functions: the residual functions, one per layer. Repeating the same
            module means tied weights (parameters are shared, not copied).
        method: ``"euler"``, ``"heun"``, ``"rev_heun"`` (reversible Heun: the
            adjoint's gradient is exact), ``"momentum"`` (momentum ResNet,
            γ = 0.9; ``Momentum(gamma=...)`` for another), or an :class:`Integrator`.
        grad: ``"backprop"`` (store every activation) or ``"adjoint"`` (store only
            the output; rebuild activations backward in the backward pass), or a
            :class:`GradMode` instance (e.g. with options).
        step_size: defaults to N^(-alpha) with N = len(functions) (1/N, as in the
            paper, with the default ``alpha=1``; :func:`depth_step`); a finite
            number > 0 otherwise.
        alpha: the residual scaling: step N^(-alpha); 1 by default.
        preserve_rng: replay the random numbers of each function call when the
            adjoint evaluates it again (dropout masks, ``torch.randn_like``...):
            each call then draws from its own seeded stream (the CPU generator's,
            and the CUDA device's of the input), the same in the forward pass and
            in the rebuild. ``None`` (default) turns it on when a dropout module
            in training mode with p > 0 is present; ``True`` always. Whatever the value, an
            adjoint pass whose forward pass drew random numbers without replay
            (randomness not from ``nn.Dropout``) is run again with replay on, and
            replay stays on for this stack from then on: the gradient is exact,
            never silently off. Not covered: random numbers drawn from a
            ``torch.Generator`` of your own (pass none to the functions, or use
            backprop). Backprop needs no replay (nothing is evaluated again).

    Any input shape works, as long as each function maps it to its own shape.
    """

    def __init__(
        self,
        functions: Sequence[nn.Module],
        method: str | Integrator = "euler",
        grad: str | GradMode = "backprop",
        step_size: float | None = None,
        preserve_rng: bool | None = None,
        alpha: float = 1.0,
    ):
        super().__init__()
        functions = list(functions)
        self.integrator = get_integrator(method)
        self.grad_mode = get_grad_mode(grad)
        if len(functions) < self.integrator.min_functions:
            raise ValueError(
                f"method={self.integrator.name} needs at least "
                f"{self.integrator.min_functions} residual functions, got {len(functions)}"
            )
        multiple = self.integrator.function_multiple
        if len(functions) % multiple:
            raise ValueError(
                f"method={self.integrator.name} needs a multiple of {multiple} residual "
                f"functions, got {len(functions)}"
            )
        # ModuleList keeps repeated modules in place; parameters() still deduplicates.
        self.functions = nn.ModuleList(functions)
        self.alpha = float(alpha)
        if step_size is None:
            step_size = depth_step(len(functions), alpha)
        elif (isinstance(step_size, bool) or not isinstance(step_size, (int, float))
              or not math.isfinite(step_size) or step_size <= 0):
            raise ValueError(f"step_size={step_size!r} must be a finite number > 0, or None "
                             "(len(functions) ** -alpha)")
        self.step_size = float(step_size)
        self.preserve_rng = preserve_rng
        self._roundtrip: torch.Tensor | None = None   # set by Adjoint's self-check

    # ----------------------------------------------------------------- basics
    @property
    def depth(self) -> int:
        return len(self.functions)

    @property
    def num_steps(self) -> int:
        return self.integrator.num_steps(len(self.functions))

    def extra_repr(self) -> str:
        return (f"depth={self.depth}, method={self.integrator.name}, "
                f"grad={self.grad_mode.name}, step_size={self.step_size:g}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The grad modes see one state tensor: x itself, or an augmented state
        # (rev_heun, momentum) that autograd maps to and from x outside them.
        integrator = self.integrator
        return integrator.output(self.grad_mode(self, integrator.init_state(x)))

    def __getstate__(self) -> dict:
        # The cached walk holds calls bound to these very modules: a copy walks anew.
        state = super().__getstate__()
        state = dict(state)
        state.pop("_walked", None)
        return state

    def walked(self) -> tuple[Structure, Layout]:
        """The stack's :class:`~runner.walk.Structure` and :class:`Layout` now.

        Walked once and kept while :meth:`Structure.unchanged` holds: a module
        added or replaced, a parameter or buffer registered or replaced,
        ``requires_grad`` switched, a hook registered, a module compiled or its
        ``forward`` replaced, a training flag switched: each makes the next pass
        walk again (docs/benchmarks.md: what the cache saves at depth 1000)."""
        cached = self.__dict__.get("_walked")
        if cached is not None and cached[0].unchanged():
            return cached
        structure = Structure(self)
        cached = (structure, self._layout())
        self.__dict__["_walked"] = cached
        return cached

    def layout(self) -> Layout:
        """The stack's structure now (see :class:`Layout`): kept between passes
        while it holds (see :meth:`walked`)."""
        return self.walked()[1]

    def _layout(self) -> Layout:
        """The stack's structure now (see :class:`Layout`), from one walk."""
        functions = list(self.functions)
        params, seen = [], set()          # the stack's trainable parameters
        special = []                      # BatchNorm and dropout modules (may repeat)
        plain = hooks_anywhere()          # then every module is called as it is

        def visit(m, mine: list):
            """Collect m's trainable parameters into ``mine`` (and the stack's),
            note it if BatchNorm or dropout, walk its children; return what
            evaluates m."""
            if isinstance(m, _SPECIAL):
                special.append(m)
            for p in m._parameters.values():
                if p is None or not p.requires_grad:
                    continue
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
                    mine.append(p)
                elif all(q is not p for q in mine):   # met in another function too
                    mine.append(p)
            children = m._modules.values()
            if plain or not plain_call(m):
                for c in children:
                    if c is not None:
                        visit(c, mine)
                return m
            if type(m).forward is _SEQUENTIAL_FORWARD:
                return compose([visit(c, mine) for c in children if c is not None])
            for c in children:
                if c is not None:
                    visit(c, mine)
            return m.forward

        # The stack's own parameters come first, as in parameters().
        for p in [*self._parameters.values(), *self.functions._parameters.values()]:
            if p is not None and p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        known: dict[int, tuple] = {}      # id(function) -> (its parameters, its call)
        of_function, calls = [], []
        for f in functions:
            entry = known.get(id(f))
            if entry is None:
                mine: list = []
                entry = known[id(f)] = (mine, visit(f, mine))
            of_function.append(entry[0])
            calls.append(entry[1])
        batchnorms = [m for m in dict.fromkeys(special) if isinstance(m, _BatchNorm)]
        for name, child in self._modules.items():   # modules a subclass added
            if name != "functions" and child is not None:
                visit(child, [])
        dropouts = [m for m in dict.fromkeys(special) if isinstance(m, _Dropout)]
        return Layout(calls, params, of_function, batchnorms, dropouts)

    @property
    def last_roundtrip_error(self) -> float | None:
        """||x̃_0 - x_0|| / ||x_0|| measured by the adjoint's self-check at the last
        backward pass (x̃_0 rebuilt backward from the output; with anchors, the
        largest such error over the segments), or None when not measured."""
        value = self._roundtrip
        return None if value is None else float(value)

    # ------------------------------------------------- one step, two directions
    def new_pass_seed(self, layout: Layout | None = None) -> int | None:
        """Draw the seed that makes this pass's randomness replayable (or None).
        ``layout``: the pass's :meth:`layout`, where the caller has one."""
        wanted = self.preserve_rng
        if wanted is None:
            wanted = layout.dropout if layout is not None else any(
                isinstance(m, _Dropout) and _draws(m) for m in modules_of(self))
        if not wanted and not self.__dict__.get("_random", False):
            return None
        return int(torch.randint(0, 2**62, (1,)).item())

    def caller(self, n: int, seed: int | None, functions: list | None = None):
        """``call(i, x)`` for step n: evaluates function i, with replayable RNG.
        Without a seed the same call serves every step. ``functions``: what
        evaluates each function (:attr:`Layout.calls`), where the caller has it."""
        if functions is None:
            functions = self.functions
        if seed is None:
            return lambda i, x: functions[i](x)

        stream = self.integrator.stream

        def call(i, x):
            devices = [x.device.index or 0] if x.is_cuda else []
            with torch.random.fork_rng(devices=devices):
                # One stream per (pass, step, function): the same masks whether the
                # call happens in the forward pass or in a recomputation.
                step, i_ = stream(n, i)
                torch.manual_seed((seed + 1_000_003 * (step * len(functions) + i_)) % 2**63)
                return functions[i](x)

        return call

    def step(self, n: int, x: torch.Tensor, seed: int | None = None,
             functions: list | None = None) -> torch.Tensor:
        """x_n -> x_{n+1} (states: see :meth:`Integrator.init_state`). ``functions``:
        what evaluates the functions (:attr:`Layout.calls`), where the caller has it."""
        return self.integrator.step(self.caller(n, seed, functions), n, x, self.step_size)

    def reverse_step(self, n: int, y: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """x_{n+1} -> approximately x_n, by running the scheme backward."""
        return self.integrator.reverse(self.caller(n, seed), n, y, self.step_size)

    @contextlib.contextmanager
    def recomputing(self, layout: Layout | None = None) -> Iterator[None]:
        """Recompute steps faithfully: BatchNorm stays in training mode and keeps
        using batch statistics, but its running statistics are not updated again.
        ``layout``: the pass's :meth:`layout`, where the caller has one."""
        batchnorms = layout.batchnorms if layout is not None else [
            m for m in modules_of(self.functions) if isinstance(m, _BatchNorm)]
        frozen = [m for m in batchnorms if m.training and m.track_running_stats]
        for m in frozen:
            m.track_running_stats = False   # train mode + no running stats = batch stats only
        try:
            yield
        finally:
            for m in frozen:
                m.track_running_stats = True

    # ------------------------------------------------------------ measurement
    @torch.no_grad()
    def trajectory(self, x: torch.Tensor, seed: int | None = None) -> list[torch.Tensor]:
        """All states x_0 .. x_S of the forward pass from the input x (S = num_steps).
        For rev_heun and momentum these are the augmented states;
        ``integrator.output(state)`` gives x."""
        states = [self.integrator.init_state(x)]
        for n in range(self.num_steps):
            states.append(self.step(n, states[-1], seed))
        return states

    @torch.no_grad()
    def rebuild(self, y: torch.Tensor, seed: int | None = None) -> list[torch.Tensor]:
        """States rebuilt backward from the last state y, as the adjoint does: x̃_0 .. x̃_S."""
        states = [y]
        with self.recomputing():
            for n in reversed(range(self.num_steps)):
                states.append(self.reverse_step(n, states[-1], seed))
        return states[::-1]


def roundtrip_error(model: nn.Module) -> float | None:
    """The largest ``last_roundtrip_error`` over the ResidualStacks of ``model``
    (None when none was measured: the self-check is off, or no backward pass yet)."""
    values = [m.last_roundtrip_error for m in model.modules() if isinstance(m, ResidualStack)]
    values = [v for v in values if v is not None]
    return max(values) if values else None


class ResNet(nn.Module):
    """A network around one stack: embed -> ResidualStack -> head (every model of
    ``runner.models`` and ``runner.transformer``)."""

    def __init__(self, embed: nn.Module, stack: ResidualStack, head: nn.Module):
        super().__init__()
        self.embed, self.stack, self.head = embed, stack, head

    def forward(self, x):
        return self.head(self.stack(self.embed(x)))

    def stacks(self) -> list[ResidualStack]:
        return [m for m in self.modules() if isinstance(m, ResidualStack)]
