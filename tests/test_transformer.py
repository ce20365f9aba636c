"""model=transformer, method=coupled and dataset=text: the adjoint on attention blocks
(exact with the exactly reversible schemes, with dropout and a causal mask), the
coupled scheme's exact reverse, the text split, and the refusal of bad values."""
import copy
import json

import pytest
import torch
from omegaconf import OmegaConf

from runner.gradmodes import get_grad_mode
from runner.integrators import get_integrator
from runner.stack import ResidualStack
from runner.text import default_path, text
from runner.transformer import build_transformer, transformer_functions

VOCAB, CONTEXT = 11, 6


def lm(depth, method, *, block="parallel", init="smooth", dropout=0.1, width=8):
    """A float64 causal character LM with dropout, in training mode."""
    torch.manual_seed(0)
    model = build_transformer((CONTEXT,), VOCAB, depth=depth, width=width, init=init,
                              method=method, grad="backprop", block=block, heads=2,
                              mlp_ratio=2.0, dropout=dropout, sequence=True).double()
    return model.train()


def grads(model, x, y, grad, vjp="exact"):
    """Every parameter's gradient of the LM loss, flattened, with ``grad`` mode."""
    model = copy.deepcopy(model)
    model.stack.grad_mode = get_grad_mode(grad, **({"vjp": vjp} if grad == "adjoint" else {}))
    torch.manual_seed(1)   # the same dropout masks for both modes
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def batch():
    g = torch.Generator().manual_seed(2)
    return (torch.randint(0, VOCAB, (3, CONTEXT), generator=g),
            torch.randint(0, VOCAB, (3, CONTEXT), generator=g))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("method, block", [("rev_heun", "parallel"), ("momentum", "parallel"),
                                           ("coupled", "parallel"), ("coupled", "sequential")])
def test_adjoint_is_backprop_with_the_exact_schemes(method, block):
    """Causal attention, dropout in training mode: the adjoint rebuilds every state
    and replays every mask, so its gradient is backprop's to rounding, with the exact
    vjp and the shared one."""
    model = lm(4, method, block=block, init="iid")
    x, y = batch()
    reference = grads(model, x, y, "backprop")
    assert reference.norm() > 0
    for vjp in ("exact", "shared"):
        assert rel(grads(model, x, y, "adjoint", vjp), reference) < 1e-11, vjp


def test_dropout_is_on_and_changes_the_gradient():
    """The comparison above is not vacuous: the masks matter (another seed, another
    gradient) and the causal mask is in force (a later token does not move an earlier
    position's logits)."""
    model = lm(4, "coupled")
    x, y = batch()
    a = grads(model, x, y, "backprop")
    other = copy.deepcopy(model)
    other.stack.grad_mode = get_grad_mode("backprop")
    torch.manual_seed(7)
    torch.nn.functional.cross_entropy(other(x), y).backward()
    b = torch.cat([p.grad.flatten() for p in other.parameters()])
    assert rel(a, b) > 1e-3
    model.eval()
    with torch.no_grad():
        x2 = x.clone()
        x2[:, -1] = (x2[:, -1] + 1) % VOCAB
        out, out2 = model(x), model(x2)
    assert torch.allclose(out[..., :-1], out2[..., :-1], atol=1e-12)
    assert not torch.allclose(out[..., -1], out2[..., -1])


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_euler_heun_adjoint_error_falls_with_depth_on_tied_weights(method):
    """Tied weights are smooth in depth: the adjoint's error against backprop falls
    as the depth grows (O(1/N) for Euler)."""
    x, y = batch()
    errors = []
    for depth in (4, 16):
        model = lm(depth, method, init="tied", dropout=0.0)
        errors.append(rel(grads(model, x, y, "adjoint"), grads(model, x, y, "backprop")))
    assert 0 < errors[1] < errors[0] / 2, errors


def test_coupled_reverses_exactly_on_attention_blocks():
    """reverse(step(x)) == x to rounding for every step, even with large weights
    (where Euler's reverse is visibly off)."""
    torch.manual_seed(3)
    functions = [f.double() for f in transformer_functions(
        depth=6, width=8, heads=2, mlp_ratio=2.0, dropout=0.0, causal=True,
        block="parallel", init="iid")]
    with torch.no_grad():
        for p in torch.nn.ModuleList(functions).parameters():
            p.mul_(3.0)
    x = torch.randn(2, CONTEXT, 8, dtype=torch.float64)
    for method, bound in (("coupled", 1e-13), ("euler", None)):
        stack = ResidualStack(functions, method)
        states = stack.trajectory(x)
        rebuilt = stack.rebuild(states[-1])
        error = max(rel(a, b) for a, b in zip(rebuilt, states, strict=True))
        if bound is None:
            assert error > 1e-6
        else:
            assert error < bound


