"""Measurement hooks in the real training loop, and the measurements they wrap."""
import json
import math

import pytest
import torch
from torch import nn

from conftest import compose_config
from runner import measure
from runner.engine import train
from runner.errors import ConfigError
from runner.gradmodes import Adjoint, Backprop
from runner.hooks import HOOKS, build_hooks
from runner.models import build_conv, build_mlp
from runner.stack import ResidualStack

SHORT = ["dataset=synthetic", "dataset.num_samples=240", "epochs=2", "batch_size=32",
         "depth=6", "width=16", "progress=false", "device=cpu"]




def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_each_hook_writes_its_fields_and_leaves_training_unchanged(tmp_path):
    # 192 training examples / 32 = 6 steps per epoch, 12 in all; every=5 logs at 0, 5, 10, 12.
    on = compose_config("train", SHORT + ["hooks=all", "grad=adjoint", "method=heun",
                                          *(f"hooks.{h}.every=5" for h in HOOKS)], tmp_path / "on")
    off = compose_config("train", SHORT + ["grad=adjoint", "method=heun"], tmp_path / "off")
    assert set(on.hooks) == set(HOOKS) and all(off.hooks[h].every == 0 for h in HOOKS)
    train(on)
    train(off)
    lines = read_metrics(tmp_path / "on")
    by_hook = {h: [r for r in lines if r.get("hook") == h] for h in HOOKS}
    for name, records in by_hook.items():
        assert [r["step"] for r in records] == [0, 5, 10, 12], name
        assert records[0]["epoch"] == 0 and records[-1]["epoch"] == 2

    depth, steps = 6, 5   # Heun: N functions, N-1 steps
    for r in by_hook["grad_error"]:
        assert 0 < r["rel_error"] < 1 and 0.9 < r["cosine"] <= 1 + 1e-9
        assert 0 < r["stack_rel_error"] < 1
        assert r["layers"] == list(range(depth))
        assert len(r["layer_rel_error"]) == len(r["layer_cosine"]) == depth
    for r in by_hook["memory"]:
        # The run trains with the adjoint: no activation is saved inside the steps,
        # only the stack's output (batch 32 x width 16 floats).
        assert r["layer_saved_bytes"] == [0] * steps
        assert r["stack_output_bytes"] == r["stack_saved_bytes"] == 32 * 16 * 4
        assert r["saved_bytes"] > r["stack_saved_bytes"] and r["batch_size"] == 32
        assert r["peak_bytes"] >= 0 and r["peak_kind"] in (
            "cpu_peak_rss_growth", "process_peak_rss")
    for r in by_hook["recon"]:
        assert len(r["layer_rel_error"]) == steps
        assert 0 < r["round_trip"] == r["layer_rel_error"][0] < 1
        assert r["max_rel_error"] == max(r["layer_rel_error"])
    for r in by_hook["smoothness"]:
        assert len(r["increments"]) == depth - 1 and r["smoothness"] > 0
        assert math.isclose(r["smoothness"], depth * r["max_increment"] / r["max_norm"])
    # Training moved the weights: the last measurements differ from the first.
    assert by_hook["smoothness"][0]["increments"] != by_hook["smoothness"][-1]["increments"]

    # Measuring does not change the run: same losses and accuracies as with hooks off.
    def strip(records):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in records if "hook" not in r]

    assert strip(lines) == strip(read_metrics(tmp_path / "off")) and len(strip(lines)) == 2


def test_off_hooks_are_not_built_and_bad_options_are_config_errors(tmp_path):
    cfg = compose_config("train", ["hooks.grad_error.every=3"], tmp_path)
    hooks = build_hooks(cfg.hooks)
    assert [h.name for h in hooks] == ["grad_error"] and hooks[0].every == 3
    for bad in ["hooks.grad_error.batch_size=0", "hooks.recon.batch_size=-2", "hooks.memory.batch_size=1.5"]:
        cfg = compose_config("train", ["hooks=all", bad], tmp_path)
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            build_hooks(cfg.hooks)


