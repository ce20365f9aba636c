"""Exactly invertible schemes: rev_heun and momentum give backprop's gradient with the adjoint."""

import pytest
import torch
from torch import nn

from conftest import compose_config, flat_grads, tanh_block, validate_job
from runner import ResidualStack
from runner.gradmodes import Adjoint
from runner.inits import init_iid, init_smooth, init_tied
from runner.integrators import INTEGRATORS, Momentum, ReversibleHeun


def adjoint_error(functions, method, x, mode=None, **stack_options):
    exact = flat_grads(ResidualStack(functions, method, "backprop", **stack_options), x)
    approx = flat_grads(ResidualStack(functions, method, mode or Adjoint(), **stack_options), x)
    return ((approx - exact).norm() / exact.norm()).item()


def large_steps(depth=4, scale=5.0):
    """Residual functions that are not small steps: i.i.d. tanh MLPs with weights x5."""
    torch.manual_seed(3)
    functions = init_iid(tanh_block, depth)
    with torch.no_grad():
        for p in nn.ModuleList(functions).parameters():
            p.mul_(scale)
    return functions


X = torch.randn(6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------- the schemes
def test_registered_with_their_shapes():
    assert INTEGRATORS["rev_heun"] is ReversibleHeun and INTEGRATORS["momentum"] is Momentum
    rev, mom = ReversibleHeun(), Momentum()
    assert (rev.min_functions, rev.num_steps(10), rev.functions_of_step(3)) == (2, 9, (3, 4))
    assert (mom.min_functions, mom.num_steps(10), mom.functions_of_step(3)) == (1, 10, (3,))
    assert mom.gamma == 0.9 and Momentum(0.5).gamma == 0.5
    for bad in [0, 1, 1.5, -0.1, True, "0.9"]:
        with pytest.raises(ValueError, match="gamma"):
            Momentum(bad)


def test_forward_passes_are_the_documented_schemes():
    torch.manual_seed(0)
    functions = init_smooth(tanh_block, 7)
    f = [fn for fn in functions]
    x, h = X, 1 / 7
    # reversible Heun, written out
    y, z, fz = x, x, f[0](x)
    for n in range(6):
        z_next = 2 * y - z + h * fz
        f_next = f[n + 1](z_next)
        y, z, fz = y + h / 2 * (fz + f_next), z_next, f_next
    for grad in ["backprop", "adjoint"]:
        assert torch.allclose(ResidualStack(functions, "rev_heun", grad)(x), y, rtol=0, atol=1e-14)
    # momentum, gamma = 0.7, v_0 = 0
    xm, v = x, torch.zeros_like(x)
    for n in range(7):
        v = 0.7 * v + 0.3 * f[n](xm)
        xm = xm + h * v
    for grad in ["backprop", "adjoint"]:
        out = ResidualStack(functions, Momentum(gamma=0.7), grad)(x)
        assert torch.allclose(out, xm, rtol=0, atol=1e-14)


@pytest.mark.parametrize("method", ["rev_heun", "momentum"])
def test_reverse_inverts_step(method):
    torch.manual_seed(0)
    stack = ResidualStack(init_iid(tanh_block, 6), method, "backprop")
    states = stack.trajectory(X)
    assert len(states) == stack.num_steps + 1
    assert torch.equal(stack.integrator.output(states[0]), X)
    rebuilt = stack.rebuild(states[-1])
    for true, back in zip(states, rebuilt, strict=True):
        assert torch.allclose(back, true, rtol=0, atol=1e-13)


def test_any_input_shape():
    torch.manual_seed(0)
    conv = [nn.Conv2d(3, 3, 3, padding=1).double() for _ in range(5)]
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    for method in ["rev_heun", "momentum"]:
        assert ResidualStack(conv, method, "adjoint")(x).shape == x.shape
        assert adjoint_error(conv, method, x) < 1e-10


def test_rev_heun_is_second_order_and_momentum_first():
    """Linear field f(x) = A x, tied weights: x(t) = expm(t A) x_0 after S steps of
    1/N (t = S/N). The error falls 4x (first order) or 16x (second) per 4x depth."""
    torch.manual_seed(0)
    a = torch.randn(4, 4, dtype=torch.float64) / 2
    x = torch.randn(3, 4, dtype=torch.float64)

    def error(method, depth):
        layer = nn.Linear(4, 4, bias=False).double()
        layer.weight.data.copy_(a)
        stack = ResidualStack([layer] * depth, method, "backprop")
        t = stack.num_steps / depth
        exact = x @ torch.linalg.matrix_exp(t * a).T
        with torch.no_grad():
            return (stack(x) - exact).norm().item()

    rev = error("rev_heun", 16) / error("rev_heun", 64)
    assert 12 < rev < 20, rev
    # gamma fixed: ε = h/(1-γ) = 10h, so the asymptotic regime starts later
    mom = error("momentum", 256) / error("momentum", 1024)
    assert 3.3 < mom < 4.5, mom


# ------------------------------------------------------ exact adjoint gradients
@pytest.mark.parametrize("vjp", ["exact", "shared"])
@pytest.mark.parametrize("depth", [2, 5, 40])
def test_rev_heun_adjoint_is_backprop_at_any_depth(depth, vjp):
    torch.manual_seed(depth)
    for init in [init_iid, init_tied]:
        assert adjoint_error(init(tanh_block, depth), "rev_heun", X, Adjoint(vjp=vjp)) < 1e-10


@pytest.mark.parametrize("vjp", ["exact", "shared"])
def test_momentum_adjoint_is_backprop_at_moderate_depth(vjp):
    torch.manual_seed(0)
    for depth in [3, 32]:
        assert adjoint_error(init_iid(tanh_block, depth), "momentum", X, Adjoint(vjp=vjp)) < 1e-10


def test_plain_adjoint_is_far_off_where_reversible_schemes_are_exact():
    """Few layers with a large Lipschitz constant: rebuilding by running Euler or
    Heun backward fails, the algebraic inverses do not."""
    functions = large_steps()
    for method in ["euler", "heun"]:
        assert adjoint_error(functions, method, X) > 0.1, method
    for method in ["rev_heun", "momentum"]:
        for vjp in ["exact", "shared"]:
            assert adjoint_error(functions, method, X, Adjoint(vjp=vjp)) < 1e-10, (method, vjp)
    # Blocks not scaled by 1/N (step 1, as in a standard ResNet), weights x2.
    functions = large_steps(depth=8, scale=2.0)
    assert adjoint_error(functions, "euler", X, step_size=1.0) > 0.1
    assert adjoint_error(functions, "rev_heun", X, step_size=1.0) < 1e-10


def test_momentum_rounding_error_grows_like_gamma_to_the_minus_depth():
    """Each backward step divides v's rounding error by gamma: the round trip
    stays at rounding level for gamma = 0.99 and blows up for gamma = 0.5."""
    def roundtrip(gamma, depth):
        torch.manual_seed(1)
        stack = ResidualStack(init_smooth(tanh_block, depth), Momentum(gamma),
                              Adjoint(roundtrip=True))
        flat_grads(stack, X)
        return stack.last_roundtrip_error

    assert roundtrip(0.99, 64) < 1e-13
    small, large = roundtrip(0.5, 8), roundtrip(0.5, 40)
    assert small < 1e-12 and large > 1e-8
    assert large / small > 1e3                 # 0.5^-32 = 4e9 in the worst case


def test_dropout_replayed_in_rev_heun_adjoint():
    torch.manual_seed(0)
    functions = [nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Dropout(0.3)).double()
                 for _ in range(5)]

    def grads(grad):
        torch.manual_seed(7)
        return flat_grads(ResidualStack(functions, "rev_heun", grad), X)

    exact = grads("backprop")
    for vjp in ["exact", "shared"]:   # f_n(z_n): computed in step n-1, rebuilt in step n
        adjoint = grads(Adjoint(vjp=vjp))
        assert ((adjoint - exact).norm() / exact.norm()).item() < 1e-10, vjp


