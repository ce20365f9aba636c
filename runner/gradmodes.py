"""How gradients flow through a ResidualStack: ordinary backprop, or the discrete adjoint."""
from __future__ import annotations

import logging
import math
import warnings
import weakref

import torch
from torch.autograd.function import once_differentiable

from .errors import ConfigError
from .integrators import Euler, Heun, Momentum, ReversibleHeun

log = logging.getLogger("rode")


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
        seed = stack.new_pass_seed()
        for n in range(stack.num_steps):
            x = stack.step(n, x, seed)
        return x


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

    Subclasses add options as keyword arguments; the backward pass is
    :meth:`backward_pass`, one :meth:`backward_step` per step.
    """

    name = "adjoint"
    VJPS = ("exact", "shared")

    def __init__(self, vjp: str = "exact", compile: bool = False, anchor_every: int | None = None,
                 roundtrip: bool = False, max_roundtrip: float | None = None):
        if vjp not in self.VJPS:
            raise GradModeOptionError(f"adjoint.vjp={vjp!r} is not a valid choice; choose from "
                                      f"{', '.join(self.VJPS)}")
        if not isinstance(compile, bool):
            raise GradModeOptionError(f"adjoint.compile={compile!r} must be true or false")
        if anchor_every is not None and (
                isinstance(anchor_every, bool) or not isinstance(anchor_every, (int, float))
                or anchor_every != int(anchor_every) or anchor_every < 1):
            raise GradModeOptionError(f"adjoint.anchor_every={anchor_every!r} must be an integer "
                                      ">= 1, or null (no anchors: the paper's adjoint)")
        if not isinstance(roundtrip, bool):
            raise GradModeOptionError(f"adjoint.roundtrip={roundtrip!r} must be true or false")
        if max_roundtrip is not None and (
                isinstance(max_roundtrip, bool) or not isinstance(max_roundtrip, (int, float))
                or not max_roundtrip > 0):
            raise GradModeOptionError(f"adjoint.max_roundtrip={max_roundtrip!r} must be a number "
                                      "> 0, or null (no tolerance)")
        self.vjp = vjp
        self.compile = compile
        self.anchor_every = None if anchor_every is None else int(anchor_every)
        self.max_roundtrip = None if max_roundtrip is None else float(max_roundtrip)
        self.roundtrip = roundtrip or max_roundtrip is not None
        self._compiled: dict[int, object] = {}   # id(function) -> compiled function
        self._compile_failed = False
        # stack -> its anchor_every since it passed max_roundtrip (per stack: one
        # grad mode may serve several stacks)
        self._escalated: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        options = []
        if self.vjp != "exact":
            options.append(f"vjp={self.vjp!r}")
        if self.compile:
            options.append("compile=True")
        if self.anchor_every is not None:
            options.append(f"anchor_every={self.anchor_every}")
        if self.max_roundtrip is not None:
            options.append(f"max_roundtrip={self.max_roundtrip:g}")
        elif self.roundtrip:
            options.append("roundtrip=True")
        return f"{type(self).__name__}({', '.join(options)})"

    def __getstate__(self) -> dict:
        # Pickling or copying a model keeps the options, not the per-stack switches
        # (weak references) nor the compiled functions: both are rebuilt as needed.
        state = dict(self.__dict__)
        state["_escalated"], state["_compiled"] = None, {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._escalated = weakref.WeakKeyDictionary()

    def anchors_of(self, stack) -> range:
        """The steps n whose input state x_n the forward pass keeps."""
        k = self._escalated.get(stack, self.anchor_every)
        return range(0, stack.num_steps, k) if k else range(0)

    def __call__(self, stack, x):
        if not torch.is_grad_enabled():
            # Nothing will be differentiated: a plain forward pass is the same thing.
            return Backprop()(stack, x)
        if self.vjp == "shared" and type(stack.integrator) not in _SHARED_STEPS:
            raise ValueError(f"adjoint.vjp=shared supports method "
                             f"{', '.join(c.name for c in _SHARED_STEPS)}; "
                             f"got {stack.integrator.name}")
        params = [p for p in stack.parameters() if p.requires_grad]
        return _AdjointFunction.apply(x, self, stack, stack.new_pass_seed(), *params)

    # ------------------------------------------------------------ the two passes
    def forward_pass(self, stack, x: torch.Tensor, seed, anchors=()) -> tuple:
        """x_0 -> (x_N, {n: x_n for n in anchors}) without a graph (runs inside
        ``Function.forward``)."""
        kept = {}
        for n in range(stack.num_steps):
            if n in anchors:
                kept[n] = x
            if self.compile:
                x = stack.integrator.step(self.caller(stack, n, seed), n, x, stack.step_size)
            else:
                x = stack.step(n, x, seed)
        return x, kept

    def backward_pass(self, stack, y: torch.Tensor, g: torch.Tensor, seed, params,
                      kept: dict | None = None, x0: torch.Tensor | None = None):
        """From x_N and dL/dx_N to dL/dx_0 and the parameters' gradients.

        ``kept``: the anchors {n: x_n} of the forward pass; ``x0``: the input, kept
        for the self-check only (it changes no gradient)."""
        grads = _Gradients(stack, params)
        kept = kept or {}
        errors = []
        with stack.recomputing():
            for n in reversed(range(stack.num_steps)):
                stored = kept.get(n)
                if stored is None:
                    y, g = self.backward_step(stack, n, y, g, seed, grads)
                    continue
                call = self.caller(stack, n, seed)
                if self.roundtrip:   # what the plain adjoint would have rebuilt
                    with torch.no_grad():
                        rebuilt = stack.integrator.reverse(call, n, y, stack.step_size)
                    errors.append(_relative_error(rebuilt, stored))
                grads.carry = None
                y, g = stored, self.step_vjp(stack, call, n, stored, g, grads)
        if x0 is not None:
            errors.append(_relative_error(y, x0))
        if errors:
            self._record_roundtrip(stack, torch.stack(errors).max())
        return g, grads.values

    def backward_step(self, stack, n: int, y, g, seed, grads: "_Gradients"):
        """(x_{n+1}, dL/dx_{n+1}) -> (x_n rebuilt, dL/dx_n); adds step n's
        parameter gradients to ``grads``."""
        call = self.caller(stack, n, seed)
        if self.vjp == "shared":
            return _SHARED_STEPS[type(stack.integrator)](stack, call, n, y, g, grads)
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
        step_grads = torch.autograd.grad(out, [x_in, *params], g, allow_unused=True)
        grads.add(params, step_grads[1:])
        return step_grads[0]

    # ----------------------------------------------------------- the self-check
    def _record_roundtrip(self, stack, error: torch.Tensor) -> None:
        stack._roundtrip = error.detach()
        if self.max_roundtrip is None:
            return
        value = float(error)
        if value <= self.max_roundtrip:   # NaN passes the tolerance too
            return
        steps = stack.num_steps
        now = self._escalated.get(stack, self.anchor_every)
        sqrt_steps = math.ceil(math.sqrt(steps))
        if now is None or now > sqrt_steps:
            new, what = sqrt_steps, f"anchored mode (adjoint.anchor_every={sqrt_steps})"
        elif now > 1:
            new, what = 1, "exact mode (every state kept: backprop's gradient, memory O(depth))"
        else:
            return   # every state is kept already: the gradient is exact
        self._escalated[stack] = new
        log.warning("adjoint self-check: round-trip error %.3g of a %s stack (%d steps) passed "
                    "adjoint.max_roundtrip=%g; that stack switches to %s from the next step on",
                    value, stack.integrator.name, steps, self.max_roundtrip, what)

    # ------------------------------------------------------------- evaluation
    def caller(self, stack, n: int, seed):
        """``call(i, x)`` for step n: the stack's own, or compiled functions."""
        if not self.compile or self._compile_failed or seed is not None:
            return stack.caller(n, seed)
        functions = stack.functions

        def call(i, x):
            f = functions[i]
            if self._compile_failed:
                return f(x)
            compiled = self._compiled.get(id(f))
            if compiled is None:
                compiled = self._compiled[id(f)] = torch.compile(f, dynamic=False)
            try:
                return compiled(x)
            except Exception as e:   # no compiler, unsupported op...: run eagerly
                self._compile_failed = True
                warnings.warn(f"adjoint.compile: torch.compile failed ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); "
                              "running eagerly", RuntimeWarning, stacklevel=2)
                return f(x)

        return call


