"""The residual stack: integrators, the discrete adjoint against autograd, faithful recomputation."""
import weakref

import pytest
import torch
from torch import nn

from runner import ResidualStack
from runner.inits import init_smooth, init_tied
from runner.models import MLPBlock


def flat_grads(stack, x, seed=0):
    """Gradients of a fixed scalar loss w.r.t. the input and every parameter, flattened."""
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = stack(x)
    loss = (out ** 2).sum() + out.sum()
    grads = torch.autograd.grad(loss, [x, *stack.parameters()])
    return torch.cat([g.flatten() for g in grads])


def rel_error(method, functions, x):
    exact = flat_grads(ResidualStack(functions, method, "backprop"), x)
    approx = flat_grads(ResidualStack(functions, method, "adjoint"), x)
    return ((approx - exact).norm() / exact.norm()).item()


def tanh_block(width=8):
    return MLPBlock(width, width, "tanh").double()


@pytest.mark.parametrize("init", [init_tied, init_smooth])
def test_adjoint_error_falls_at_integrator_order(init):
    torch.manual_seed(0)
    x = torch.randn(5, 8, dtype=torch.float64)
    errors = {}
    for method in ["euler", "heun"]:
        for depth in [8, 64]:
            torch.manual_seed(1)
            errors[method, depth] = rel_error(method, init(tanh_block, depth), x)
    assert errors["euler", 8] / errors["euler", 64] >= 5      # first order: 8x expected
    assert errors["heun", 8] / errors["heun", 64] >= 20       # second order: 64x expected
    assert errors["heun", 64] < errors["euler", 64]


class ConstantField(nn.Module):
    """f(x) = θ: does not depend on x, so running the network backward is exact."""

    def __init__(self, shape):
        super().__init__()
        self.theta = nn.Parameter(torch.randn(shape, dtype=torch.float64))

    def forward(self, x):
        return self.theta.expand_as(x)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_adjoint_is_exact_when_f_does_not_depend_on_x(method):
    torch.manual_seed(0)
    functions = [ConstantField((3,)) for _ in range(12)]
    x = torch.randn(4, 3, dtype=torch.float64)
    exact = flat_grads(ResidualStack(functions, method, "backprop"), x)
    approx = flat_grads(ResidualStack(functions, method, "adjoint"), x)
    assert torch.allclose(approx, exact, rtol=0, atol=1e-10)
    # and every function received its own, non-zero gradient
    assert all(f.theta.grad is None for f in functions)  # autograd.grad does not touch .grad


def test_gradients_reach_each_functions_parameters_through_backward():
    torch.manual_seed(0)
    functions = [tanh_block() for _ in range(6)]
    stack = ResidualStack(functions, "heun", "adjoint")
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    stack(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stack.parameters())


def test_forward_output_is_the_same_in_both_grad_modes():
    torch.manual_seed(0)
    functions = init_smooth(tanh_block, 10)
    x = torch.randn(4, 8, dtype=torch.float64)
    for method in ["euler", "heun"]:
        a = ResidualStack(functions, method, "backprop")(x)
        b = ResidualStack(functions, method, "adjoint")(x.requires_grad_())
        assert torch.equal(a, b)


def test_heun_needs_two_functions():
    with pytest.raises(ValueError, match="heun needs at least 2"):
        ResidualStack([tanh_block()], "heun")
    with pytest.raises(ValueError, match="unknown method 'rk9'; choose from euler, heun"):
        ResidualStack([tanh_block()], "rk9")
    with pytest.raises(ValueError, match="unknown grad"):
        ResidualStack([tanh_block()], "euler", "magic")


def test_any_tensor_shape_works():
    torch.manual_seed(0)
    def conv():
        return nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Tanh()).double()

    functions = [conv() for _ in range(8)]
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    for method in ["euler", "heun"]:
        assert rel_error(method, functions, x) < 0.05
        assert ResidualStack(functions, method, "adjoint")(x).shape == x.shape


def bn_block(width=6):
    return nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.Tanh(),
                         nn.Linear(width, width), nn.BatchNorm1d(width)).double()


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_batchnorm_running_stats_match_backprop(method):
    torch.manual_seed(0)
    template = [bn_block() for _ in range(8)]
    x = torch.randn(16, 6, dtype=torch.float64)
    states = {}
    for grad in ["backprop", "adjoint"]:
        functions = [__import__("copy").deepcopy(f) for f in template]
        stack = ResidualStack(functions, method, grad).train()
        stack(x.clone().requires_grad_()).square().sum().backward()
        states[grad] = {k: v.clone() for k, v in stack.state_dict().items()
                        if "running" in k or "num_batches" in k}
        # recomputation must not have switched anything to eval mode
        assert all(m.training for m in stack.modules())
    assert states["backprop"].keys() == states["adjoint"].keys()
    for k in states["backprop"]:
        assert torch.equal(states["backprop"][k], states["adjoint"][k]), k
    # and the statistics did move (the test can fail)
    assert not torch.equal(states["adjoint"]["functions.0.1.running_mean"],
                           torch.zeros(6, dtype=torch.float64))


