"""Fixed-step integrators: how one residual step is taken, forward and backward.

Each integrator is a small class in the ``INTEGRATORS`` registry with a declared
``order``. It does not own the residual functions: the stack hands it
``call(i, x)``, which evaluates residual function ``i`` at ``x``, so the same
step code serves the ordinary forward pass, the recomputation in the adjoint's
backward pass, and the measurement hooks.

An integrator may also own the backward step of the adjoint's shared-evaluation
vjp (``adjoint.vjp=shared``): :meth:`Integrator.shared_vjp`, where
``shared_vjp_supported`` is true.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import names
from .compat import vjp

Call = Callable[[int, torch.Tensor], torch.Tensor]

class Integrator:
    """Base class. ``step`` maps x_n to x_{n+1}; ``reverse`` rebuilds x_n from x_{n+1}."""

    name = ""
    order = 0           # global order of accuracy on problems smooth in depth
    min_functions = 1   # fewest residual functions the scheme can use
    function_multiple = 1   # the number of functions must be a multiple of this
    exact_reverse = False   # reverse(step(x)) == x in exact arithmetic (up to rounding)

    def num_steps(self, num_functions: int) -> int:
        return num_functions

    def functions_of_step(self, n: int) -> tuple[int, ...]:
        """Indices of the residual functions that step ``n`` evaluates."""
        raise NotImplementedError

    def step(self, call: Call, n: int, x: torch.Tensor, h: float) -> torch.Tensor:
        raise NotImplementedError

    def reverse(self, call: Call, n: int, y: torch.Tensor, h: float) -> torch.Tensor:
        """The same scheme run with step -h: an approximate inverse of ``step``
        (the exact inverse, up to rounding, where ``exact_reverse`` is true)."""
        raise NotImplementedError

    def stream(self, n: int, i: int) -> tuple[int, int]:
        """Which random stream (dropout) call ``i`` of step ``n`` draws from: the
        forward evaluation and every recomputation of it must draw the same."""
        return n, i

    # The state the steps carry. Plain schemes carry x itself; schemes with an
    # augmented state (a velocity, an auxiliary copy) stack their parts along a
    # new leading dimension, so that any input shape works and the gradient modes
    # only ever see one tensor.
    def init_state(self, x: torch.Tensor) -> torch.Tensor:
        """x -> the state the first step takes."""
        return x

    def output(self, state: torch.Tensor) -> torch.Tensor:
        """A state -> the x it stands for."""
        return state

    # The adjoint's backward step with shared evaluations (adjoint.vjp=shared).
    shared_vjp_supported = False

    def shared_vjp(self, call: Call, n: int, state: torch.Tensor, g: torch.Tensor, h: float,
                   grads) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_{n+1}, dL/dx_{n+1}) -> (x_n rebuilt, dL/dx_n), where each evaluation
        serves both the rebuild and the vector-Jacobian product of step n.

        Runs with grad disabled (inside the adjoint's backward pass): evaluations
        that need a graph are made under ``torch.enable_grad()``. ``grads`` is the
        adjoint's gradient accumulator: ``grads.of_function(i)`` lists the trainable
        parameters of function i, ``grads.add(params, step_grads)`` adds their
        gradients, and ``grads.carry`` holds what one backward step hands the next
        (None at the start of a pass and after an anchor).
        """
        raise NotImplementedError(f"{self.name or type(self).__name__} has no shared vjp")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Euler(Integrator):
    """Explicit Euler: x_{n+1} = x_n + h f(x_n, θ_n). The plain ResNet."""

    name = "euler"
    order = 1

    def functions_of_step(self, n):
        return (n,)

    def step(self, call, n, x, h):
        return x + h * call(n, x)

    def reverse(self, call, n, y, h):
        return y - h * call(n, y)

    shared_vjp_supported = True

    def shared_vjp(self, call, n, y, g, h, grads):
        """One evaluation k = f_n(x_{n+1}) rebuilds x_n = x_{n+1} - h k and, through
        its graph, gives the vjp of x_{n+1} = x_n + h f_n(x_n) with J_n taken at
        x_{n+1}: O(h) away from the rebuilt point."""
        params = grads.of_function(n)
        y_in = y.detach().requires_grad_(True)
        with torch.enable_grad():
            k = call(n, y_in)
        step_grads = vjp(k, [y_in, *params], h * g)
        grads.add(params, step_grads[1:])
        x = torch.sub(y, k.detach(), alpha=h)
        return x, g + step_grads[0]