class _Gradients:
    """The adjoint's parameter gradients, accumulated in place, with each step's
    parameters looked up once per function rather than once per step."""

    def __init__(self, stack, params):
        self.values: list[torch.Tensor | None] = [None] * len(params)
        self._owned = [False] * len(params)
        self._position = {id(p): k for k, p in enumerate(params)}
        self._stack = stack
        self._of_function: dict[int, list] = {}   # id(module) -> its trainable params
        self.carry = None   # what one backward step hands the next (rev_heun's shared vjp)

    def of_function(self, i: int) -> list:
        f = self._stack.functions[i]
        found = self._of_function.get(id(f))
        if found is None:
            found = self._of_function[id(f)] = [
                p for p in f.parameters() if p.requires_grad and id(p) in self._position]
        return found

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
        values, position = self.values, self._position
        for p, gp in zip(params, step_grads):
            if gp is None:
                continue
            k = position[id(p)]
            if values[k] is None:
                values[k] = gp          # may alias another gradient: not ours to mutate
            elif self._owned[k]:
                values[k].add_(gp)      # in place: tied weights accumulate here
            else:
                values[k] = values[k] + gp
                self._owned[k] = True


# ------------------------------------------------- shared-evaluation backward steps
def _euler_shared(stack, call, n, y, g, grads):
    """One evaluation k = f_n(x_{n+1}) rebuilds x_n = x_{n+1} - h k and, through its
    graph, gives the vjp of x_{n+1} = x_n + h f_n(x_n) with J_n taken at x_{n+1}."""
    h = stack.step_size
    params = grads.of_function(n)
    y_in = y.detach().requires_grad_(True)
    with torch.enable_grad():
        k = call(n, y_in)
    step_grads = torch.autograd.grad(k, [y_in, *params], h * g, allow_unused=True)
    grads.add(params, step_grads[1:])
    x = torch.sub(y, k.detach(), alpha=h)
    return x, g + step_grads[0]


