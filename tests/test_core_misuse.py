"""Library misuse that would silently give wrong gradients with grad=adjoint raises instead."""
import pytest
import torch
from torch import nn

from conftest import flat_grads, tanh_block
from runner import ResidualStack
from runner.gradmodes import Adjoint, LeafCheck
from runner.inits import init_tied

X = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
METHODS = ["euler", "heun", "rev_heun", "momentum"]
MODES = [Adjoint(), Adjoint(vjp="shared"), Adjoint(anchor_every=2)]


def blocks(depth=4, seed=0):
    torch.manual_seed(seed)
    return [tanh_block() for _ in range(depth)]


# ------------------------------------------------- higher-order gradients
@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("method", METHODS)
def test_create_graph_raises(method):
    stack = ResidualStack(blocks(), method, "adjoint")
    params = list(stack.parameters())
    x = X.clone().requires_grad_(True)
    for wrt in [params, [x]]:   # a gradient penalty on the weights, or on the input
        loss = (stack(x) ** 2).sum()
        with pytest.raises(RuntimeError, match=r"not differentiable \(create_graph=True"):
            torch.autograd.grad(loss, wrt, create_graph=True)
    with pytest.raises(RuntimeError, match="use grad=backprop for higher-order gradients"):
        (stack(x) ** 2).sum().backward(create_graph=True)
    # first-order gradients are untouched
    stack.zero_grad()
    (stack(x) ** 2).sum().backward()
    assert all(p.grad is not None for p in params)


def test_backprop_gives_the_second_order_term():
    stack = ResidualStack(blocks(), "euler", "backprop")
    params = list(stack.parameters())
    grads = torch.autograd.grad((stack(X) ** 2).sum(), params, create_graph=True)
    penalty = sum((g ** 2).sum() for g in grads)
    second = torch.autograd.grad(penalty, params)
    assert all(torch.isfinite(g).all() for g in second) and any(g.abs().sum() > 0 for g in second)


# --------------------------------------------- tensors outside the parameters
class Scaled(nn.Module):
    """f(x) * scale(): ``scale`` is a closure, so the tensor it returns is not
    registered with the module (unlike ``self.scale = nn.Parameter(...)``)."""

    def __init__(self, f, scale):
        super().__init__()
        self.f, self.scale = f, scale

    def forward(self, x):
        return self.f(x) * self.scale()


@pytest.mark.parametrize("mode", MODES, ids=repr)
@pytest.mark.parametrize("method", METHODS)
def test_a_captured_tensor_requiring_grad_raises(method, mode):
    scale = torch.full((8,), 1.1, dtype=torch.float64, requires_grad=True)
    functions = blocks()
    functions[2] = Scaled(functions[2], lambda: scale)
    # backprop differentiates it ...
    assert torch.isfinite(flat_grads(ResidualStack(functions, method, "backprop"), X)).all()
    # ... the adjoint cannot: it refuses, every pass
    stack = ResidualStack(functions, method, mode)
    for _ in range(2):
        with pytest.raises(ValueError, match=r"residual function 2 \(Scaled\).*nn\.Parameter"):
            (stack(X) ** 2).sum().backward()
    assert scale.grad is None


def test_a_parameter_of_an_outside_module_and_a_non_leaf_raise():
    outside = nn.Linear(8, 8).double()   # not part of any residual function

    doubled = outside.bias * 2
    for scale in [lambda: outside.bias, lambda: doubled]:   # a leaf, then a non-leaf
        functions = blocks()
        functions[1] = Scaled(functions[1], scale)
        with pytest.raises(ValueError, match="residual function 1"):
            flat_grads(ResidualStack(functions, "heun", "adjoint"), X)


def test_registered_or_frozen_tensors_are_fine():
    # frozen: requires no gradient, so the adjoint loses nothing
    frozen = torch.full((8,), 1.1, dtype=torch.float64)
    functions = blocks()
    functions[2] = Scaled(functions[2], lambda: frozen)
    exact = flat_grads(ResidualStack(functions, "rev_heun", "backprop"), X)
    assert torch.allclose(flat_grads(ResidualStack(functions, "rev_heun", "adjoint"), X), exact,
                          rtol=1e-12, atol=1e-14)
    # registered as a parameter: the adjoint gives backprop's gradient (rev_heun: exact)
    registered = nn.Parameter(frozen.clone())
    functions[2].registered = registered
    functions[2].scale = lambda: registered
    exact = flat_grads(ResidualStack(functions, "rev_heun", "backprop"), X)
    assert torch.allclose(flat_grads(ResidualStack(functions, "rev_heun", "adjoint"), X), exact,
                          rtol=1e-12, atol=1e-14)


def test_each_function_is_checked_once(monkeypatch):
    checked = []
    verify = LeafCheck.verify
    monkeypatch.setattr(LeafCheck, "verify",
                        staticmethod(lambda i, f, x, out: (checked.append(f), verify(i, f, x, out))))
    torch.manual_seed(0)
    tied = init_tied(tanh_block, 6)   # one module, six times
    for functions, distinct in [(blocks(), 4), (tied, 1)]:
        checked.clear()
        mode = Adjoint(vjp="shared")
        stack = ResidualStack(functions, "heun", mode)
        for _ in range(3):
            flat_grads(stack, X)
        assert len(checked) == distinct and len({id(f) for f in checked}) == distinct
        # another grad mode checks again
        flat_grads(ResidualStack(functions, "heun", Adjoint()), X)
        assert len(checked) == 2 * distinct
