"""The adjoint never returns a wrong gradient silently: what its backward pass
relies on is recorded in the forward pass and checked before the rebuild
(runner/guard.py); the walk of the stack's structure is kept between passes
only while it is still what a walk would find (runner/walk.py: Structure)."""
import copy
import math

import pytest
import torch
from torch import nn

from conftest import flat_grads, tanh_block
from runner import AdjointStateError, ResidualStack

X = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def blocks(depth=6, make=tanh_block):
    torch.manual_seed(0)
    return [make() for _ in range(depth)]


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def loss_of(stack, x=X):
    out = stack(x.clone().requires_grad_(True))
    return (out ** 2).sum() + out.sum()


# ------------------------------------------------ parameters changed in place
@pytest.mark.parametrize("method", ["euler", "rev_heun"])
def test_parameters_changed_between_forward_and_backward_are_refused(method):
    stack = ResidualStack(blocks(), method, "adjoint")
    loss = loss_of(stack)
    with torch.no_grad():   # an optimizer step before this loss's backward
        stack.functions[2][0].weight.add_(0.5)
    with pytest.raises(AdjointStateError, match=r"'functions\.2\.0\.weight' changed in place.*"
                                                r"grad='backprop'"):
        loss.backward()


def test_two_losses_with_a_step_between_are_refused_and_backprop_raises_too():
    for grad, error in [("adjoint", AdjointStateError), ("backprop", RuntimeError)]:
        stack = ResidualStack(blocks(), "rev_heun", grad)
        first, second = loss_of(stack), loss_of(stack, 2 * X)
        first.backward()
        with torch.no_grad():   # what an optimizer's step does
            for p in stack.parameters():
                p.sub_(0.1 * p.grad)
        with pytest.raises(error):
            second.backward()


def test_unchanged_parameters_give_backprops_gradient_to_rounding():
    functions = blocks()
    exact = flat_grads(ResidualStack(functions, "rev_heun", "backprop"), X)
    stack = ResidualStack(functions, "rev_heun", "adjoint")
    assert rel(flat_grads(stack, X), exact) < 1e-12
    # and again after a step taken after backward (the normal order)
    with torch.no_grad():
        functions[0][0].weight.add_(0.1)
    exact = flat_grads(ResidualStack(functions, "rev_heun", "backprop"), X)
    assert rel(flat_grads(stack, X), exact) < 1e-12


# ----------------------------------------------------------- training flags
def bn_block():
    return nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 8)).double()


def drop_block():
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 8)).double()


@pytest.mark.parametrize("make", [bn_block, drop_block], ids=["batchnorm", "dropout"])
def test_eval_between_forward_and_backward_is_refused(make):
    stack = ResidualStack(blocks(make=make), "rev_heun", "adjoint")
    loss = loss_of(stack)
    stack.eval()
    with pytest.raises(AdjointStateError, match=r"training flag of .* changed.*stack\.eval\(\)"):
        loss.backward()


@pytest.mark.parametrize("make", [bn_block, drop_block], ids=["batchnorm", "dropout"])
def test_batchnorm_and_dropout_in_one_mode_give_backprops_gradient(make):
    functions = blocks(make=make)
    for train in [True, False]:
        for f in functions:
            f.train(train)
        torch.manual_seed(3)
        exact = flat_grads(ResidualStack(functions, "rev_heun", "backprop", preserve_rng=True), X)
        torch.manual_seed(3)
        got = flat_grads(ResidualStack(functions, "rev_heun", "adjoint"), X)
        assert rel(got, exact) < 1e-10


# -------------------------------------------------- randomness not from Dropout
class Noisy(nn.Module):
    """f(x) = g(x + 0.3 ε), ε ~ N(0, 1) drawn with torch.randn_like."""

    def __init__(self):
        super().__init__()
        self.g = tanh_block()

    def forward(self, x):
        return self.g(x + 0.3 * torch.randn_like(x))


@pytest.mark.parametrize("preserve_rng", [None, False])
def test_randomness_in_the_functions_is_replayed_exactly(preserve_rng):
    functions = blocks(make=Noisy)
    stack = ResidualStack(functions, "rev_heun", "adjoint", preserve_rng=preserve_rng)
    for seed in [5, 6]:   # the first pass finds the randomness, the second replays up front
        torch.manual_seed(seed)
        got = flat_grads(stack, X)
        torch.manual_seed(seed)
        exact = flat_grads(ResidualStack(functions, "rev_heun", "backprop", preserve_rng=True), X)
        assert rel(got, exact) < 1e-12
    # the noise is real: another seed gives another gradient
    torch.manual_seed(7)
    assert rel(flat_grads(stack, X), exact) > 1e-3


def test_the_first_random_pass_keeps_the_random_state_reproducible():
    stack = ResidualStack(blocks(make=Noisy), "rev_heun", "adjoint")
    torch.manual_seed(11)
    first = flat_grads(stack, X)
    fresh = ResidualStack(stack.functions, "rev_heun", "adjoint")
    torch.manual_seed(11)
    assert torch.equal(flat_grads(fresh, X), first)


# --------------------------------------------------- side effects on buffers
class Counting(nn.Module):
    """A residual function that counts its calls in a buffer used in its output."""

    def __init__(self):
        super().__init__()
        self.g = tanh_block()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    def forward(self, x):
        self.count += 1
        return self.g(x) * (1 + 0.1 * self.count)


