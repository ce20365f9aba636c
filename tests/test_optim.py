"""FlatOptimizer: torch's Adam and SGD stepping flat buffers, with torch's results and layout."""
import io

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from test_resume import SignalAt

from conftest import RESUMABLE_RUN, compose_config
from runner import checkpoint, engine
from runner.engine import train
from runner.errors import Interrupted
from runner.models import build_mlp, build_model
from runner.optim import FlatOptimizer
from runner.tasks.train import resume_config

OPTIMIZERS = {"adam": (torch.optim.Adam, {"lr": 1e-2, "weight_decay": 0.1}),
              "sgd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1})}


def small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_mlp((16,), 3, depth=6, width=8, hidden=None, activation="relu", init="iid",
                     method="heun", grad="backprop")


def batches(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 16, generator=g), torch.randint(0, 3, (32,), generator=g))
            for _ in range(n)]


def train_steps(model, optimizer, data, scheduler=None, drop=()) -> None:
    """One optimizer step per batch; the parameters in ``drop`` get no gradient."""
    for x, y in data:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        for p in drop:
            p.grad = None
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def pair(name: str):
    """Two equal models: one with torch's fused optimizer, one with a FlatOptimizer."""
    inner, hyper = OPTIMIZERS[name]
    a, b = small_model(), small_model()
    return a, inner(a.parameters(), fused=True, **hyper), b, FlatOptimizer(b.parameters(), inner, **hyper)


def assert_same_parameters(a, b) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name


