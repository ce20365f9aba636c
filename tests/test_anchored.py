"""The anchored adjoint (adjoint.anchor_every) and the self-check (adjoint.roundtrip,
adjoint.max_roundtrip)."""
import json
import logging
import math
import subprocess

import pytest
import torch
from torch import nn

from conftest import RODE, compose_config, flat_grads, tanh_block
from runner import ResidualStack
from runner.gradmodes import Adjoint, GradModeOptionError, get_grad_mode
from runner.inits import init_iid, init_smooth
from runner.measure import reconstruction_error, saved_tensor_bytes
from runner.stack import roundtrip_error


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def scaled_iid(depth, scale, seed=3):
    torch.manual_seed(seed)
    functions = init_iid(tanh_block, depth)
    with torch.no_grad():
        for p in nn.ModuleList(functions).parameters():
            p.mul_(scale)
    return functions


X = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------ anchors
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_anchors_bound_the_error_and_k1_is_backprop(method):
    functions = scaled_iid(16, 2.0)
    exact = flat_grads(ResidualStack(functions, method, "backprop"), X)
    errors = {k: rel(flat_grads(ResidualStack(functions, method, Adjoint(anchor_every=k)), X),
                     exact)
              for k in [None, 8, 4, 2, 1]}
    assert errors[None] > 1e-3
    assert errors[None] > errors[8] > errors[4] > errors[2] > errors[1]
    assert errors[1] < 1e-13                       # every state kept: backprop's gradient


def test_anchor_every_n_is_the_papers_adjoint_with_x0_kept():
    """k >= S keeps only x_0: the paper's rebuild everywhere but the last backward
    step, whose vjp is taken at the kept x_0."""
    functions = scaled_iid(6, 2.0)
    exact = flat_grads(ResidualStack(functions, "euler", "backprop"), X)
    plain = rel(flat_grads(ResidualStack(functions, "euler", Adjoint()), X), exact)
    for k in [6, 100]:
        stack = ResidualStack(functions, "euler", Adjoint(anchor_every=k))
        assert list(stack.grad_mode.anchors_of(stack)) == [0]
        anchored = rel(flat_grads(stack, X), exact)
        assert anchored < plain and anchored > 0.3 * plain


@pytest.mark.parametrize("method", ["euler", "heun", "rev_heun", "momentum"])
def test_saved_memory_grows_as_n_over_k(method):
    """Saved for backward: the output and one state per anchor, ceil(S/k) of them."""
    torch.manual_seed(0)
    functions = init_smooth(tanh_block, 17)
    x = X.clone().requires_grad_(True)
    sizes = {}
    for k in [None, 16, 4, 2, 1]:
        stack = ResidualStack(functions, method, Adjoint(anchor_every=k))
        states = [s.numel() * 8 for s in stack.trajectory(X)]   # bytes of x_0 .. x_S
        anchors = [] if k is None else range(0, stack.num_steps, k)
        assert len(anchors) == (0 if k is None else math.ceil(stack.num_steps / k))
        sizes[k] = saved_tensor_bytes(lambda stack=stack: stack(x))
        assert sizes[k] == states[-1] + sum(states[n] for n in anchors), k
    assert sizes[1] > 2.5 * sizes[4] > 2.5 * 2.5 * sizes[None]
    # The self-check keeps x_0: one more activation without anchors, none with them.
    check = ResidualStack(functions, method, Adjoint(roundtrip=True))
    assert saved_tensor_bytes(lambda: check(x)) == sizes[None] + states[0]
    check = ResidualStack(functions, method, Adjoint(roundtrip=True, anchor_every=4))
    assert saved_tensor_bytes(lambda: check(x)) == sizes[4]


def test_anchored_shared_vjp_and_dropout():
    torch.manual_seed(0)
    functions = [nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Dropout(0.2)).double()
                 for _ in range(9)]

    def grads(mode):
        torch.manual_seed(5)
        return flat_grads(ResidualStack(functions, "euler", mode), X)

    exact = grads("backprop")
    assert rel(grads(Adjoint(anchor_every=1)), exact) < 1e-13
    assert rel(grads(Adjoint(vjp="shared", anchor_every=1)), exact) < 1e-13
    assert (rel(grads(Adjoint(vjp="shared", anchor_every=3)), exact)
            < rel(grads(Adjoint(vjp="shared")), exact))


# --------------------------------------------------------------- self-check
@pytest.mark.parametrize("method", ["euler", "heun", "rev_heun"])
def test_roundtrip_error_is_measured_and_changes_no_gradient(method):
    functions = scaled_iid(8, 1.5)
    plain = ResidualStack(functions, method, Adjoint())
    checked = ResidualStack(functions, method, Adjoint(roundtrip=True))
    assert plain.last_roundtrip_error is None and checked.last_roundtrip_error is None
    assert torch.equal(flat_grads(plain, X), flat_grads(checked, X))
    assert plain.last_roundtrip_error is None
    # the same quantity as the recon measurement, computed independently
    expected = reconstruction_error(checked, X)["round_trip"]
    assert math.isclose(checked.last_roundtrip_error, expected, rel_tol=1e-6, abs_tol=1e-15)
    assert roundtrip_error(nn.Sequential(checked)) == checked.last_roundtrip_error
    if method == "rev_heun":
        assert checked.last_roundtrip_error < 1e-13
    else:
        assert checked.last_roundtrip_error > 1e-3