def test_buffer_side_effects_are_refused():
    stack = ResidualStack(blocks(make=Counting), "rev_heun", "adjoint")
    loss = loss_of(stack)
    with pytest.raises(AdjointStateError, match=r"changed buffer 'functions\.\d\.count'.*"
                                                r"in the forward pass \(a side effect"):
        loss.backward()


def test_batchnorm_running_statistics_are_not_a_side_effect():
    stack = ResidualStack(blocks(make=bn_block), "rev_heun", "adjoint")
    before = stack.functions[0][1].running_mean.clone()
    loss_of(stack).backward()
    assert not torch.equal(stack.functions[0][1].running_mean, before)
    # two forward passes, then both backward passes: running statistics moved
    # in between, which the rebuild (batch statistics) does not use
    a, b = loss_of(stack), loss_of(stack, 2 * X)
    (a + b).backward()


# ------------------------------------------------------ structure and method
def test_a_function_replaced_between_forward_and_backward_is_refused():
    stack = ResidualStack(blocks(), "rev_heun", "adjoint")
    loss = loss_of(stack)
    stack.functions[1] = tanh_block()
    with pytest.raises(AdjointStateError, match="structure changed"):
        loss.backward()


def test_step_size_changed_between_forward_and_backward_is_refused():
    stack = ResidualStack(blocks(), "rev_heun", "adjoint")
    loss = loss_of(stack)
    stack.step_size /= 2
    with pytest.raises(AdjointStateError, match="method or step_size changed"):
        loss.backward()


# --------------------------------------------------------- __call__ override
class Doubled(nn.Sequential):
    """A residual function whose class overrides __call__: f(x) = 2 g(x)."""

    def __call__(self, x):
        return 2 * super().__call__(x)


@pytest.mark.parametrize("grad", ["backprop", "adjoint"])
def test_a_call_override_is_honoured(grad):
    torch.manual_seed(0)
    f = Doubled(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)).double()
    stack = ResidualStack([f, f], "euler", grad)
    x = X.clone().requires_grad_(True)
    x1 = X + 0.5 * f(X)
    assert torch.allclose(stack(x), x1 + 0.5 * f(x1), rtol=0, atol=1e-14)


# ---------------------------------------------------------------- step_size
@pytest.mark.parametrize("bad", [0, -0.1, math.nan, math.inf, "0.1", True, None.__class__])
def test_step_size_must_be_a_finite_positive_number(bad):
    with pytest.raises(ValueError, match="step_size=.* must be a finite number > 0"):
        ResidualStack(blocks(2), "euler", step_size=bad)


def test_a_good_step_size_is_kept():
    assert ResidualStack(blocks(2), "euler", step_size=0.25).step_size == 0.25
    assert ResidualStack(blocks(4), "euler").step_size == 0.25


# ------------------------------------------------------- the walk's cache
def test_the_walk_is_kept_between_passes_while_nothing_changed():
    stack = ResidualStack(blocks(), "heun", "adjoint")
    first = stack.layout()
    loss_of(stack).backward()
    assert stack.layout() is first


def _replace_function(stack):
    stack.functions[0] = tanh_block()


def _freeze(stack):
    stack.functions[0][0].weight.requires_grad_(False)


def _hook(stack):
    stack.functions[0][0].register_forward_hook(lambda m, i, o: o * 0)


def _instance_forward(stack):
    stack.functions[0][2].forward = lambda x: x * 0


def _new_parameter(stack):
    stack.functions[0][0].weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.float64))


def _appended(stack):
    stack.functions[0].append(nn.Tanh())


CHANGES = [_replace_function, _freeze, _hook, _instance_forward, _new_parameter, _appended]


@pytest.mark.parametrize("change", CHANGES, ids=lambda c: c.__name__.strip("_"))
@pytest.mark.parametrize("grad", ["backprop", "adjoint"])
def test_the_walk_is_redone_after_each_change_that_matters(change, grad):
    """After the change, the stack computes and differentiates what a fresh walk
    gives: the same as a new stack over the same (changed) functions."""
    stack = ResidualStack(blocks(), "rev_heun", grad)
    flat_grads(stack, X)                       # walked and kept
    change(stack)
    fresh = ResidualStack(list(stack.functions), "rev_heun", "backprop")
    x = X.clone().requires_grad_(True)
    out, ref = stack(x), fresh(X.clone())
    assert torch.equal(out, ref)
    params = [p for p in stack.parameters() if p.requires_grad]
    got = torch.autograd.grad(out.square().sum(), params, allow_unused=True,
                              materialize_grads=True)
    want = torch.autograd.grad(fresh(X.clone()).square().sum(), params, allow_unused=True,
                               materialize_grads=True)
    for a, b in zip(got, want, strict=True):
        assert (a - b).norm() <= 1e-12 * b.norm() if grad == "adjoint" else torch.equal(a, b)


def test_a_training_flag_is_seen_by_the_kept_walk():
    stack = ResidualStack(blocks(make=drop_block), "heun", "backprop")
    assert stack.layout().dropout
    stack.eval()
    assert not stack.layout().dropout
    stack.train()
    assert stack.layout().dropout


def test_a_copy_walks_its_own_modules():
    stack = ResidualStack(blocks(), "heun", "backprop")
    stack.layout()
    twin = copy.deepcopy(stack)
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
    assert torch.equal(twin(X), X)              # the copy's zero functions, not the original's
    assert not torch.equal(stack(X), X)
