"""How gradients flow through a ResidualStack: ordinary backprop, or the discrete adjoint."""
from __future__ import annotations

import warnings

import torch
from torch.autograd.function import once_differentiable

from .errors import ConfigError
from .integrators import Euler, Heun


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

    The forward pass keeps only the output x_N. The backward pass walks the steps
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
        compile: evaluate the residual functions through ``torch.compile`` (off by
            default). Falls back to eager, with a warning, where compiling fails;
            not used when dropout randomness must be replayed.

    Subclasses add options as keyword arguments; the backward pass is
    :meth:`backward_pass`, one :meth:`backward_step` per step.
    """

    name = "adjoint"
    VJPS = ("exact", "shared")

    def __init__(self, vjp: str = "exact", compile: bool = False):
        if vjp not in self.VJPS:
            raise GradModeOptionError(f"adjoint.vjp={vjp!r} is not a valid choice; choose from "
                                      f"{', '.join(self.VJPS)}")
        if not isinstance(compile, bool):
            raise GradModeOptionError(f"adjoint.compile={compile!r} must be true or false")
        self.vjp = vjp
        self.compile = compile
        self._compiled: dict[int, object] = {}   # id(function) -> compiled function
        self._compile_failed = False

    def __repr__(self) -> str:
        options = []
        if self.vjp != "exact":
            options.append(f"vjp={self.vjp!r}")
        if self.compile:
            options.append("compile=True")
        return f"{type(self).__name__}({', '.join(options)})"

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
    def forward_pass(self, stack, x: torch.Tensor, seed) -> torch.Tensor:
        """x_0 -> x_N without a graph (runs inside ``Function.forward``)."""
        if not self.compile:
            for n in range(stack.num_steps):
                x = stack.step(n, x, seed)
            return x
        for n in range(stack.num_steps):
            x = stack.integrator.step(self.caller(stack, n, seed), n, x, stack.step_size)
        return x

    def backward_pass(self, stack, y: torch.Tensor, g: torch.Tensor, seed, params):
        """From x_N and dL/dx_N to dL/dx_0 and the parameters' gradients."""
        grads = _Gradients(stack, params)
        with stack.recomputing():
            for n in reversed(range(stack.num_steps)):
                y, g = self.backward_step(stack, n, y, g, seed, grads)
        return g, grads.values

    def backward_step(self, stack, n: int, y, g, seed, grads: "_Gradients"):
        """(x_{n+1}, dL/dx_{n+1}) -> (x_n rebuilt, dL/dx_n); adds step n's
        parameter gradients to ``grads``."""
        call = self.caller(stack, n, seed)
        if self.vjp == "shared":
            return _SHARED_STEPS[type(stack.integrator)](stack, call, n, y, g, grads)
        integrator, h = stack.integrator, stack.step_size
        with torch.no_grad():
            x = integrator.reverse(call, n, y, h)
        params = grads.of_step(n)
        x_in = x.detach().requires_grad_(True)
        with torch.enable_grad():
            out = integrator.step(call, n, x_in, h)
        # The graph of this one step dies when autograd.grad returns.
        step_grads = torch.autograd.grad(out, [x_in, *params], g, allow_unused=True)
        grads.add(params, step_grads[1:])
        return x, step_grads[0]

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

    def of_function(self, i: int) -> list:
        f = self._stack.functions[i]
        found = self._of_function.get(id(f))
        if found is None:
            found = self._of_function[id(f)] = [
                p for p in f.parameters() if p.requires_grad and id(p) in self._position]
        return found

    def of_step(self, n: int) -> list:
        """The distinct parameters step n uses (like ``stack.step_parameters``)."""
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


# integrator class -> its shared-evaluation backward step
_SHARED_STEPS = {Euler: _euler_shared, Heun: _heun_shared}


class _AdjointFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mode, stack, seed, *params):
        ctx.mode, ctx.stack, ctx.seed, ctx.params = mode, stack, seed, params
        # Recompute under the same autocast as the forward pass (amp=true).
        device = x.device.type
        ctx.autocast = dict(device_type=device, enabled=torch.is_autocast_enabled(device),
                            dtype=torch.get_autocast_dtype(device))
        y = mode.forward_pass(stack, x, seed)   # grad is off inside Function.forward
        ctx.save_for_backward(y)                # the only activation kept
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (y,) = ctx.saved_tensors
        with torch.autocast(**ctx.autocast):
            g, grads = ctx.mode.backward_pass(ctx.stack, y, grad_out, ctx.seed, ctx.params)
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