class Heun(Integrator):
    """Heun's method (explicit trapezoid rule, "improved Euler", a 2-stage RK).

    Not the midpoint method, and not Heun's third-order method. Step n uses two
    consecutive layers, θ_n at the start of the step and θ_{n+1} at its end, so N
    residual functions give N-1 steps (as in the paper authors' code).
    """

    name = "heun"
    order = 2
    min_functions = 2

    def num_steps(self, num_functions):
        return num_functions - 1

    def functions_of_step(self, n):
        return (n, n + 1)

    def step(self, call, n, x, h):
        k1 = call(n, x)
        k2 = call(n + 1, x + h * k1)
        return x + (0.5 * h) * (k1 + k2)

    def reverse(self, call, n, y, h):
        # Heun with step -h and the layers swapped: start from θ_{n+1}, end at θ_n.
        k1 = call(n + 1, y)
        k2 = call(n, y - h * k1)
        return y - (0.5 * h) * (k1 + k2)

    shared_vjp_supported = True

    def shared_vjp(self, call, n, y, g, h, grads):
        """The reverse stages k1 = f_{n+1}(x_{n+1}), k2 = f_n(x_{n+1} - h k1) rebuild
        x_n; their graphs stand in for the forward stages f_n(x_n) and
        f_{n+1}(x_n + h f_n(x_n)), whose arguments they miss by O(h²)."""
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
        out = vjp(k1, [y_in, *later], (0.5 * h) * g)
        u = out[0]
        grads.add(later, out[1:])
        earlier = grads.of_function(n)
        out = vjp(k2, [z, *earlier], torch.add((0.5 * h) * g, u, alpha=h))
        grads.add(earlier, out[1:])
        return x, g + u + out[0]


class ReversibleHeun(Integrator):
    """The reversible Heun method (Kidger, Foster, Li, Lyons 2021, "Efficient and
    accurate gradients for neural SDEs"), here for the ODE dx/dt = f(x, θ(t)).

    The state is (y, z, f(z)): the solution y, an auxiliary copy z, and the last
    evaluation cached. With z_0 = y_0 = x and f_n = f(·, θ_n)::

        z_{n+1} = 2 y_n - z_n + h f_n(z_n)
        y_{n+1} = y_n + h/2 (f_n(z_n) + f_{n+1}(z_{n+1}))

    Like Heun, step n uses θ_n and θ_{n+1}: N functions, N-1 steps. One new
    evaluation per step, f_{n+1}(z_{n+1}) (step 0 also evaluates f_0(z_0)), half
    of Heun's two. Its inverse is algebraic, with one evaluation::

        z_n = 2 y_{n+1} - z_{n+1} - h f_{n+1}(z_{n+1})
        y_n = y_{n+1} - h/2 (f_n(z_n) + f_{n+1}(z_{n+1}))

    so the adjoint rebuilds every state exactly, up to rounding, whatever the
    weights: its gradient is backprop's. Second order on problems smooth in depth.
    Not Heun's method: y and z may drift apart (an oscillating mode ±1 per step),
    which is harmless when f is smooth.
    """

    name = "rev_heun"
    order = 2
    min_functions = 2
    exact_reverse = True

    def num_steps(self, num_functions):
        return num_functions - 1

    def functions_of_step(self, n):
        return (n, n + 1)

    def stream(self, n, i):
        # f_i(z_i) is evaluated once in the forward pass (in step i-1) and
        # recomputed in reverse step i: one stream per function, whatever the step.
        return 0, i

    def init_state(self, x):
        # (y_0, z_0); the first step evaluates f_0(z_0) and adds the cache.
        return torch.stack([x, x])

    def output(self, state):
        return state[0]

    def step(self, call, n, s, h):
        y, z = s[0], s[1]
        fz = call(n, z) if n == 0 else s[2]
        z_next = 2 * y - z + h * fz
        fz_next = call(n + 1, z_next)
        y_next = y + (0.5 * h) * (fz + fz_next)
        return torch.stack([y_next, z_next, fz_next])

    def reverse(self, call, n, s, h):
        y_next, z_next, fz_next = s[0], s[1], s[2]
        z = 2 * y_next - z_next - h * fz_next
        fz = call(n, z)
        y = y_next - (0.5 * h) * (fz + fz_next)
        return torch.stack([y, z]) if n == 0 else torch.stack([y, z, fz])

    shared_vjp_supported = True

    def shared_vjp(self, call, n, s, g, h, grads):
        """The rebuild of step n evaluates f_n(z_n), which is what the vjp of step
        n-1 needs; its graph is handed over in ``grads.carry``. One evaluation per
        backward step (two for the first), and the gradient is exact."""
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
        out = vjp(f1_out, [z1_in, *later], torch.add(gf, gy, alpha=0.5 * h))
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
        out = vjp(fz, [z, *earlier], gf0)
        grads.add(earlier, out[1:])
        return torch.stack([y, z.detach()]), torch.stack([gy0, gz0 + out[0]])


