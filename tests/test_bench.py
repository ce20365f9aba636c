"""rode bench end to end, the contenders, and the adjoint's two vjp variants."""
import csv
import json
import subprocess
import sys
import weakref

import pytest
import torch

from conftest import flat_grads, tanh_block, validate_job
from runner import ResidualStack
from runner.contenders import CONTENDERS
from runner.gradmodes import Adjoint, GradModeOptionError, get_grad_mode
from runner.inits import init_smooth, init_tied
from runner.models import MLPBlock
from runner.tasks.bench import COLUMNS

FIXED_COLUMNS = ["depth", "contender", "method", "width", "batch_size", "seconds_per_step",
                 "peak_bytes", "grad_rel_error"]


def rel_error(approx, exact):
    return ((approx - exact).norm() / exact.norm()).item()


# ------------------------------------------------------------------ the CLI
def test_bench_cli_writes_csv_and_skips_a_missing_contender(tmp_path, rode_cli, monkeypatch):
    # memcnn made unimportable: the benchmark must skip it with a note.
    monkeypatch.setitem(sys.modules, "memcnn", None)
    # One depth: each (method, depth) runs every contender alike (and bench calls gc.collect
    # per step, which costs most of this test in a process as large as pytest's). Width and
    # batch size put each step's peak well above the kernel's resident-set resolution (a
    # step of a few pages can read as 0 bytes on a busy machine).
    result = rode_cli("bench", "depths=[3]", "methods=[euler,heun]", "width=32", "batch=256",
                      "warmup=0", "repeats=1", "progress=false", f"hydra.run.dir={tmp_path}")
    assert result.code == 0, result.err[-2000:]
    assert "memcnn skipped" in result.out
    with open(tmp_path / "bench.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames[:len(FIXED_COLUMNS)] == FIXED_COLUMNS
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    seen = {(r["method"], int(r["depth"]), r["contender"]) for r in rows}
    expected = {name for name in CONTENDERS if name != "memcnn"}
    if CONTENDERS["torchdiffeq"].missing():
        expected.discard("torchdiffeq")
    assert seen == {(m, 3, c) for m in ["euler", "heun"] for c in expected}
    for r in rows:
        assert float(r["seconds_per_step"]) > 0
        assert float(r["peak_bytes"]) > 64 * 1024         # measured in a fresh process
        assert r["memory_kind"] == "cpu_peak_rss_over_baseline"
        error = float(r["grad_rel_error"])
        if r["contender"] in ("plain", "backprop", "checkpoint"):
            assert error < 1e-5                           # exact up to float32 rounding
        else:
            assert 0 < error < 0.5
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == json.loads((tmp_path / "bench.json").read_text())   # its older name
    assert summary["status"] == "completed"
    assert any("memcnn" in note for note in summary["notes"])
    assert summary["ratios"]["euler"]["time_vs_backprop"]["backprop"]["3"] == 1.0


def test_bench_rejects_bad_input_in_one_line(tmp_path, rode_cli):
    result = rode_cli("bench", "contenders=[backprop,bogus]", f"hydra.run.dir={tmp_path}")
    assert result.code == 2
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and "bogus" in lines[0] and "adjoint_shared" in lines[0]
    assert not (tmp_path / "bench.csv").exists()


def test_missing_optional_contender_is_reported(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchdiffeq", None)   # find_spec -> None
    why = CONTENDERS["torchdiffeq"].missing()
    assert why and "torchdiffeq" in why and "[bench]" in why
    assert CONTENDERS["adjoint"].missing() is None


# ------------------------------------------------------------ the contenders
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_contenders_compute_the_same_network(method):
    torch.manual_seed(0)
    functions = init_smooth(tanh_block, 12)
    x = torch.randn(5, 8, dtype=torch.float64)
    expected = ResidualStack(functions, method, "backprop")(x)
    for name, contender in CONTENDERS.items():
        if contender.missing() or method not in contender.methods:
            continue
        out = contender.build(functions, method)(x)
        assert torch.allclose(out, expected, rtol=0, atol=1e-12), name


# ------------------------------------------------------- the adjoint variants
def test_default_adjoint_is_the_exact_vjp_at_the_rebuilt_point():
    """Adjoint() rebuilds x_n by running the step backward, then takes the exact
    vjp of the forward step at the rebuilt x_n (written out here independently)."""
    torch.manual_seed(0)
    functions = init_smooth(tanh_block, 10)
    x = torch.randn(4, 8, dtype=torch.float64)
    assert Adjoint().vjp == "exact" and get_grad_mode("adjoint").vjp == "exact"
    for method in ["euler", "heun"]:
        stack = ResidualStack(functions, method, Adjoint())
        y = stack(x).detach()
        g = 2 * y + 1                                  # d/dy of (y**2).sum() + y.sum()
        params = list(stack.parameters())
        total = [torch.zeros_like(p) for p in params]
        for n in reversed(range(stack.num_steps)):
            with torch.no_grad():
                xn = stack.reverse_step(n, y)
            xn_in = xn.clone().requires_grad_(True)
            out = stack.step(n, xn_in)
            grads = torch.autograd.grad(out, [xn_in, *params], g, allow_unused=True)
            g = grads[0]
            total = [t + (d if d is not None else 0) for t, d in zip(total, grads[1:], strict=True)]
            y = xn
        reference = torch.cat([g.flatten(), *[t.flatten() for t in total]])
        got = flat_grads(stack, x)
        assert torch.allclose(got, reference, rtol=1e-12, atol=1e-14), method


@pytest.mark.parametrize("init", [init_tied, init_smooth])
def test_shared_vjp_is_close_to_backprop_and_converges_with_depth(init):
    x = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    errors = {}
    for method in ["euler", "heun"]:
        for depth in [8, 64]:
            torch.manual_seed(1)
            functions = init(tanh_block, depth)
            exact = flat_grads(ResidualStack(functions, method, "backprop"), x)
            for vjp in ["exact", "shared"]:
                approx = flat_grads(ResidualStack(functions, method, Adjoint(vjp=vjp)), x)
                errors[method, depth, vjp] = rel_error(approx, exact)
    for method, order_drop in [("euler", 5), ("heun", 20)]:   # 8x and 64x expected
        assert errors[method, 8, "shared"] < 0.1
        assert errors[method, 8, "shared"] / errors[method, 64, "shared"] >= order_drop
        # the shared evaluation costs accuracy: the vjp is taken away from x_n
        assert errors[method, 64, "shared"] > errors[method, 64, "exact"]
    assert errors["heun", 64, "shared"] < errors["euler", 64, "shared"]


def test_shared_vjp_matches_torchdiffeq_with_tied_weights():
    """With one function for every layer, torchdiffeq's continuous adjoint on the
    ResNet's grid takes the same steps as vjp=shared (f and its vjp at x_{n+1})."""
    if CONTENDERS["torchdiffeq"].missing():
        pytest.skip("torchdiffeq not installed")
    torch.manual_seed(0)
    functions = init_tied(tanh_block, 16)
    params = list(functions[0].parameters())
    x = torch.randn(5, 8, dtype=torch.float64)
    for method in ["euler", "heun"]:
        grads = {}
        for name in ["adjoint_shared", "torchdiffeq"]:
            for p in params:
                p.grad = None
            CONTENDERS[name].build(functions, method)(x).sum().backward()
            grads[name] = torch.cat([p.grad.flatten() for p in params])
        assert torch.allclose(grads["adjoint_shared"], grads["torchdiffeq"], rtol=1e-9), method


def test_adjoint_options_from_config_and_bad_options():
    from hydra import compose, initialize_config_module

    from runner.models import grad_mode_from_config

    with initialize_config_module("runner.conf", version_base="1.3"):
        cfg = compose("train", overrides=["adjoint.vjp=shared"])
    mode = grad_mode_from_config(cfg)
    assert isinstance(mode, Adjoint) and mode.vjp == "shared"
    with pytest.raises(GradModeOptionError, match="exact, shared"):
        Adjoint(vjp="fast")
    with pytest.raises(ValueError, match="bogus"):   # a ValueError to library callers
        get_grad_mode("adjoint", bogus=1)


class _Holder:
    def __init__(self, t):
        self.tensor = t


def test_shared_vjp_frees_each_step_graph():
    """Memory O(1) in depth holds for vjp=shared too: the bytes autograd keeps
    saved at once (a holder dies with the graph that saved it) do not grow with depth."""
    def peak_saved(depth):
        torch.manual_seed(0)
        stack = ResidualStack(init_tied(lambda: MLPBlock(16, 16, "tanh"), depth), "euler",
                              Adjoint(vjp="shared"))
        x = torch.randn(32, 16, requires_grad=True)
        live, peak = [0], [0]

        def release(n):
            live[0] -= n

        def pack(t):
            holder, n = _Holder(t), t.numel() * t.element_size()
            live[0] += n
            peak[0] = max(peak[0], live[0])
            weakref.finalize(holder, release, n)
            return holder

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda h: h.tensor):
            stack(x).sum().backward()
        return peak[0]

    assert peak_saved(32) == peak_saved(4) > 0


def test_target_experiment_composes_and_script_parses():
    from pathlib import Path

    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra


    GlobalHydra.instance().clear()
    with initialize_config_module("runner.conf", version_base="1.3"):
        cfg = compose("bench", ["experiment=bench", "out_dir=unused"])
        full = compose("bench", ["experiment=bench_full", "out_dir=unused"])
    GlobalHydra.instance().clear()
    validate_job("bench", cfg)
    assert cfg.device == "cpu" and full.device == "cuda"
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench.sh"
    assert script.read_text().startswith("#!/usr/bin/env bash\n# ")
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
