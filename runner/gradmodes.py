"""How gradients flow through a ResidualStack: ordinary backprop, or the discrete adjoint.

The adjoint is made of small parts: its options (:class:`AdjointOptions`, checked
when made), the self-check's escalation policy (:class:`Escalation`), the compile
cache (:class:`CompileCache`), the check for tensors it cannot differentiate
(:class:`LeafCheck`), and the integrators' own backward steps
(:meth:`runner.integrators.Integrator.shared_vjp`).
"""
from __future__ import annotations

import logging
import math
import warnings
import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch

from . import compat, guard, names
from .errors import ConfigError
from .integrators import INTEGRATORS
from .integrators import vjp as _vjp
from .schema import ADJOINT, check_values
from .walk import parameters_of

log = logging.getLogger("rode")

DOUBLE_BACKWARD = ("grad=adjoint: the adjoint's backward pass is not differentiable "
                   "(create_graph=True / double backward); use grad=backprop for "
                   "higher-order gradients")


class GradModeOptionError(ConfigError, ValueError):
    """A bad grad-mode option: a ValueError to library callers, one line and exit
    code 2 on the command line (``adjoint.vjp=...`` in a config)."""


class GradMode:
    """Base class: ``mode(stack, x)`` runs the stack's forward pass."""

    name = ""

    def __call__(self, stack, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Backprop(GradMode):
    """Autograd through every step: exact gradients, memory O(depth)."""

    name = "backprop"

    def __call__(self, stack, x):
        layout = stack.layout()
        seed, calls, step = stack.new_pass_seed(layout), layout.calls, stack.step
        for n in range(stack.num_steps):
            x = step(n, x, seed, calls)
        return x


# ------------------------------------------------------------------ options
@dataclass(frozen=True)
class AdjointOptions:
    """The options of :class:`Adjoint` (documented there), checked when made.
    ``anchor_every`` and ``segment`` become ints, ``max_roundtrip`` a float, and
    ``roundtrip`` is on whenever ``max_roundtrip`` is set."""

    vjp: str = "exact"
    compile: bool = False
    anchor_every: int | None = None
    roundtrip: bool = False
    max_roundtrip: float | None = None
    segment: int | None = None

    VJPS: ClassVar[tuple[str, ...]] = names.VJPS

    def __post_init__(self):
        # One definition of the options: the config schema's ``adjoint`` group.
        try:
            values = check_values(ADJOINT, {k: getattr(self, k) for k in (
                "vjp", "compile", "anchor_every", "roundtrip", "max_roundtrip", "segment")},
                "adjoint", whole=True)
        except ConfigError as e:
            raise GradModeOptionError(str(e)) from None
        for key, value in values.items():
            object.__setattr__(self, key, value)
        if self.max_roundtrip is not None:
            object.__setattr__(self, "roundtrip", True)

    def changed(self) -> list[str]:
        """The options that differ from the defaults, as ``key=value`` (for repr)."""
        out = []
        if self.vjp != "exact":
            out.append(f"vjp={self.vjp!r}")
        if self.compile:
            out.append("compile=True")
        if self.anchor_every is not None:
            out.append(f"anchor_every={self.anchor_every}")
        if self.max_roundtrip is not None:
            out.append(f"max_roundtrip={self.max_roundtrip:g}")
        elif self.roundtrip:
            out.append("roundtrip=True")
        if self.segment is not None:
            out.append(f"segment={self.segment}")
        return out

    # segment=None: as many steps per segment as keep the segment's rebuilt states
    # within SEGMENT_BYTES, at most MAX_SEGMENT (docs/benchmarks.md: the measurements).
    SEGMENT_BYTES: ClassVar[int] = 1 << 18
    MAX_SEGMENT: ClassVar[int] = 8

    def segment_for(self, state: torch.Tensor) -> int:
        """Steps per autograd call of the exact vjp, for states like ``state``."""
        if self.segment is not None:
            return self.segment
        size = max(1, state.numel() * state.element_size())
        return max(1, min(self.MAX_SEGMENT, self.SEGMENT_BYTES // size))


# ------------------------------------------------------- the adjoint's parts
class Escalation:
    """The self-check's policy. When a stack's round-trip error passes
    ``max_roundtrip``, a warning is logged and that stack keeps anchors every
    ceil(sqrt(S)) steps from then on (S steps); passed again, at every step.

    One grad mode may serve several stacks: the switches are kept per stack, by
    weak reference, and are not kept by pickling or copying."""

    def __init__(self, anchor_every: int | None, max_roundtrip: float | None):
        self.anchor_every, self.max_roundtrip = anchor_every, max_roundtrip
        self._every: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # stack -> k

    def __getstate__(self) -> dict:
        return {"anchor_every": self.anchor_every, "max_roundtrip": self.max_roundtrip}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def anchor_every_of(self, stack) -> int | None:
        """The stack's anchor spacing now: the option, or what the policy switched to."""
        return self._every.get(stack, self.anchor_every)

    def record(self, stack, error: torch.Tensor) -> None:
        """Compare a measured round-trip error with the tolerance; switch the stack
        one level up where it passes (NaN passes the tolerance too)."""
        if self.max_roundtrip is None:
            return
        value = float(error)
        if value <= self.max_roundtrip:
            return
        steps = stack.num_steps
        now = self.anchor_every_of(stack)
        sqrt_steps = math.ceil(math.sqrt(steps))
        if now is None or now > sqrt_steps:
            new, what = sqrt_steps, f"anchored mode (adjoint.anchor_every={sqrt_steps})"
        elif now > 1:
            new, what = 1, "exact mode (every state kept: backprop's gradient, memory O(depth))"
        else:
            return   # every state is kept already: the gradient is exact
        self._every[stack] = new
        log.warning("adjoint self-check: round-trip error %.3g of a %s stack (%d steps) passed "
                    "adjoint.max_roundtrip=%g; that stack switches to %s from the next step on",
                    value, stack.integrator.name, steps, self.max_roundtrip, what)


class CompileCache:
    """``torch.compile`` per residual function, made on first use. Where compiling
    fails: a warning, and eager evaluation from then on. Pickling or copying keeps
    the failure, not the compiled functions."""

    def __init__(self, failed: bool = False):
        self.failed = failed
        self._compiled: dict[int, object] = {}   # id(function) -> compiled function

    def __getstate__(self) -> dict:
        return {"failed": self.failed}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def caller(self, functions):
        """``call(i, x)`` evaluating ``functions[i]`` compiled (or eagerly)."""
        def call(i, x):
            f = functions[i]
            if self.failed:
                return f(x)
            compiled = self._compiled.get(id(f))
            if compiled is None:
                compiled = self._compiled[id(f)] = torch.compile(f, dynamic=False)
            try:
                return compiled(x)
            except Exception as e:   # no compiler, unsupported op...: run eagerly
                self.failed = True
                warnings.warn(f"adjoint.compile: torch.compile failed ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); "
                              "running eagerly", RuntimeWarning, stacklevel=2)
                return f(x)

        return call


class LeafCheck:
    """Refuses residual functions whose gradient the adjoint would silently drop.

    The adjoint differentiates each function with respect to its input and its
    own parameters. A function that also uses another tensor requiring grad (one
    captured in a closure, a parameter of a module outside the function) would get
    no gradient there, where backprop gives one. Each function is checked once
    (per grad mode), at its first evaluation with a graph in a backward pass: its
    graph is walked back to the leaves, stopping at the input."""

    def __init__(self):
        self._checked: weakref.WeakSet = weakref.WeakSet()   # functions found fine

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def pending(self, stack) -> dict:
        """{i: function} for the functions of the stack not checked yet."""
        return {i: f for i, f in enumerate(stack.functions) if f not in self._checked}

    def checking(self, call, pending: dict):
        """``call`` that checks the pending functions it evaluates with a graph."""
        def checked(i, x):
            out = call(i, x)
            if i in pending and torch.is_grad_enabled():
                f = pending.pop(i)
                if f not in self._checked:
                    self.verify(i, f, x, out)
                    self._checked.add(f)
            return out

        return checked

    @staticmethod
    def verify(i: int, function, x: torch.Tensor, out: torch.Tensor) -> None:
        """Raise ValueError if ``out = function(x)`` reaches a leaf requiring grad
        that is neither x nor one of the function's parameters."""
        known = {id(p) for p in function.parameters()}
        stop = x.grad_fn
        seen = {}   # id(node) -> node, kept alive while walking
        todo = [] if out.grad_fn is None else [out.grad_fn]
        while todo:
            node = todo.pop()
            if node is stop:
                continue
            leaf = getattr(node, "variable", None)   # AccumulateGrad: a leaf tensor
            if leaf is not None:
                if leaf is not x and id(leaf) not in known:
                    raise ValueError(
                        f"grad=adjoint: residual function {i} ({type(function).__name__}) uses a "
                        f"tensor that requires grad but is not one of its parameters (shape "
                        f"{list(leaf.shape)}; e.g. captured in a closure, or a parameter of a "
                        "module outside the function), whose gradient the adjoint would leave "
                        "None. Register it as an nn.Parameter of the residual function, or use "
                        "grad=backprop")
                continue
            for child, _ in node.next_functions:
                if child is not None and id(child) not in seen:
                    seen[id(child)] = child
                    todo.append(child)


# ------------------------------------------------------------------ adjoint
class Adjoint(GradMode):
    """The memory-free discrete adjoint (Sander et al., 2022).

    The forward pass keeps only the output x_N (and the anchors, with
    ``anchor_every``). The backward pass walks the steps
    in reverse; each backward step rebuilds x_n from x_{n+1} by running the
    integrator backward and back-propagates the gradient through step n.
    Activation memory is O(1) in depth; gradients are approximate, with an error
    that falls with depth when the residual functions are small steps.

    Args:
        vjp: how each backward step gets its vector-Jacobian product.

            - ``"exact"`` (default): rebuild x_n, then the exact vjp of the forward
              step taken at the rebuilt x_n. Each function is evaluated twice per
              backward step (rebuild, then recompute with a graph): about 5/3 of
              backprop's compute.
            - ``"shared"``: one evaluation per function serves both the rebuild
              and the vjp. With Euler, f(x_{n+1}) gives x_n = x_{n+1} - h f(x_{n+1})
              and its graph gives the vjp at x_{n+1} instead of x_n; Heun reuses
              its two reverse stages likewise. About 4/3 of backprop's compute;
              the vjp is taken O(h) (Euler) or O(h²) (Heun) away from the rebuilt
              point, which keeps the integrator's order but changes the constant.
              With rev_heun and momentum the rebuild is exact and so is the
              shared vjp: backprop's gradient at about 4/3 of its compute.
        compile: evaluate the residual functions through ``torch.compile`` (off by
            default). Falls back to eager, with a warning, where compiling fails;
            not used when dropout randomness must be replayed.
        segment: with ``vjp="exact"``, how many backward steps share one autograd
            call (the gradient is the same, to rounding: each step's vjp is still
            taken at its own rebuilt state). The segment's K steps are rebuilt
            first, then evaluated once more with one graph through all K, and one
            ``autograd.grad`` takes their vjps together: fewer calls into autograd,
            which decide the time when the layers are small, for K rebuilt states
            and K steps' activations held at once (memory O(K), still flat in
            depth). None (default): K = 256 KiB / the state's bytes, between 1
            and 8 (8 at width 64 and batch 64 in float32, 1 from 64k floats per
            state up: where the step's arithmetic, not the call, decides the
            time); 1: one call per step.
        anchor_every: keep every k-th state of the forward pass (x_0, x_k, x_2k...)
            as anchors: memory O(N/k). The backward pass rebuilds inside each
            segment only: at an anchor, the stored state replaces the rebuilt one
            (and step n's vjp is taken there), so rebuild errors never cross a
            segment. k = 1 keeps every state (backprop's gradient); k >= N keeps
            only x_0; None (default) is the paper's method.
        roundtrip: the self-check. Keep x_0 (one more activation) and measure, at
            every backward pass and with no extra evaluation, the round-trip error
            ||x̃_0 - x_0|| / ||x_0|| of the rebuilt input (with anchors: the largest
            ||x̃_n - x_n|| / ||x_n|| over the anchors, each rebuilt from the next
            one). The last value is ``stack.last_roundtrip_error``. Off by default.
        max_roundtrip: a tolerance for the self-check (turns it on). When a stack's
            round-trip error passes it, a warning is logged and, from the next
            step on, that stack keeps anchors every ceil(sqrt(S)) steps (S steps);
            passed again, at every step (backprop's gradient, memory O(N)).

    Two uses would silently lose gradient terms, and raise instead: a
    differentiable backward pass (``create_graph=True``, e.g. a gradient penalty:
    RuntimeError), and a residual function using a tensor that requires grad but
    is not one of its parameters (ValueError, see :class:`LeafCheck`).

    The options are held as :attr:`options`, an :class:`AdjointOptions`; the
    backward pass is :meth:`backward_pass`, one :meth:`backward_step` per step.
    """

    name = "adjoint"
    VJPS = AdjointOptions.VJPS

    def __init__(self, vjp: str = "exact", compile: bool = False, anchor_every: int | None = None,
                 roundtrip: bool = False, max_roundtrip: float | None = None,
                 segment: int | None = None):
        self.options = options = AdjointOptions(vjp, compile, anchor_every, roundtrip,
                                                max_roundtrip, segment)
        self._escalation = Escalation(options.anchor_every, options.max_roundtrip)
        self._compiled = CompileCache()
        self._leaf_check = LeafCheck()

    # read-only views of the options
    vjp = property(lambda self: self.options.vjp)
    compile = property(lambda self: self.options.compile)
    anchor_every = property(lambda self: self.options.anchor_every)
    roundtrip = property(lambda self: self.options.roundtrip)
    max_roundtrip = property(lambda self: self.options.max_roundtrip)
    segment = property(lambda self: self.options.segment)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self.options.changed())})"

    def anchors_of(self, stack) -> range:
        """The steps n whose input state x_n the forward pass keeps."""
        k = self._escalation.anchor_every_of(stack)
        return range(0, stack.num_steps, k) if k else range(0)

    def __call__(self, stack, x):
        if not torch.is_grad_enabled():
            # Nothing will be differentiated: a plain forward pass is the same thing.
            return Backprop()(stack, x)
        if self.options.vjp == "shared" and not stack.integrator.shared_vjp_supported:
            supported = [name for name, cls in INTEGRATORS.items() if cls.shared_vjp_supported]
            raise ValueError(f"adjoint.vjp=shared supports method {', '.join(supported)}; "
                             f"got {stack.integrator.name}")
        structure, layout = stack.walked()
        return _AdjointFunction.apply(x, self, stack, stack.new_pass_seed(layout), layout,
                                      structure, *layout.parameters)

    # ------------------------------------------------------------ the two passes
    def forward_pass(self, stack, x: torch.Tensor, seed, anchors=(), layout=None) -> tuple:
        """x_0 -> (x_N, {n: x_n for n in anchors}) without a graph (runs inside
        ``Function.forward``). ``layout``: the pass's ``stack.layout()``, or None."""
        kept = {}
        call_of = self.callers(stack, seed, layout)
        integrator, h = stack.integrator, stack.step_size
        for n in range(stack.num_steps):
            if n in anchors:
                kept[n] = x
            x = integrator.step(call_of(n), n, x, h)
        return x, kept

    def backward_pass(self, stack, y: torch.Tensor, g: torch.Tensor, seed, params,
                      kept: dict | None = None, x0: torch.Tensor | None = None, layout=None):
        """From x_N and dL/dx_N to dL/dx_0 and the parameters' gradients.

        ``kept``: the anchors {n: x_n} of the forward pass; ``x0``: the input, kept
        for the self-check only (it changes no gradient); ``layout``: the pass's
        ``stack.layout()`` (walked again when None)."""
        layout = stack.layout() if layout is None else layout
        grads = _Gradients(stack, params, layout)
        kept = kept or {}
        errors = []
        pending = self._leaf_check.pending(stack)
        segment = self.options.segment_for(y) if self.options.vjp == "exact" else 1
        call_of = self.callers(stack, seed, layout)
        with stack.recomputing(layout):
            steps = reversed(range(stack.num_steps))
            if segment > 1:   # every step, K per autograd call
                y, g = self._segmented(stack, y, g, call_of, grads, kept, pending, segment,
                                       errors)
                steps = ()
            for n in steps:
                call = call_of(n)
                if pending:
                    call = self._leaf_check.checking(call, pending)
                stored = kept.get(n)
                if stored is None:
                    y, g = self.backward_step(stack, call, n, y, g, grads)
                    continue
                if self.options.roundtrip:   # what the plain adjoint would have rebuilt
                    with torch.no_grad():
                        rebuilt = stack.integrator.reverse(call, n, y, stack.step_size)
                    errors.append(_relative_error(rebuilt, stored))
                grads.carry = None
                y, g = stored, self.step_vjp(stack, call, n, stored, g, grads)
        if x0 is not None:
            errors.append(_relative_error(y, x0))
        if errors:
            error = torch.stack(errors).max()
            stack._roundtrip = error.detach()
            self._escalation.record(stack, error)
        return g, grads.values

    def _segmented(self, stack, y, g, call_of, grads, kept, pending, segment, errors):
        """The exact vjp's backward pass, ``segment`` steps per autograd call.

        For a segment of steps lo..hi: rebuild x̃_hi .. x̃_lo from x̃_{hi+1} (an
        anchor's stored state replaces the rebuilt one), then evaluate the steps
        forward with one graph, from a leaf holding x̃_lo. Each step's output is
        given, in place, the value of the next rebuilt state, so that the next
        step is evaluated (and its Jacobian taken) at x̃_{n+1}, exactly as with
        one autograd call per step; the graph still chains the steps, so one
        ``autograd.grad`` from the segment's top gives dL/dx̃_lo and the
        parameters' gradients of all its steps."""
        integrator, h = stack.integrator, stack.step_size
        hi = stack.num_steps - 1
        while hi >= 0:
            lo = max(0, hi - segment + 1)
            calls = {}
            for n in range(lo, hi + 1):
                call = call_of(n)
                calls[n] = self._leaf_check.checking(call, pending) if pending else call
            states = {hi + 1: y}
            with torch.no_grad():
                for n in range(hi, lo - 1, -1):
                    stored = kept.get(n)
                    if stored is None:
                        states[n] = integrator.reverse(calls[n], n, states[n + 1], h)
                        continue
                    if self.options.roundtrip:   # what the plain adjoint would have rebuilt
                        rebuilt = integrator.reverse(calls[n], n, states[n + 1], h)
                        errors.append(_relative_error(rebuilt, stored))
                    states[n] = stored
            x_in = states[lo].detach().requires_grad_(True)
            x = x_in
            with torch.enable_grad():
                for n in range(lo, hi + 1):
                    out = integrator.step(calls[n], n, x, h)
                    if n < hi:   # the value of x̃_{n+1}, the graph of step n
                        out.detach().copy_(states[n + 1])
                    x = out
            params = grads.of_steps(lo, hi)
            step_grads = _vjp(out, [x_in, *params], g)
            grads.add(params, step_grads[1:])
            y, g = states[lo], step_grads[0]
            hi = lo - 1
        return y, g

    def backward_step(self, stack, call, n: int, y, g, grads: "_Gradients"):
        """(x_{n+1}, dL/dx_{n+1}) -> (x_n rebuilt, dL/dx_n); adds step n's
        parameter gradients to ``grads``."""
        if self.options.vjp == "shared":
            return stack.integrator.shared_vjp(call, n, y, g, stack.step_size, grads)
        with torch.no_grad():
            x = stack.integrator.reverse(call, n, y, stack.step_size)
        return x, self.step_vjp(stack, call, n, x, g, grads)

    def step_vjp(self, stack, call, n: int, x, g, grads: "_Gradients"):
        """dL/dx_n: the exact vjp of step n taken at x, applied to g = dL/dx_{n+1};
        adds step n's parameter gradients to ``grads``."""
        params = grads.of_step(n)
        x_in = x.detach().requires_grad_(True)
        with torch.enable_grad():
            out = stack.integrator.step(call, n, x_in, stack.step_size)
        # The graph of this one step dies when autograd.grad returns.
        step_grads = _vjp(out, [x_in, *params], g)
        grads.add(params, step_grads[1:])
        return step_grads[0]

    # ------------------------------------------------------------- evaluation
    def caller(self, stack, n: int, seed, functions: list | None = None):
        """``call(i, x)`` for step n: the stack's own, or compiled functions."""
        if not self.options.compile or self._compiled.failed or seed is not None:
            return stack.caller(n, seed, functions)
        return self._compiled.caller(stack.functions)

    def callers(self, stack, seed, layout=None):
        """``call_of(n)``: :meth:`caller` for step n, made once for all steps where
        it does not depend on n (no randomness to replay)."""
        functions = None if layout is None else layout.calls
        if seed is None:
            call = self.caller(stack, 0, None, functions)
            return lambda n: call
        return lambda n: self.caller(stack, n, seed, functions)