def assert_same_layout(expected: dict, got: dict) -> None:
    """Same groups (keys in the same order, values) and per-parameter state (ids, keys,
    tensors' dtype, device, shape and values)."""
    assert got["param_groups"] == expected["param_groups"]
    assert [list(g) for g in got["param_groups"]] == [list(g) for g in expected["param_groups"]]
    assert list(got["state"]) == list(expected["state"])
    for k, entry in expected["state"].items():
        assert list(got["state"][k]) == list(entry)
        for key, value in entry.items():
            mine = got["state"][k][key]
            assert (mine.dtype, mine.device, mine.shape) == (value.dtype, value.device, value.shape)
            assert torch.equal(mine, value), (k, key)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_steps_are_torchs_bit_for_bit(name):
    a, torch_opt, b, flat_opt = pair(name)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.7 ** s) for o in (torch_opt, flat_opt)]
    data = batches(5)
    train_steps(a, torch_opt, data, schedules[0])
    train_steps(b, flat_opt, data, schedules[1])
    assert_same_parameters(a, b)
    assert flat_opt.param_groups[0]["lr"] == torch_opt.param_groups[0]["lr"] == \
        OPTIMIZERS[name][1]["lr"] * 0.7 ** 5
    # The parameters are views of one flat buffer, stepped by one fused call.
    (flat,) = flat_opt._flats[0]
    assert all(p.untyped_storage().data_ptr() == flat.param.untyped_storage().data_ptr()
               for p in b.parameters())
    assert flat_opt.inner.param_groups[0]["fused"] is True


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_grad_scaler_unscales_and_skips_like_torchs_fused_kernel(name):
    # torch's fused optimizers unscale inside their kernel; here GradScaler unscales the
    # parameters' gradients first. A step with an inf gradient is skipped by both.
    a, torch_opt, b, flat_opt = pair(name)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) for _ in range(2)]
    for n, (x, y) in enumerate(batches(4)):
        for model, optimizer, scaler in [(a, torch_opt, scalers[0]), (b, flat_opt, scalers[1])]:
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(F.cross_entropy(model(x), y)).backward()
            if n == 2:
                next(model.parameters()).grad[0] = float("inf")
            scaler.step(optimizer)
            scaler.update()
    assert scalers[0].get_scale() == scalers[1].get_scale() == 2.0 ** 9
    assert_same_parameters(a, b)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_dict_is_torchs_and_loads_both_ways(name):
    inner, hyper = OPTIMIZERS[name]
    a, torch_opt, b, flat_opt = pair(name)
    data = batches(6)
    train_steps(a, torch_opt, data[:3])
    train_steps(b, flat_opt, data[:3])
    mine = flat_opt.state_dict()
    assert_same_layout(torch_opt.state_dict(), mine)
    # Copies: stepping on leaves the state dict as it was.
    saved = io.BytesIO()
    torch.save(mine, saved)
    train_steps(b, flat_opt, data[3:4])
    saved.seek(0)
    assert_same_layout(torch.load(saved, weights_only=True), mine)

    # torch -> flat and flat -> torch, each from the state after 3 steps.
    c, d = small_model(), small_model()
    c.load_state_dict(a.state_dict())
    d.load_state_dict(a.state_dict())
    from_torch = FlatOptimizer(c.parameters(), inner, **hyper)
    from_torch.load_state_dict(torch_opt.state_dict())
    from_flat = inner(d.parameters(), fused=True, **hyper)
    saved.seek(0)
    from_flat.load_state_dict(torch.load(saved, weights_only=True))
    train_steps(a, torch_opt, data[3:])
    for model, optimizer in [(c, from_torch), (d, from_flat)]:
        train_steps(model, optimizer, data[3:])
        assert_same_parameters(a, model)
    assert_same_layout(torch_opt.state_dict(), from_torch.state_dict())


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_parameter_without_a_gradient_is_left_as_it_is(name):
    a, torch_opt, b, flat_opt = pair(name)
    data = batches(3)
    skip = [list(m.parameters())[3] for m in (a, b)]    # never a gradient
    once = [list(m.parameters())[5] for m in (a, b)]    # a gradient at the first step only
    before = skip[1].detach().clone()
    for model, optimizer, s, o in [(a, torch_opt, skip[0], once[0]), (b, flat_opt, skip[1], once[1])]:
        train_steps(model, optimizer, data[:1], drop=[s])
        train_steps(model, optimizer, data[1:], drop=[s, o])
    assert torch.equal(skip[1], before)    # weight decay would have moved it
    assert_same_parameters(a, b)
    expected, got = torch_opt.state_dict()["state"], flat_opt.state_dict()["state"]
    assert 3 not in got and list(got) == list(expected)   # no state, as torch
    for key, value in expected[5].items():
        if key != "step":    # one count per flat buffer (3 here; torch's: 1)
            assert torch.equal(got[5][key], value), key
    # Loading torch's state, whose counts differ, keeps the largest.
    inner, hyper = OPTIMIZERS[name]
    loaded = FlatOptimizer(small_model().parameters(), inner, **hyper)
    loaded.load_state_dict(torch_opt.state_dict())
    assert_same_layout(flat_opt.state_dict(), loaded.state_dict())


def test_frozen_parameters_are_not_flattened_nor_changed():
    a, b = small_model(), small_model()
    for model in (a, b):
        list(model.parameters())[2].requires_grad_(False)
    inner, hyper = OPTIMIZERS["adam"]
    torch_opt = inner(a.parameters(), fused=True, **hyper)
    flat_opt = FlatOptimizer(b.parameters(), inner, **hyper)
    frozen = list(b.parameters())[2]
    before = frozen.detach().clone()
    data = batches(3)
    train_steps(a, torch_opt, data)
    train_steps(b, flat_opt, data)
    assert torch.equal(frozen, before)
    assert all(p is not frozen for p in flat_opt._flats[0][0].params)
    assert_same_parameters(a, b)
    assert_same_layout(torch_opt.state_dict(), flat_opt.state_dict())
    frozen.requires_grad_(True)   # unfrozen after construction: never stepped, so an error
    with pytest.raises(RuntimeError, match="build the optimizer after unfreezing"):
        train_steps(b, flat_opt, data[:1])


