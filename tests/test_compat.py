"""runner/compat.py: each private torch call and its public fallback give the same results.

Only the private features that this torch has are compared (compat.AVAILABLE says which);
the public path runs everywhere. scripts/compat_check.sh runs this file on the oldest and
the newest supported torch, with and without RODE_TORCH_PUBLIC=1."""
import importlib.util
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from runner import compat
from runner.optim import build_optimizer
from tests.conftest import ROOT


@pytest.fixture
def public(monkeypatch):
    """Every private feature switched off, as RODE_TORCH_PUBLIC=1 does."""
    monkeypatch.setattr(compat, "AVAILABLE", dict.fromkeys(compat.AVAILABLE, False))


def test_available_names_every_feature():
    assert set(compat.AVAILABLE) == {"execution_engine", "foreach_copy", "foreach_add",
                                     "fused_check", "tracing_state", "module_hooks"}
    assert all(isinstance(v, bool) for v in compat.AVAILABLE.values())


@pytest.mark.parametrize("value,forced", [("1", True), ("on", True), ("0", False)])
def test_env_var_forces_every_public_fallback(monkeypatch, value, forced):
    """runner/compat.py imported afresh (a second copy of the module, as a new process
    imports it) with RODE_TORCH_PUBLIC set: every private feature off."""
    monkeypatch.setenv(compat.PUBLIC_ENV, value)
    spec = importlib.util.spec_from_file_location("_compat_fresh", compat.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    assert fresh.FORCE_PUBLIC is forced
    if forced:
        assert sorted(k for k, v in fresh.AVAILABLE.items() if v) == []
    elif not compat.FORCE_PUBLIC:   # not forced: this torch's own features
        assert fresh.AVAILABLE == compat.AVAILABLE


@pytest.mark.slow   # the same import-time switch as above, in a new interpreter
def test_env_var_forces_every_public_fallback_in_a_new_process():
    code = "import runner.compat as c; print(sorted(k for k, v in c.AVAILABLE.items() if v))"
    env = dict(os.environ, RODE_TORCH_PUBLIC="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _graph():
    torch.manual_seed(0)
    w = torch.randn(5, 5, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    unused = torch.randn(3, requires_grad=True)
    x = torch.randn(4, 5)
    return torch.tanh(x @ w + b), [w, b, unused]


def test_vjp_private_and_public_agree(monkeypatch):
    g = torch.randn(4, 5)
    out, inputs = _graph()
    expected = torch.autograd.grad(out, inputs, g, allow_unused=True)
    out, inputs = _graph()
    got = compat.vjp(out, inputs, g)          # the private engine where this torch has it
    assert got[2] is None and expected[2] is None
    for a, b in zip(got[:2], expected[:2], strict=True):
        assert torch.equal(a, b)
    if compat.AVAILABLE["execution_engine"]:
        # the graph is freed, as autograd.grad frees it
        with pytest.raises(RuntimeError):
            compat.vjp(out, inputs, g)


@pytest.mark.parametrize("op", ["foreach_copy_", "foreach_add_"])
def test_foreach_private_and_public_agree(op, monkeypatch):
    torch.manual_seed(0)
    src = [torch.randn(3, 4), torch.randn(7), torch.randn(2, 2, 2)]
    dst = [torch.randn_like(s) for s in src]
    a = [d.clone() for d in dst]
    getattr(compat, op)(a, src)
    monkeypatch.setattr(compat, "AVAILABLE", dict.fromkeys(compat.AVAILABLE, False))
    b = [d.clone() for d in dst]
    getattr(compat, op)(b, src)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    expected = src if op == "foreach_copy_" else [d + s for d, s in zip(dst, src, strict=True)]
    for x, y in zip(a, expected, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("inner", [torch.optim.Adam, torch.optim.SGD])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64])
def test_fused_check_private_and_public_agree(inner, dtype, monkeypatch):
    p = torch.zeros(3, dtype=dtype)
    private = compat.fused_supported(inner, p)
    monkeypatch.setattr(compat, "AVAILABLE", dict.fromkeys(compat.AVAILABLE, False))
    assert compat.fused_supported(inner, p) == private
    if dtype == torch.int64:
        assert not private      # fused kernels take floating point only


class _Model(nn.Sequential):
    def __init__(self):
        torch.manual_seed(0)
        super().__init__(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def _train(steps=5):
    from omegaconf import OmegaConf
    model = _Model()
    cfg = OmegaConf.create({"optimizer": "adam", "lr": 1e-2, "weight_decay": 0.0, "momentum": 0.0})
    opt = build_optimizer(cfg, model)
    torch.manual_seed(1)
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_flat_optimizer_same_steps_on_both_paths(monkeypatch):
    private = _train()
    monkeypatch.setattr(compat, "AVAILABLE", dict.fromkeys(compat.AVAILABLE, False))
    public = _train()
    for a, b in zip(private, public, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_hooks_and_tracing_seen_on_both_paths(monkeypatch):
    from runner import walk
    m = nn.Linear(2, 2)
    for available in (dict(compat.AVAILABLE), dict.fromkeys(compat.AVAILABLE, False)):
        monkeypatch.setattr(compat, "AVAILABLE", available)
        h = m.register_forward_hook(lambda *a: None)
        assert walk.hooked(m)
        h.remove()
        g = nn.modules.module.register_module_forward_hook(lambda *a: None)
        assert walk.hooks_anywhere()
        g.remove()
        seen = []

        def traced(x, seen=seen):
            seen.append(compat.is_tracing())
            return x * 2

        with warnings.catch_warnings():   # torch.jit.trace is deprecated in newer torch
            warnings.simplefilter("ignore")
            torch.jit.trace(traced, torch.ones(1),
                            check_trace=False)
        assert seen == [True] and not compat.is_tracing()
        if available["module_hooks"]:   # the private check sees a plain module as plain
            assert not walk.hooked(m) and not walk.hooks_anywhere()


@pytest.mark.parametrize("args", [["dataset=cifar10"], ["dataset=mnist"],
                                  ["dataset=fashion_mnist"],
                                  ["model=resnet", "dataset=synthetic", "dataset.shape=[3,32,32]"]])
def test_without_torchvision_one_line_error(args, rode_cli, tmp_path, monkeypatch):
    """torchvision is the optional `vision` extra: what needs it says so, and how to get it."""
    monkeypatch.setitem(sys.modules, "torchvision", None)   # as if not installed
    if args[0].startswith("dataset="):
        args = [*args, f"dataset.root={tmp_path / 'data'}"]
    r = rode_cli("train", *args, "epochs=1",
                 f"hydra.run.dir={tmp_path / 'run'}")
    lines = [line for line in r.err.splitlines() if line.strip()]
    assert r.code == 2, r.out + r.err
    assert len(lines) == 1 and "needs torchvision" in lines[0] and "rode[vision]" in lines[0]
    assert "Traceback" not in r.err
    assert not (tmp_path / "run").exists()