class Momentum(Integrator):
    """Momentum ResNets (Sander, Ablin, Blondel, Peyré 2021). State (x, v), v_0 = 0::

        v_{n+1} = γ v_n + (1 - γ) f_n(x_n)
        x_{n+1} = x_n + h v_{n+1}

    the discretization, with step h, of ε ẍ + ẋ = f(x, θ(t)) with ε = h / (1 - γ):
    for a fixed γ, ε shrinks with the step and the network tends to the Neural ODE
    dx/dt = f (first order). One evaluation per step, N functions, N steps. The
    inverse is algebraic (one evaluation)::

        x_n = x_{n+1} - h v_{n+1}
        v_n = (v_{n+1} - (1 - γ) f_n(x_n)) / γ

    but in floating point each backward step divides the rounding error of v by
    γ: it grows like γ^(-N). Keep γ^(-N) well below 1/eps (float64: 1e16), e.g.
    γ >= 1 - c/N.

    Args:
        gamma: the momentum factor γ in (0, 1); 0.9 by default.
    """

    name = "momentum"
    order = 1
    exact_reverse = True

    def __init__(self, gamma: float = 0.9):
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma < 1:
            raise ValueError(f"momentum gamma={gamma!r} must be a number in (0, 1)")
        self.gamma = float(gamma)

    def __repr__(self):
        return f"Momentum(gamma={self.gamma:g})"

    def functions_of_step(self, n):
        return (n,)

    def init_state(self, x):
        return torch.stack([x, torch.zeros_like(x)])

    def output(self, state):
        return state[0]

    def step(self, call, n, s, h):
        x, v = s[0], s[1]
        v_next = self.gamma * v + (1 - self.gamma) * call(n, x)
        return torch.stack([x + h * v_next, v_next])

    def reverse(self, call, n, s, h):
        x_next, v_next = s[0], s[1]
        x = x_next - h * v_next
        v = (v_next - (1 - self.gamma) * call(n, x)) / self.gamma
        return torch.stack([x, v])

    shared_vjp_supported = True

    def shared_vjp(self, call, n, s, g, h, grads):
        """x_n = x_{n+1} - h v_{n+1} costs no evaluation, and the one evaluation
        f_n(x_n) both rebuilds v_n and gives the exact vjp of the step."""
        gamma = self.gamma
        x = torch.sub(s[0], s[1], alpha=h).detach().requires_grad_(True)
        with torch.enable_grad():
            fx = call(n, x)
        v = (s[1] - (1 - gamma) * fx.detach()) / gamma
        # v_{n+1} = γ v_n + (1-γ) f_n(x_n), x_{n+1} = x_n + h v_{n+1}
        a = g[1] + h * g[0]   # dL/dv_{n+1}, through both
        params = grads.of_function(n)
        out = vjp(fx, [x, *params], (1 - gamma) * a)
        grads.add(params, out[1:])
        return torch.stack([x.detach(), v]), torch.stack([g[0] + out[0], gamma * a])


