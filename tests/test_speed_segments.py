"""The fast paths of the adjoint's backward pass give today's gradients.

The segmented exact vjp (``Adjoint(segment=K)``: one autograd call for K steps)
against the per-step reference (``segment=1``), in float64, for every integrator,
with anchors, with dropout replayed and with BatchNorm; the direct engine call
of the shared vjps against ``torch.autograd.grad``; and the plain contender."""
import pytest
import torch
from torch import nn

from runner import ResidualStack
from runner import gradmodes as gradmodes_module
from runner import integrators as integrators_module
from runner.contenders import CONTENDERS
from runner.gradmodes import Adjoint, AdjointOptions, GradModeOptionError
from runner.inits import init_iid, init_tied
from runner.integrators import INTEGRATORS


def mlp(width=6):
    return nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width)).double()


def mlp_dropout(width=6):
    return nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Dropout(0.2),
                         nn.Linear(width, width)).double()


def mlp_batchnorm(width=6):
    return nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.Tanh(),
                         nn.Linear(width, width)).double()


def gradients(functions, method, mode, x, seed=0):
    stack = ResidualStack(functions, method, mode)
    params = list(nn.ModuleList(functions).parameters())
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)   # the pass seed (dropout masks): the same for both
    loss = (stack(x) ** 2).sum() + stack(x).sum() * 0 if False else (stack(x) ** 2).sum()
    grads = torch.autograd.grad(loss, [x, *params], allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten()
                      for p, g in zip([x, *params], grads, strict=True)])


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


CASES = [("iid", init_iid, mlp), ("tied", init_tied, mlp), ("dropout", init_iid, mlp_dropout),
         ("batchnorm", init_tied, mlp_batchnorm)]


@pytest.mark.parametrize("method", list(INTEGRATORS))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("anchor_every", [None, 4])
def test_segmented_exact_vjp_is_the_per_step_vjp(method, case, anchor_every):
    _, init, make = case
    torch.manual_seed(0)
    functions = init(make, 14 if INTEGRATORS[method].function_multiple == 2 else 13)
    x = torch.randn(7, 6, dtype=torch.float64)
    reference = gradients(functions, method, Adjoint(segment=1, anchor_every=anchor_every), x)
    for k in (2, 3, 5, 64):
        got = gradients(functions, method, Adjoint(segment=k, anchor_every=anchor_every), x)
        assert rel(got, reference) < 1e-13, (k, rel(got, reference))


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_segmented_roundtrip_check_is_the_per_step_one(method):
    torch.manual_seed(0)
    functions = init_iid(mlp, 12)
    x = torch.randn(5, 6, dtype=torch.float64)
    errors = []
    for k in (1, 4):
        stack = ResidualStack(functions, method, Adjoint(segment=k, anchor_every=5,
                                                         roundtrip=True))
        stack(x.clone().requires_grad_(True)).sum().backward()
        errors.append(stack.last_roundtrip_error)
    assert errors[0] == pytest.approx(errors[1], rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("method", [m for m, c in INTEGRATORS.items() if c.shared_vjp_supported])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_shared_vjp_direct_engine_call_is_autograd_grad(method, case, monkeypatch):
    _, init, make = case
    torch.manual_seed(0)
    functions = init(make, 10 if INTEGRATORS[method].function_multiple == 2 else 9)
    x = torch.randn(7, 6, dtype=torch.float64)
    fast = gradients(functions, method, Adjoint(vjp="shared", anchor_every=4), x)

    def slow(output, inputs, grad):
        return torch.autograd.grad(output, inputs, grad, allow_unused=True)

    monkeypatch.setattr(integrators_module, "vjp", slow)
    monkeypatch.setattr(gradmodes_module, "_vjp", slow)
    reference = gradients(functions, method, Adjoint(vjp="shared", anchor_every=4), x)
    assert rel(fast, reference) < 1e-13


def test_segment_option_and_default():
    assert Adjoint().segment is None and Adjoint(segment=4.0).segment == 4
    assert "segment=3" in repr(Adjoint(segment=3))
    for bad in (0, -1, 2.5, "8", True):
        with pytest.raises(GradModeOptionError, match="adjoint.segment"):
            Adjoint(segment=bad)
    options = AdjointOptions()
    small = torch.zeros(64, 64)                  # 16 KiB: the deep regime
    large = torch.zeros(1024, 256)               # 1 MiB: arithmetic decides
    assert options.segment_for(small) == AdjointOptions.MAX_SEGMENT
    assert options.segment_for(large) == 1
    assert AdjointOptions(segment=5).segment_for(large) == 5


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_plain_contender_is_backprop(method):
    torch.manual_seed(0)
    functions = init_iid(mlp, 8)
    x = torch.randn(5, 6, dtype=torch.float64)
    out = {}
    for name in ("plain", "backprop"):
        model = CONTENDERS[name].build(functions, method)
        params = list(nn.ModuleList(functions).parameters())
        grads = torch.autograd.grad((model(x) ** 2).sum(), params)
        out[name] = torch.cat([g.flatten() for g in grads])
    assert rel(out["plain"], out["backprop"]) < 1e-14