def test_anchored_roundtrip_is_the_worst_segment():
    functions = scaled_iid(12, 1.5)
    whole = ResidualStack(functions, "euler", Adjoint(roundtrip=True))
    segments = ResidualStack(functions, "euler", Adjoint(roundtrip=True, anchor_every=3))
    flat_grads(whole, X)
    flat_grads(segments, X)
    states = whole.trajectory(X)
    worst = 0.0
    for start in [0, 3, 6, 9]:   # rebuild each segment from the state at its end
        y = states[start + 3] if start + 3 < len(states) else states[-1]
        with torch.no_grad():
            for n in reversed(range(start, min(start + 3, whole.num_steps))):
                y = whole.reverse_step(n, y)
        worst = max(worst, rel(y, states[start]))
    assert math.isclose(segments.last_roundtrip_error, worst, rel_tol=1e-9)
    assert segments.last_roundtrip_error < whole.last_roundtrip_error


def test_max_roundtrip_switches_a_bad_stack_to_anchored_then_exact(caplog):
    functions = scaled_iid(9, 5.0)
    exact = flat_grads(ResidualStack(functions, "euler", "backprop"), X)
    mode = Adjoint(max_roundtrip=1e-6)
    stack = ResidualStack(functions, "euler", mode)
    assert mode.roundtrip
    with caplog.at_level(logging.WARNING, logger="rode"):
        first = rel(flat_grads(stack, X), exact)
        assert list(mode.anchors_of(stack)) == [0, 3, 6]          # ceil(sqrt(9)) = 3
        second = rel(flat_grads(stack, X), exact)
        assert list(mode.anchors_of(stack)) == list(range(9))     # passed again: exact
        third = rel(flat_grads(stack, X), exact)
        flat_grads(stack, X)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2   # one per switch, not one per step
    assert "anchored mode (adjoint.anchor_every=3)" in warnings[0].getMessage()
    assert "exact mode" in warnings[1].getMessage()
    assert first > 0.1 and second < first and third < 1e-13
    # another stack sharing the grad mode is not switched
    other = ResidualStack(scaled_iid(9, 0.1), "euler", mode)
    assert list(mode.anchors_of(other)) == []


def test_a_switched_stack_pickles_and_copies_with_its_options(tmp_path, caplog):
    import copy

    mode = Adjoint(max_roundtrip=1e-9, anchor_every=5)
    stack = ResidualStack(scaled_iid(9, 5.0), "euler", mode)
    with caplog.at_level(logging.WARNING, logger="rode"):
        flat_grads(stack, X)
    assert list(mode.anchors_of(stack)) == [0, 3, 6]
    torch.save(stack, tmp_path / "stack.pt")
    for other in [copy.deepcopy(stack), torch.load(tmp_path / "stack.pt", weights_only=False)]:
        assert repr(other.grad_mode) == "Adjoint(anchor_every=5, max_roundtrip=1e-09)"
        assert list(other.grad_mode.anchors_of(other)) == [0, 5]   # the switch is not kept
        with caplog.at_level(logging.WARNING, logger="rode"):
            assert torch.isfinite(flat_grads(other, X)).all()
        assert list(other.grad_mode.anchors_of(other)) == [0, 3, 6]   # and switches again


def test_max_roundtrip_leaves_a_good_stack_alone(caplog):
    functions = scaled_iid(9, 5.0)
    mode = Adjoint(max_roundtrip=1e-10)
    stack = ResidualStack(functions, "rev_heun", mode)   # exact rebuild, whatever the weights
    with caplog.at_level(logging.WARNING, logger="rode"):
        for _ in range(3):
            flat_grads(stack, X)
    assert not caplog.records and list(mode.anchors_of(stack)) == []
    assert stack.last_roundtrip_error < 1e-10


def test_options_are_checked():
    assert repr(Adjoint(anchor_every=4, max_roundtrip=0.01)) == \
        "Adjoint(anchor_every=4, max_roundtrip=0.01)"
    assert get_grad_mode("adjoint", anchor_every=4.0).anchor_every == 4
    for options, key in [({"anchor_every": 0}, "anchor_every"),
                         ({"anchor_every": 2.5}, "anchor_every"),
                         ({"anchor_every": True}, "anchor_every"),
                         ({"max_roundtrip": 0}, "max_roundtrip"),
                         ({"max_roundtrip": "big"}, "max_roundtrip"),
                         ({"roundtrip": "yes"}, "roundtrip")]:
        with pytest.raises(GradModeOptionError, match=f"adjoint.{key}="):
            get_grad_mode("adjoint", **options)


# ------------------------------------------------------------------ training
def test_training_logs_the_roundtrip_error_and_switches(tmp_path, caplog):
    from runner.engine import train

    common = ["dataset=synthetic", "width=8", "epochs=1", "batch_size=64", "device=cpu",
              "progress=false", "init=iid"]
    bad = compose_config("train", [*common, "method=euler", "depth=3", "model.hidden=8",
                                   "adjoint.max_roundtrip=1e-9"], tmp_path / "bad")
    good = compose_config("train", [*common, "method=rev_heun", "depth=3",
                                    "adjoint.max_roundtrip=1e-4"], tmp_path / "good")
    with caplog.at_level(logging.WARNING, logger="rode"):
        train(good)
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        train(bad)
    assert any("passed adjoint.max_roundtrip=1e-09" in r.getMessage() for r in caplog.records)
    for name, low, high in [("good", 0, 1e-4), ("bad", 0, 1)]:
        text = (tmp_path / name / "metrics.jsonl").read_text()
        epochs = [line for line in map(json.loads, text.splitlines()) if "test_acc" in line]
        assert epochs and all(low <= e["roundtrip_error"] < high for e in epochs), name
    assert epochs[-1]["roundtrip_error"] > 1e-9   # bad: the rebuild is not exact


def test_bad_option_on_the_command_line_is_one_line(tmp_path):
    result = subprocess.run([*RODE, "train", "adjoint.anchor_every=0",
                             f"hydra.run.dir={tmp_path / 'run'}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "adjoint.anchor_every=0" in lines[0]
    assert not (tmp_path / "run").exists()
