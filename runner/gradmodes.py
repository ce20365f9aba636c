"""How gradients flow through a ResidualStack: ordinary backprop, or the discrete adjoint."""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


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

    The forward pass keeps only the output x_N. The backward pass rebuilds each
    x_n from x_{n+1} by running the integrator backward, then takes the exact
    vector-Jacobian product of the forward step at the rebuilt point. Activation
    memory is O(1) in depth; gradients are approximate, with an error that falls
    with depth when the residual functions are small steps (smooth weights).
    """

    name = "adjoint"

    def __call__(self, stack, x):
        if not torch.is_grad_enabled():
            # Nothing will be differentiated: a plain forward pass is the same thing.
            return Backprop()(stack, x)
        params = [p for p in stack.parameters() if p.requires_grad]
        return _AdjointFunction.apply(x, stack, stack.new_pass_seed(), *params)


class _AdjointFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, stack, seed, *params):
        ctx.stack, ctx.seed, ctx.params = stack, seed, params
        for n in range(stack.num_steps):   # grad is off inside Function.forward
            x = stack.step(n, x, seed)
        ctx.save_for_backward(x)           # the only activation kept
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        stack, seed = ctx.stack, ctx.seed
        (y,) = ctx.saved_tensors
        position = {id(p): k for k, p in enumerate(ctx.params)}
        grads: list[torch.Tensor | None] = [None] * len(ctx.params)
        g = grad_out
        with stack.recomputing():
            for n in reversed(range(stack.num_steps)):
                with torch.no_grad():
                    x = stack.reverse_step(n, y, seed)
                step_params = stack.step_parameters(n)
                with torch.enable_grad():
                    x_in = x.detach().requires_grad_(True)
                    out = stack.step(n, x_in, seed)
                    # The graph of this one step dies when autograd.grad returns.
                    step_grads = torch.autograd.grad(
                        out, [x_in, *step_params], g, allow_unused=True)
                g = step_grads[0]
                for p, gp in zip(step_params, step_grads[1:]):
                    if gp is None:
                        continue
                    k = position[id(p)]
                    if grads[k] is None:
                        grads[k] = gp
                    else:
                        grads[k].add_(gp)   # in place: tied weights accumulate here
                y = x
        return (g, None, None, *grads)


GRAD_MODES: dict[str, type[GradMode]] = {"backprop": Backprop, "adjoint": Adjoint}


def get_grad_mode(grad, **options) -> GradMode:
    """A grad mode from its name (``options`` go to its constructor) or an instance."""
    if isinstance(grad, GradMode):
        return grad
    try:
        return GRAD_MODES[grad](**options)
    except KeyError:
        raise ValueError(
            f"unknown grad {grad!r}; choose from {', '.join(GRAD_MODES)}") from None
