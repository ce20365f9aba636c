"""The stack evaluates its residual functions without ``nn.Module.__call__``'s
dispatch where that dispatch would do nothing, and walks its structure once a
pass: hooks still run, and a change to a function between passes is seen."""
import pytest
import torch
from torch import nn

from runner import ResidualStack
from runner.gradmodes import Adjoint
from runner.inits import init_iid, init_tied
from runner.walk import parameters_of

MODES = {"backprop": lambda: "backprop", "exact": lambda: Adjoint(),
         "shared": lambda: Adjoint(vjp="shared")}
# Evaluations of one function per forward + backward pass (Euler).
EVALUATIONS = {"backprop": 1, "exact": 3, "shared": 2}


def block(width=5):
    return nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width)).double()


def euler_by_hand(functions, x):
    """The Euler ResNet with every module called through ``__call__``."""
    h = 1.0 / len(functions)
    for f in functions:
        x = x + h * f(x)
    return x


def stack_of(init, depth, mode):
    torch.manual_seed(0)
    functions = init(block, depth)
    return functions, ResidualStack(functions, "euler", MODES[mode]())


def run(stack, x):
    x = x.clone().requires_grad_(True)
    out = stack(x)
    out.square().sum().backward()
    return out.detach()


@pytest.mark.parametrize("mode", MODES)
def test_hooks_on_a_function_and_inside_it_still_run(mode):
    functions, stack = stack_of(init_iid, 6, mode)
    calls = []
    inner = functions[2][0].register_forward_hook(lambda m, i, o: calls.append("inner") or 2 * o)
    outer = functions[4].register_forward_pre_hook(lambda m, i: calls.append("outer"))
    x = torch.randn(3, 5, dtype=torch.float64)
    out = run(stack, x)
    inner.remove()
    outer.remove()
    assert calls.count("inner") == calls.count("outer") == EVALUATIONS[mode]
    with torch.no_grad():   # the hook's doubling is in the output, as with a plain loop
        functions[2][0].weight.mul_(2)
        functions[2][0].bias.mul_(2)
        expected = euler_by_hand(functions, x)
    assert torch.allclose(out, expected, rtol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_a_global_module_hook_sees_every_call(mode):
    functions, stack = stack_of(init_tied, 4, mode)
    seen = []
    handle = nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen.append(type(m).__name__) if isinstance(m, nn.Linear) else None)
    try:
        run(stack, torch.randn(3, 5, dtype=torch.float64))
    finally:
        handle.remove()
    assert seen.count("Linear") == 2 * 4 * EVALUATIONS[mode]


@pytest.mark.parametrize("mode", MODES)
def test_a_function_changed_between_passes_is_used_and_trained(mode):
    functions, stack = stack_of(init_iid, 5, mode)
    x = torch.randn(3, 5, dtype=torch.float64)
    run(stack, x)
    new = nn.Linear(5, 5).double()
    functions[1][2] = new                       # a submodule replaced inside a function
    functions[3][0].weight.requires_grad_(False)   # and a parameter frozen
    for p in stack.parameters():
        p.grad = None
    out = run(stack, x)
    with torch.no_grad():
        expected = euler_by_hand(functions, x)
    assert torch.allclose(out, expected, rtol=1e-12)
    assert new.weight.grad is not None and new.weight.grad.abs().sum() > 0
    assert functions[3][0].weight.grad is None


def test_layout_lists_parameters_in_parameters_order():
    torch.manual_seed(0)
    functions = init_tied(block, 3) + init_iid(block, 2) + [block()]
    functions[-1][0].bias.requires_grad_(False)
    stack = ResidualStack(functions, "heun", "backprop")
    layout = stack.layout()
    assert [id(p) for p in layout.parameters] == [
        id(p) for p in stack.parameters() if p.requires_grad]
    for f, mine in zip(functions, layout.of_function, strict=True):
        assert [id(p) for p in mine] == [id(p) for p in parameters_of(f) if p.requires_grad]
    x = torch.randn(2, 5, dtype=torch.float64)
    for f, call in zip(functions, layout.calls, strict=True):
        assert torch.equal(call(x), f(x))