class _Gradients:
    """The adjoint's parameter gradients, accumulated in place, with each step's
    parameters looked up once per function rather than once per step."""

    def __init__(self, stack, params, layout=None):
        self.values: list[torch.Tensor | None] = [None] * len(params)
        self._owned = [False] * len(params)
        self._position = {id(p): k for k, p in enumerate(params)}
        self._stack = stack
        self._of_function: dict[int, list] = {}   # id(module) -> its trainable params
        # The layout's lists serve as they are when they hold exactly these params.
        self._lists = (layout.of_function if layout is not None
                       and list(map(id, layout.parameters)) == list(self._position) else None)
        self.carry = None   # what one backward step hands the next (rev_heun's shared vjp)

    def of_function(self, i: int) -> list:
        if self._lists is not None:
            return self._lists[i]
        f = self._stack.functions[i]
        found = self._of_function.get(id(f))
        if found is None:
            found = self._of_function[id(f)] = [
                p for p in parameters_of(f) if p.requires_grad and id(p) in self._position]
        return found

    def of_steps(self, lo: int, hi: int) -> list:
        """The distinct trainable parameters steps lo..hi use."""
        functions_of_step = self._stack.integrator.functions_of_step
        seen: dict[int, torch.Tensor] = {}
        for i in dict.fromkeys(i for n in range(lo, hi + 1) for i in functions_of_step(n)):
            for p in self.of_function(i):
                seen.setdefault(id(p), p)
        return list(seen.values())

    def of_step(self, n: int) -> list:
        """The distinct trainable parameters step n uses."""
        indices = self._stack.integrator.functions_of_step(n)
        if len(indices) == 1:
            return self.of_function(indices[0])
        seen: dict[int, torch.Tensor] = {}
        for i in indices:
            for p in self.of_function(i):
                seen.setdefault(id(p), p)
        return list(seen.values())

    def add(self, params, step_grads) -> None:
        values, position, owned = self.values, self._position, self._owned
        into, more = [], []
        for p, gp in zip(params, step_grads, strict=True):
            if gp is None:
                continue
            k = position[id(p)]
            if values[k] is None:
                values[k] = gp          # may alias another gradient: not ours to mutate
            elif owned[k]:
                into.append(values[k])  # in place: tied weights accumulate here
                more.append(gp)
            else:
                values[k] = values[k] + gp
                owned[k] = True
        if into:   # one call for all of them (tied weights: every step)
            compat.foreach_add_(into, more)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a - b|| / ||b|| in float64, as a tensor (no device sync)."""
    a, b = a.double(), b.double()
    return (a - b).norm() / b.norm().clamp_min(torch.finfo(torch.float64).tiny)


class _AdjointFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mode, stack, seed, layout, structure, *params):
        record = guard.Record(stack, structure)   # what the backward pass relies on
        # Recompute under the same autocast as the forward pass (amp=true).
        device = x.device.type
        ctx.autocast = dict(device_type=device, enabled=torch.is_autocast_enabled(device),
                            dtype=torch.get_autocast_dtype(device))
        # grad is off inside Function.forward
        anchors = mode.anchors_of(stack)
        random = guard.rng_state(x) if seed is None else None
        y, kept = mode.forward_pass(stack, x, seed, anchors, layout)
        if random is not None and guard.rng_consumed(random, x):
            # The functions drew random numbers that the rebuild could not draw
            # again: run the pass again with each call's numbers replayable (the
            # same random state to start from), and keep replay on for this stack.
            guard.set_rng_state(random, x)
            stack.__dict__["_random"] = True
            seed = stack.new_pass_seed(layout)
            with stack.recomputing(layout):   # BatchNorm's statistics: updated once
                y, kept = mode.forward_pass(stack, x, seed, anchors, layout)
        record.done()
        ctx.mode, ctx.stack, ctx.seed, ctx.params, ctx.layout = mode, stack, seed, params, layout
        ctx.record = record
        # The activations kept: the output, the anchors, and x_0 for the self-check
        # (an anchor already when there are anchors).
        check = mode.roundtrip and not kept
        ctx.anchors, ctx.check = list(kept), check
        ctx.save_for_backward(y, *kept.values(), *([x] if check else []))
        return y

    @staticmethod
    def backward(ctx, grad_out):
        # Autograd runs a backward pass with grad on exactly when it is asked for a
        # differentiable one (create_graph=True); this one is not.
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD)
        ctx.record.check(ctx.stack)   # AdjointStateError where the rebuild would be wrong
        y, *rest = ctx.saved_tensors
        kept = dict(zip(ctx.anchors, rest, strict=False))   # rest: the anchors, then x_0 or not
        x0 = rest[-1] if ctx.check else None
        with torch.autocast(**ctx.autocast):
            g, grads = ctx.mode.backward_pass(ctx.stack, y, grad_out, ctx.seed, ctx.params,
                                              kept, x0, ctx.layout)
        return (g, None, None, None, None, None, *grads)


GRAD_MODES: dict[str, type[GradMode]] = {"backprop": Backprop, "adjoint": Adjoint}
names.agree(GRAD_MODES, names.GRADS, "GRAD_MODES")


def get_grad_mode(grad, **options) -> GradMode:
    """A grad mode from its name (``options`` go to its constructor) or an instance."""
    if isinstance(grad, GradMode):
        return grad
    if grad not in GRAD_MODES:
        raise ValueError(f"unknown grad {grad!r}; choose from {', '.join(GRAD_MODES)}")
    try:
        return GRAD_MODES[grad](**options)
    except TypeError as e:   # an option the mode does not have
        raise GradModeOptionError(f"{grad}: {e}") from None