def test_closure_and_the_foreach_path_for_what_fused_kernels_do_not_take():
    # Complex parameters: torch's fused kernels refuse them, its foreach path takes them.
    torch.manual_seed(0)
    target = torch.randn(5, dtype=torch.complex64)
    a = torch.nn.Parameter(torch.randn(5, dtype=torch.complex64))
    b = torch.nn.Parameter(a.detach().clone())
    torch_opt = torch.optim.Adam([a], lr=0.1, foreach=True)
    flat_opt = FlatOptimizer([b], torch.optim.Adam, lr=0.1)
    assert flat_opt.param_groups[0]["foreach"] is True and flat_opt.param_groups[0]["fused"] is None
    for _ in range(3):
        losses = []
        for p, optimizer in [(a, torch_opt), (b, flat_opt)]:
            def closure(p=p, optimizer=optimizer):
                optimizer.zero_grad()
                loss = (p - target).abs().pow(2).sum()
                loss.backward()
                return loss
            losses.append(optimizer.step(closure))
        assert torch.equal(losses[0], losses[1])
    assert torch.equal(a, b)
    assert_same_layout(torch_opt.state_dict(), flat_opt.state_dict())


def test_build_optimizer_flattens_after_the_model_is_built():
    model = small_model()
    for optimizer in ["adam", "sgd"]:
        cfg = compose_config("train", [f"optimizer={optimizer}"], "/nonexistent")
        built = engine.build_optimizer(cfg, model)
        assert isinstance(built, FlatOptimizer)
        assert type(built.inner).__name__.lower() == optimizer
        assert built.param_groups[0]["fused"] is True and built.param_groups[0]["lr"] == cfg.lr


def test_rode_train_writes_torchs_checkpoint_layout(rode_cli, tmp_path):
    run = tmp_path / "run"
    out = rode_cli("train", *RESUMABLE_RUN, "epochs=1", "optimizer=adam", f"hydra.run.dir={run}")
    assert out.code == 0, out.err
    ckpt = checkpoint.load(run, "resume")   # the checksum verifies
    model = build_model(OmegaConf.create(ckpt["config"]), tuple(ckpt["data"]["input_shape"]),
                        ckpt["data"]["num_classes"])
    weights = list(model.parameters())
    state = ckpt["optimizer"]["state"]
    assert list(state) == ckpt["optimizer"]["param_groups"][0]["params"] == list(range(len(weights)))
    for entry, weight in zip(state.values(), weights, strict=True):
        assert list(entry) == ["step", "exp_avg", "exp_avg_sq"]
        assert entry["step"].dtype == torch.float32 and entry["step"].item() == ckpt["step"]
        assert entry["exp_avg"].shape == entry["exp_avg_sq"].shape == weight.shape


def torch_optimizer(cfg, model):
    """What rode trained with before flat buffers: torch's fused Adam."""
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


@pytest.mark.parametrize("first,then", [(torch_optimizer, engine.build_optimizer),
                                        (engine.build_optimizer, torch_optimizer)],
                         ids=["torch's checkpoint resumed flat", "flat checkpoint resumed by torch"])
def test_checkpoints_resume_across_optimizers(tmp_path, monkeypatch, first, then):
    whole = tmp_path / "whole"
    train(compose_config("train", RESUMABLE_RUN, whole))
    cut = tmp_path / "cut"
    monkeypatch.setattr(engine, "build_optimizer", first)
    with pytest.raises(Interrupted):
        train(compose_config("train", RESUMABLE_RUN, cut), hooks=[SignalAt(37)])
    monkeypatch.setattr(engine, "build_optimizer", then)
    ckpt = checkpoint.load(cut, "resume")
    cfg = compose_config("train", [*RESUMABLE_RUN, f"resume={cut}"], cut)
    assert train(resume_config(cfg, ckpt), resume=ckpt)["status"] == "completed"
    a = torch.load(whole / "checkpoint.pt", weights_only=True)
    b = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert_same_layout(a["optimizer"], b["optimizer"])