def test_coupled_needs_an_even_number_of_functions():
    functions = transformer_functions(depth=3, width=8, heads=2, mlp_ratio=1.0, dropout=0.0,
                                      causal=False, block="parallel", init="iid")
    with pytest.raises(ValueError, match="multiple of 2"):
        ResidualStack(functions, get_integrator("coupled"))


def text_cfg(**kw):
    base = {"name": "text", "path": None, "max_chars": 4000, "context": 15,
            "test_fraction": 0.2, "val_fraction": 0.1, "split_seed": 0}
    return OmegaConf.create({**base, **kw})


def test_text_split_is_seeded_and_disjoint(tmp_path):
    """Every window of the text is in exactly one split; the same seed gives the same
    split, another seed another; x and y are the window shifted by one character."""
    data = text(text_cfg())
    pos = {k: set(v.tolist()) for k, v in data.positions.items()}
    assert not pos["train"] & pos["val"] and not pos["train"] & pos["test"]
    assert not pos["val"] & pos["test"]
    assert pos["train"] | pos["val"] | pos["test"] == set(range(4000 // 16))
    again = text(text_cfg())
    assert all(torch.equal(data.positions[k], again.positions[k]) for k in pos)
    other = text(text_cfg(split_seed=1))
    assert not torch.equal(data.positions["test"], other.positions["test"])
    x, y = data.train.tensors
    assert x.shape[1] == 15 and torch.equal(x[:, 1:], y[:, :-1])
    assert data.sequence and data.input_shape == (15,)
    # The default text is the standard library's own source, read at run time.
    assert default_path().is_file()
    f = tmp_path / "t.txt"
    f.write_text("abcab" * 40)
    small = text(text_cfg(path=str(f), max_chars=None, context=7))
    assert small.num_classes == 3 and len(small.train) + len(small.val) + len(small.test) == 25


@pytest.mark.slow
def test_char_lm_trains_from_the_command_line(rode_cli, tmp_path):
    """`rode train model=transformer dataset=text ... monitor=val_bpc`: the epoch lines
    and the summary carry bits per character (the loss / ln 2), chosen by val_bpc."""
    run = tmp_path / "run"
    r = rode_cli("train", "model=transformer", "dataset=text", "dataset.max_chars=1500",
                 "dataset.context=16", "depth=2", "width=16", "epochs=2", "method=coupled",
                 "grad=adjoint", "monitor=val_bpc", "model.dropout=0.1", "device=cpu",
                 f"hydra.run.dir={run}")
    assert r.code == 0, r.err
    assert "bits/char" in r.out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["monitor"] == "val_bpc"
    assert summary["test_bpc"] == pytest.approx(summary["test_loss"] / 0.6931471805599453)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [rec for rec in records if "val_bpc" in rec]
    assert len(epochs) == 2 and epochs[-1]["val_bpc"] < epochs[0]["val_bpc"] + 1
    assert summary["selected_val_bpc"] == min(rec["val_bpc"] for rec in epochs)


@pytest.mark.parametrize("overrides, words", [
    (["dataset=text"], ["dataset=text", "model=transformer"]),
    (["monitor=val_bpc"], ["monitor=val_bpc", "dataset=text"]),
    (["model=transformer", "model.heads=3", "width=32"], ["model.heads", "width"]),
    (["model=transformer", "model.patch=3"], ["model.patch"]),
    (["model=transformer", "model.block=nope"], ["model.block", "parallel"]),
    (["model=transformer", "method=coupled", "depth=3"], ["depth=3", "method=coupled"]),
    (["model=transformer", "dataset=text", "dataset.path=/no/such/file.txt"], ["dataset.path"]),
    (["model=transformer", "dataset=text", "dataset.context=1"], ["dataset.context"]),
])
def test_bad_values_are_one_line(rode_cli, tmp_path, overrides, words):
    run = tmp_path / "run"
    r = rode_cli("train", *overrides, f"hydra.run.dir={run}")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1, r.err
    assert all(w in r.err for w in words), r.err
    assert not run.exists()


def test_smoothness_compares_functions_of_one_kind_in_a_sequential_block():
    """Attention and MLP alternate in a sequential stack: each is compared with the
    previous one of its kind (tied weights: 0; smooth: O(1))."""
    from runner.measure import smoothness

    def model(init):
        return build_transformer((8,), 5, depth=4, width=8, init=init, method="euler",
                                 grad="backprop", block="sequential", heads=2, sequence=True)

    assert smoothness(model("tied"))["smoothness"] == 0
    smooth = smoothness(model("smooth"))
    assert len(smooth["increments"]) == 6 and 0 < smooth["smoothness"] < 4
