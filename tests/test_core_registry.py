"""What every registered integrator declares holds: exact reverses, and shared vjps."""
import pytest
import torch
from torch import nn

from conftest import flat_grads, tanh_block
from runner import ResidualStack
from runner.gradmodes import Adjoint
from runner.inits import init_iid, init_smooth
from runner.integrators import INTEGRATORS, Euler, Integrator

X = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", list(INTEGRATORS))
def test_reverse_undoes_step_where_declared_exact(name):
    """reverse(step(x_n)) == x_n up to rounding where ``exact_reverse``; visibly
    not where it is not (large steps)."""
    torch.manual_seed(3)
    functions = init_iid(tanh_block, 6)
    with torch.no_grad():
        for p in nn.ModuleList(functions).parameters():
            p.mul_(3.0)
    stack = ResidualStack(functions, INTEGRATORS[name](), "backprop")
    states = stack.trajectory(X)
    errors = []
    with torch.no_grad():
        for n in range(stack.num_steps):
            back = stack.reverse_step(n, stack.step(n, states[n]))
            assert back.shape == states[n].shape
            errors.append(rel(back, states[n]))
    if stack.integrator.exact_reverse:
        assert max(errors) < 1e-13, errors
    else:
        assert min(errors) > 1e-6, errors


SHARED = [name for name, cls in INTEGRATORS.items() if cls.shared_vjp_supported]


def test_shared_vjp_is_declared_by_its_owners():
    """``shared_vjp_supported`` is true exactly where the class has its own shared_vjp."""
    for cls in INTEGRATORS.values():
        assert cls.shared_vjp_supported == (cls.shared_vjp is not Integrator.shared_vjp), cls


@pytest.mark.parametrize("name", SHARED)
def test_shared_vjp_matches_the_exact_vjp(name):
    """An exact rebuild makes both vjps backprop's gradient (to rounding); otherwise the
    shared vjp, taken O(h^order) away from the rebuilt point, stays within h^order of
    the exact-vjp adjoint."""
    torch.manual_seed(0)
    functions = init_smooth(tanh_block, 16)
    integrator = INTEGRATORS[name]()
    shared = flat_grads(ResidualStack(functions, integrator, Adjoint(vjp="shared")), X)
    exact = flat_grads(ResidualStack(functions, integrator, Adjoint(vjp="exact")), X)
    if integrator.exact_reverse:
        backprop = flat_grads(ResidualStack(functions, integrator, "backprop"), X)
        assert rel(shared, backprop) < 1e-13 and rel(exact, backprop) < 1e-13
    else:
        h = 1 / len(functions)
        assert 0 < rel(shared, exact) < h ** integrator.order


def test_an_integrator_without_a_shared_vjp_is_refused_with_the_registry():
    class Plain(Integrator):   # Euler's step, no shared vjp
        name = "plain"
        functions_of_step, step, reverse = Euler.functions_of_step, Euler.step, Euler.reverse

    stack = ResidualStack([tanh_block() for _ in range(3)], Plain(), Adjoint(vjp="shared"))
    with pytest.raises(ValueError, match=f"supports method {', '.join(SHARED)}; got plain"):
        stack(X)
    # the exact vjp needs only step and reverse
    assert torch.isfinite(flat_grads(ResidualStack(stack.functions, Plain(), "adjoint"), X)).all()