def test_measurements_leave_batchnorm_rng_grads_and_mode_untouched():
    torch.manual_seed(0)
    model = build_conv((1, 8, 8), 10, depth=3, width=4, init="iid", method="euler",
                       grad="backprop")
    model.eval()   # the probes run in train mode, then put the mode back
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    grad_error = measure.gradient_error(model, x, y)
    recon = measure.reconstruction_error(model, x)
    with measure.untouched(model):
        model.train()
        saved = measure.saved_activation_bytes(model, x, y, backward=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(rng, torch.get_rng_state())
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert model.stack.grad_mode.name == "backprop" and "step" not in vars(model.stack)
    assert 0 < grad_error["rel_error"] < 1 and len(grad_error["layers"]) == 3
    assert 0 < recon["round_trip"] < 1
    assert min(saved["layer_saved_bytes"]) > 0


def test_rebuild_is_exact_when_f_does_not_depend_on_x():
    class Drift(nn.Module):   # f(x, θ) = θ: the adjoint's rebuild is exact
        def __init__(self):
            super().__init__()
            self.theta = nn.Parameter(torch.randn(4, dtype=torch.float64))

        def forward(self, x):
            return self.theta.expand_as(x)

    torch.manual_seed(0)
    for method in ["euler", "heun"]:
        model = nn.Sequential(nn.Linear(3, 4), ResidualStack([Drift() for _ in range(8)], method),
                              nn.Tanh(), nn.Linear(4, 2)).double()
        x, y = torch.randn(32, 3, dtype=torch.float64), torch.randint(0, 2, (32,))
        r = measure.gradient_error(model, x, y)
        assert r["rel_error"] < 1e-13 and r["stack_rel_error"] < 1e-13
        assert measure.reconstruction_error(model, x)["round_trip"] < 1e-13


def test_saved_bytes_per_layer_backprop_against_adjoint():
    torch.manual_seed(0)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    for method, steps, calls in [("euler", 10, 1), ("heun", 9, 2)]:
        model = build_mlp((5,), 3, depth=10, width=6, hidden=7, activation="tanh", init="tied",
                          method=method, grad="backprop")
        bp = measure.saved_activation_bytes(model, x, y)
        with measure.grad_mode_as(model, Adjoint()):
            adj = measure.saved_activation_bytes(model, x, y)
        # Each call of f saves its input (8x6), the tanh output (8x7) and the
        # second linear's input (the same tensor): (48 + 56) floats.
        assert bp["layer_saved_bytes"] == [calls * (48 + 56) * 4] * steps
        assert adj["layer_saved_bytes"] == [0] * steps
        assert adj["stack_saved_bytes"] == adj["stack_output_bytes"] == 8 * 6 * 4
        # Outside the stack the same tensors are saved; the head's input x_N counts
        # as the adjoint's stack output.
        def outside(r):
            return r["saved_bytes"] - r["stack_saved_bytes"]

        assert outside(bp) == outside(adj) + adj["stack_output_bytes"]
    assert measure.saved_tensor_bytes(lambda: torch.randn(10, requires_grad=True).exp()) == 40


def test_smoothness_separates_tied_smooth_and_iid():
    def value(init, depth):
        torch.manual_seed(0)
        model = build_mlp((4,), 2, depth=depth, width=8, hidden=None, activation="tanh",
                          init=init, method="euler", grad=Backprop())
        return measure.smoothness(model)["smoothness"]

    assert value("tied", 16) == 0.0
    assert value("smooth", 64) < 1.5 * value("smooth", 8)     # O(1) in N
    assert value("iid", 64) > 5 * value("iid", 8)             # grows like N


def test_grad_error_probe_leaves_the_self_check_value_alone():
    import torch

    from conftest import tanh_block
    from runner import ResidualStack
    from runner.gradmodes import Adjoint
    from runner.inits import init_iid
    from runner.measure import grad_mode_as

    torch.manual_seed(0)
    stack = ResidualStack(init_iid(tanh_block, 8), "euler", Adjoint(roundtrip=True))
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    stack(x).sum().backward()
    before = stack.last_roundtrip_error
    assert before is not None and before > 0
    with grad_mode_as(stack, Adjoint(roundtrip=True)):
        stack(2 * x).sum().backward()             # a probe on other data
        assert stack.last_roundtrip_error != before
    assert stack.last_roundtrip_error == before