class Coupled(Integrator):
    """The additive two-stream coupling of RevNet (Gomez et al. 2017) and RevViT
    (Mangalam et al. 2022). The state is two streams (x₁, x₂), both x at the start;
    the output is their mean. A coupling takes two consecutive functions F = f_{2k},
    G = f_{2k+1} and the step H = 2h::

        y₁ = x₁ + H F(x₂)
        y₂ = x₂ + H G(y₁)

    In the registry each half is one step (one function, N functions, N steps, N even):
    step n updates stream n mod 2 from the other, so function n still sits at
    t = n h. Each stream moves by 2h every two steps: both approximate x(t), to first
    order (a staggered, symplectic-Euler-like scheme). The inverse is algebraic with
    the same evaluation (x₁ = y₁ - H F(x₂), where x₂ is unchanged by the step), so the
    adjoint rebuilds every state exactly, up to rounding, whatever the weights.
    """

    name = "coupled"
    order = 1
    min_functions = 2
    function_multiple = 2
    exact_reverse = True

    def functions_of_step(self, n):
        return (n,)

    def init_state(self, x):
        return torch.stack([x, x])

    def output(self, state):
        return 0.5 * (state[0] + state[1])

    def step(self, call, n, s, h):
        i = n % 2                   # the stream this step updates, from the other one
        moved = s[i] + (2 * h) * call(n, s[1 - i])
        return torch.stack([moved, s[1]] if i == 0 else [s[0], moved])

    def reverse(self, call, n, s, h):
        i = n % 2
        back = s[i] - (2 * h) * call(n, s[1 - i])
        return torch.stack([back, s[1]] if i == 0 else [s[0], back])

    shared_vjp_supported = True

    def shared_vjp(self, call, n, s, g, h, grads):
        """The other stream is the evaluation point both of the rebuild and of the
        step: one evaluation gives the exact vjp."""
        i = n % 2
        other = s[1 - i].detach().requires_grad_(True)
        with torch.enable_grad():
            k = call(n, other)
        params = grads.of_function(n)
        out = vjp(k, [other, *params], (2 * h) * g[i])
        grads.add(params, out[1:])
        back = s[i] - (2 * h) * k.detach()
        g_other = g[1 - i] + out[0]
        if i == 0:
            return torch.stack([back, s[1]]), torch.stack([g[0], g_other])
        return torch.stack([s[0], back]), torch.stack([g_other, g[1]])


INTEGRATORS: dict[str, type[Integrator]] = {"euler": Euler, "heun": Heun,
                                            "rev_heun": ReversibleHeun, "momentum": Momentum,
                                            "coupled": Coupled}
names.agree(INTEGRATORS, names.METHODS, "INTEGRATORS")
names.agree({n: c.min_functions for n, c in INTEGRATORS.items()}.items(), names.METHODS.items(),
            "INTEGRATORS' fewest functions (names.METHODS' values)")


def get_integrator(method: str | Integrator, **options) -> Integrator:
    """An integrator from its name (``options`` go to its constructor) or an instance."""
    if isinstance(method, Integrator):
        return method
    try:
        return INTEGRATORS[method](**options)
    except KeyError:
        raise ValueError(
            f"unknown method {method!r}; choose from {', '.join(INTEGRATORS)}"
        ) from None