def test_batchnorm_adjoint_gradient_is_close_to_backprop():
    torch.manual_seed(0)
    functions = init_tied(bn_block, 64)
    x = torch.randn(16, 6, dtype=torch.float64)
    assert rel_error("euler", functions, x) < 0.05


def test_dropout_masks_are_replayed_in_the_backward_pass():
    torch.manual_seed(0)
    def drop():
        return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 8)).double()

    functions = init_tied(drop, 64)
    x = torch.randn(5, 8, dtype=torch.float64)
    replayed = rel_error("euler", functions, x)
    assert replayed < 0.02
    # preserve_rng=False no longer gives unreplayed masks (a wrong gradient): the
    # adjoint sees that the forward pass drew random numbers and replays them
    # (tests/test_guard.py checks the gradient to rounding with rev_heun).
    no_replay = ResidualStack(functions, "euler", "adjoint", preserve_rng=False)
    torch.manual_seed(1)
    auto = flat_grads(no_replay, x)
    torch.manual_seed(1)
    exact = flat_grads(ResidualStack(functions, "euler", "backprop", preserve_rng=True), x)
    assert ((auto - exact).norm() / exact.norm()).item() < 0.02


class SavedBytes:
    """Bytes autograd saves for backward, counted through saved_tensors_hooks.

    ``total`` counts everything packed; ``peak_live`` the most bytes alive at once,
    a saved tensor dying when autograd frees the graph that holds it."""

    def __init__(self):
        self.total = self.live = self.peak_live = 0

    def _pack(self, t):
        holder = _Holder(t)
        n = t.numel() * t.element_size()
        self.total += n
        self.live += n
        self.peak_live = max(self.peak_live, self.live)
        weakref.finalize(holder, self._release, n)
        return holder

    def _release(self, n):
        self.live -= n

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda h: h.tensor)


class _Holder:
    def __init__(self, t):
        self.tensor = t


def measure(depth, grad, width=32, batch=64):
    torch.manual_seed(0)
    stack = ResidualStack(init_tied(lambda: MLPBlock(width, width, "tanh"), depth), "euler", grad)
    x = torch.randn(batch, width, requires_grad=True)
    counter = SavedBytes()
    with counter.hooks():
        forward_bytes = None
        out = stack(x)
        forward_bytes = counter.total
        out.sum().backward()
    return forward_bytes, counter.peak_live


def test_adjoint_saves_constant_memory_backprop_linear():
    adj16, adj_peak16 = measure(16, "adjoint")
    adj128, adj_peak128 = measure(128, "adjoint")
    bp16, _ = measure(16, "backprop")
    bp128, _ = measure(128, "backprop")
    assert adj16 == adj128 > 0                    # the output only, whatever the depth
    assert bp128 == pytest.approx(8 * bp16, rel=0.02)   # one step's activations per layer
    assert bp16 > 10 * adj16
    # one step's graph at a time in the adjoint's backward pass: the recomputed
    # steps do save tensors (peak > forward), but no more at depth 128 than at 16
    assert adj_peak16 > adj16
    assert adj_peak128 == adj_peak16


def test_adjoint_recomputes_under_the_forward_autocast():
    """amp=true: the backward recomputation runs in the same autocast as the forward."""
    torch.manual_seed(0)
    functions = [nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16)) for _ in range(8)]
    grads = {}
    for grad in ["backprop", "adjoint"]:
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = ResidualStack(functions, "euler", grad)(x)
        y.float().square().sum().backward()
        grads[grad] = x.grad
    assert grads["adjoint"].dtype == torch.float32
    # bfloat16 has ~3 significant digits: the two agree to that precision
    assert ((grads["adjoint"] - grads["backprop"]).norm() / grads["backprop"].norm()) < 0.1


def test_dropout_at_p_zero_needs_no_replay_and_p_above_zero_does():
    # At p = 0 torch's dropout returns its input without drawing: no replayed
    # streams (each costs a fork of the RNG per call), and the gradient is still
    # backprop's. At p > 0 (or p raised later) the masks are replayed.
    torch.manual_seed(0)
    dropout = nn.Dropout(0.0)
    functions = [nn.Sequential(nn.Linear(8, 8), nn.Tanh(), dropout, nn.Linear(8, 8)).double()
                 for _ in range(16)]
    stack = ResidualStack(functions, "euler", "adjoint")
    assert stack.new_pass_seed(stack.layout()) is None
    assert stack.new_pass_seed() is None
    x = torch.randn(5, 8, dtype=torch.float64)
    exact = flat_grads(ResidualStack(functions, "euler", "backprop"), x)
    assert ((flat_grads(stack, x) - exact).norm() / exact.norm()).item() < 0.02
    dropout.p = 0.3
    assert stack.new_pass_seed() is not None
    assert stack.new_pass_seed(stack.layout()) is not None
    torch.manual_seed(1)
    adjoint = flat_grads(stack, x)
    torch.manual_seed(1)
    exact = flat_grads(ResidualStack(functions, "euler", "backprop"), x)
    assert ((adjoint - exact).norm() / exact.norm()).item() < 0.02