def test_bench_contenders_run_the_reversible_schemes():
    from runner.contenders import CONTENDERS

    torch.manual_seed(0)
    functions = init_iid(tanh_block, 6)
    for method in ["rev_heun", "momentum"]:
        reference = flat_grads(ResidualStack(functions, method, "backprop"), X)
        names = [n for n, c in CONTENDERS.items() if method in c.methods]
        assert {"backprop", "adjoint", "adjoint_shared", "checkpoint"} <= set(names)
        for name in names:
            model = CONTENDERS[name].build(functions, method)
            x = X.clone().requires_grad_(True)
            out = model(x)
            grads = torch.autograd.grad((out ** 2).sum() + out.sum(),
                                        [x, *nn.ModuleList(functions).parameters()])
            got = torch.cat([g.flatten() for g in grads])
            assert ((got - reference).norm() / reference.norm()).item() < 1e-10, (method, name)


# ------------------------------------------------------------------- the CLI
def test_gradcheck_task_shows_rev_heun_exact(tmp_path):
    from runner.tasks import gradcheck

    cfg = compose_config("gradcheck", ["method=rev_heun", "depth=12", "init=iid", "width=16",
                                       "batch_size=32", "device=cpu"], tmp_path)
    validate_job("gradcheck", cfg)
    summary = gradcheck.run(cfg)
    assert summary["method"] == "rev_heun" and summary["num_layers"] == 12
    assert summary["rel_error"] < 1e-10 and summary["max_layer_rel_error"] < 1e-10
