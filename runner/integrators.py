"""Fixed-step integrators: how one residual step is taken, forward and backward.

Each integrator is a small class in the ``INTEGRATORS`` registry with a declared
``order``. It does not own the residual functions: the stack hands it
``call(i, x)``, which evaluates residual function ``i`` at ``x``, so the same
step code serves the ordinary forward pass, the recomputation in the adjoint's
backward pass, and the measurement hooks.
"""
from __future__ import annotations

from typing import Callable

import torch

Call = Callable[[int, torch.Tensor], torch.Tensor]


class Integrator:
    """Base class. ``step`` maps x_n to x_{n+1}; ``reverse`` rebuilds x_n from x_{n+1}."""

    name = ""
    order = 0           # global order of accuracy on problems smooth in depth
    min_functions = 1   # fewest residual functions the scheme can use

    def num_steps(self, num_functions: int) -> int:
        return num_functions

    def functions_of_step(self, n: int) -> tuple[int, ...]:
        """Indices of the residual functions that step ``n`` evaluates."""
        raise NotImplementedError

    def step(self, call: Call, n: int, x: torch.Tensor, h: float) -> torch.Tensor:
        raise NotImplementedError

    def reverse(self, call: Call, n: int, y: torch.Tensor, h: float) -> torch.Tensor:
        """The same scheme run with step -h: an approximate inverse of ``step``."""
        raise NotImplementedError

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


INTEGRATORS: dict[str, type[Integrator]] = {"euler": Euler, "heun": Heun}


def get_integrator(method: str | Integrator) -> Integrator:
    if isinstance(method, Integrator):
        return method
    try:
        return INTEGRATORS[method]()
    except KeyError:
        raise ValueError(
            f"unknown method {method!r}; choose from {', '.join(INTEGRATORS)}"
        ) from None