def _heun_shared(stack, call, n, y, g, grads):
    """Heun's reverse stages k1 = f_{n+1}(x_{n+1}), k2 = f_n(x_{n+1} - h k1) rebuild
    x_n; their graphs stand in for the forward stages f_n(x_n) and
    f_{n+1}(x_n + h f_n(x_n)), whose arguments they miss by O(h²)."""
    h = stack.step_size
    y_in = y.detach().requires_grad_(True)
    with torch.enable_grad():
        k1 = call(n + 1, y_in)
    z = torch.sub(y, k1.detach(), alpha=h).requires_grad_(True)
    with torch.enable_grad():
        k2 = call(n, z)
    x = y - (0.5 * h) * (k1.detach() + k2.detach())
    # x_{n+1} = x + h/2 f_n(x) + h/2 f_{n+1}(x + h f_n(x)):
    # dL/dx = g + u + J_n^T (h/2 g + h u),  u = J_{n+1}^T (h/2 g).
    later = grads.of_function(n + 1)
    out = torch.autograd.grad(k1, [y_in, *later], (0.5 * h) * g, allow_unused=True)
    u = out[0]
    grads.add(later, out[1:])
    earlier = grads.of_function(n)
    out = torch.autograd.grad(k2, [z, *earlier], (0.5 * h) * g + h * u, allow_unused=True)
    grads.add(earlier, out[1:])
    return x, g + u + out[0]


def _momentum_shared(stack, call, n, s, g, grads):
    """Momentum: x_n = x_{n+1} - h v_{n+1} costs no evaluation, and the one
    evaluation f_n(x_n) both rebuilds v_n and gives the exact vjp of the step."""
    gamma, h = stack.integrator.gamma, stack.step_size
    x = torch.sub(s[0], s[1], alpha=h).detach().requires_grad_(True)
    with torch.enable_grad():
        fx = call(n, x)
    v = (s[1] - (1 - gamma) * fx.detach()) / gamma
    # v_{n+1} = γ v_n + (1-γ) f_n(x_n), x_{n+1} = x_n + h v_{n+1}
    a = g[1] + h * g[0]   # dL/dv_{n+1}, through both
    params = grads.of_function(n)
    out = torch.autograd.grad(fx, [x, *params], (1 - gamma) * a, allow_unused=True)
    grads.add(params, out[1:])
    return torch.stack([x.detach(), v]), torch.stack([g[0] + out[0], gamma * a])


def _rev_heun_shared(stack, call, n, s, g, grads):
    """Reversible Heun: the rebuild of step n evaluates f_n(z_n), which is what the
    vjp of step n-1 needs; its graph is handed over in ``grads.carry``. One
    evaluation per backward step (two for the first), and the gradient is exact."""
    h = stack.step_size
    y1, z1, f1 = s[0], s[1], s[2]
    gy, gz, gf = g[0], g[1], g[2]
    # The vjp of step n through f_{n+1}(z_{n+1}), the cached f1.
    if grads.carry is not None and grads.carry[0] == n + 1:
        _, z1_in, f1_out = grads.carry
    else:
        z1_in = z1.detach().requires_grad_(True)
        with torch.enable_grad():
            f1_out = call(n + 1, z1_in)
    grads.carry = None
    later = grads.of_function(n + 1)
    out = torch.autograd.grad(f1_out, [z1_in, *later], gf + (0.5 * h) * gy, allow_unused=True)
    grads.add(later, out[1:])
    w = gz + out[0]   # dL/dz_{n+1}, all paths
    # The rebuild, with f_n(z_n) evaluated under a graph.
    z = (2 * y1 - z1 - h * f1).detach().requires_grad_(True)
    with torch.enable_grad():
        fz = call(n, z)
    y = y1 - (0.5 * h) * (fz.detach() + f1)
    # z_{n+1} = 2 y_n - z_n + h f_n(z_n),  y_{n+1} = y_n + h/2 (f_n(z_n) + f1)
    gy0, gz0, gf0 = gy + 2 * w, -w, (0.5 * h) * gy + h * w
    if n > 0:   # f_n(z_n) is the state's cache: step n-1 differentiates it
        grads.carry = (n, z, fz)
        return torch.stack([y, z.detach(), fz.detach()]), torch.stack([gy0, gz0, gf0])
    earlier = grads.of_function(0)   # step 0 evaluates f_0(z_0) itself
    out = torch.autograd.grad(fz, [z, *earlier], gf0, allow_unused=True)
    grads.add(earlier, out[1:])
    return torch.stack([y, z.detach()]), torch.stack([gy0, gz0 + out[0]])


# integrator class -> its shared-evaluation backward step
_SHARED_STEPS = {Euler: _euler_shared, Heun: _heun_shared,
                 ReversibleHeun: _rev_heun_shared, Momentum: _momentum_shared}


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a - b|| / ||b|| in float64, as a tensor (no device sync)."""
    a, b = a.double(), b.double()
    return (a - b).norm() / b.norm().clamp_min(torch.finfo(torch.float64).tiny)


class _AdjointFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mode, stack, seed, *params):
        ctx.mode, ctx.stack, ctx.seed, ctx.params = mode, stack, seed, params
        # Recompute under the same autocast as the forward pass (amp=true).
        device = x.device.type
        ctx.autocast = dict(device_type=device, enabled=torch.is_autocast_enabled(device),
                            dtype=torch.get_autocast_dtype(device))
        # grad is off inside Function.forward
        y, kept = mode.forward_pass(stack, x, seed, mode.anchors_of(stack))
        # The activations kept: the output, the anchors, and x_0 for the self-check
        # (an anchor already when there are anchors).
        check = mode.roundtrip and not kept
        ctx.anchors, ctx.check = list(kept), check
        ctx.save_for_backward(y, *kept.values(), *([x] if check else []))
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        y, *rest = ctx.saved_tensors
        kept = dict(zip(ctx.anchors, rest))
        x0 = rest[-1] if ctx.check else None
        with torch.autocast(**ctx.autocast):
            g, grads = ctx.mode.backward_pass(ctx.stack, y, grad_out, ctx.seed, ctx.params,
                                              kept, x0)
        return (g, None, None, None, *grads)


GRAD_MODES: dict[str, type[GradMode]] = {"backprop": Backprop, "adjoint": Adjoint}


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
