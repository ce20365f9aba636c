"""rode finetune: untie tied weights, change depth by interpolation, fine-tune."""
import json

import pytest
import torch
from torch import nn

from conftest import compose_config, validate_job
from runner.errors import ConfigError
from runner.stack import ResidualStack
from runner.tasks import finetune, train
from vision_fixtures import write_cifar10

FAST = ["epochs=1", "progress=false", "device=cpu"]





def test_resample_depth_follows_the_path():
    """Layers sampled from a path linear in depth, θ_n = a + (n/N) b, resample to
    θ'_m = a + (m/N') b exactly (up to the last old layer; constant after it)."""
    a, b = torch.randn(3, 3), torch.randn(3, 3)
    old_n, new_n = 4, 10
    layers = []
    for n in range(old_n):
        layer = nn.Linear(3, 3, bias=False)
        layer.weight.data = a + (n / old_n) * b
        layers.append(layer)
    new = finetune.resample_depth(layers, new_n)
    assert len(new) == new_n and len({id(f.weight) for f in new}) == new_n
    for m, layer in enumerate(new):
        t = min(m / new_n, (old_n - 1) / old_n)
        assert torch.allclose(layer.weight, a + t * b, atol=1e-6), m


def test_refine_unties_and_keeps_the_function():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5))
    model = nn.Sequential(nn.Identity(), ResidualStack([block] * 4, "heun", "backprop"))
    x = torch.randn(7, 5)
    before = model(x)
    finetune.refine(model, [4], "adjoint")
    stack = model[1]
    assert not finetune.is_tied(stack) and stack.grad_mode.name == "adjoint"
    assert stack.integrator.name == "heun" and stack.step_size == pytest.approx(1 / 4)
    assert torch.allclose(model(x), before, atol=1e-6)   # the same function, now untied
    with torch.no_grad():
        stack.functions[0][0].weight.add_(1.0)
    assert not torch.equal(stack.functions[0][0].weight, stack.functions[1][0].weight)

    finetune.refine(model, [16], "adjoint")   # tied -> any depth: copies, step 1/16
    assert model[1].depth == 16 and model[1].step_size == pytest.approx(1 / 16)


def test_recalibrate_gives_each_untied_layer_its_statistics():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Tanh())
    model = ResidualStack([block] * 3, "euler", "backprop", step_size=1.0)   # big steps
    x = torch.randn(256, 4) * 3 + 1
    model.train()
    model(x)   # the shared BatchNorm averages the statistics of all three layers
    finetune.refine(model, [3], "backprop")
    loader = [(x, None)] * 3   # the same batch: the average of its statistics is its own
    assert finetune.recalibrate_batchnorm(model, loader, torch.device("cpu"), 2) == 2

    running = [model.functions[n][1].running_mean.clone() for n in range(3)]
    h, means = x, []
    with torch.no_grad():
        for n in range(3):   # what each layer's BatchNorm sees, layer by layer
            pre = model.functions[n][0](h)
            means.append(pre.mean(0))
            h = model.step(n, h)
    for n in range(3):
        assert torch.allclose(running[n], means[n], atol=1e-5)
        assert model.functions[n][1].momentum == 0.1   # restored
    assert not torch.allclose(means[0], means[2], atol=1e-2)


def test_finetune_end_to_end_through_the_cli(tmp_path, rode_cli):
    run_dir = tmp_path / "tied"
    summary = train.run(compose_config(
        "train", ["model=conv", "init=tied", "depth=4", "width=8", *FAST], run_dir))
    ft_dir = tmp_path / "ft"
    out = rode_cli("finetune", f"checkpoint={run_dir}", "depth=8", *FAST, "lr=0.05",
                   f"hydra.run.dir={ft_dir}")
    assert out.code == 0, out.err
    assert "rode finetune: test accuracy" in out.out and "activation memory" in out.out

    result = json.loads((ft_dir / "summary.json").read_text())
    assert result["acc_before"] == pytest.approx(summary["test_acc"])   # the checkpoint's model
    assert result["tied"] == [True]
    assert (result["depth_before"], result["depth_after"]) == ([4], [8])
    assert result["acc_after"] == result["test_acc"]
    assert result["bn_recalibration_batches"] == 23   # all of digits' 1437 / 64 batches
    assert 0.0 <= result["acc_untied"] <= 1.0
    # The adjoint keeps only each stack's output; backprop keeps every step's activations.
    assert result["stack_saved_bytes_adjoint"] * 4 < result["stack_saved_bytes_backprop"]
    assert result["config"]["grad"] == "adjoint" and result["config"]["depth"] == 8
    lines = [json.loads(line) for line in (ft_dir / "metrics.jsonl").read_text().splitlines()]
    assert "test_acc" in lines[0] and lines[-1]["event"] == "finetune"

    # The fine-tuned checkpoint has 8 untied functions, and fine-tunes again.
    state = torch.load(ft_dir / "checkpoint.pt")["model"]
    w = [state[f"stack.functions.{n}.0.weight"] for n in range(8)]
    assert not torch.equal(w[0], w[7])
    again = finetune.run(compose_config(
        "finetune", [f"checkpoint={ft_dir / 'checkpoint.pt'}", "epochs=1", "progress=false",
                     "device=cpu", "grad=backprop"], tmp_path / "again"))
    assert again["tied"] == [False] and again["acc_before"] == pytest.approx(result["test_acc"])


def test_resnet_on_cifar_fixture(tmp_path):
    """A tied torchvision-topology ResNet on CIFAR files, refined to 2 functions per stage."""
    write_cifar10(tmp_path / "data", per_batch=8, test=8)
    data = ["dataset=cifar10", f"dataset.root={tmp_path / 'data'}", "dataset.num_workers=0"]
    run_dir = tmp_path / "tied"
    train.run(compose_config("train", ["model=resnet", "model.stem=cifar", "width=4",
                                       "init=tied", "batch_size=16", *data, *FAST], run_dir))
    cfg = compose_config("finetune", [f"checkpoint={run_dir}", "depth=[2,2,3,2]",
                                      "batch_size=16", *FAST], tmp_path / "ft")
    validate_job("finetune", cfg)
    result = finetune.run(cfg)
    assert result["depth_before"] == [1, 1, 1, 1] and result["depth_after"] == [2, 2, 3, 2]
    assert result["config"]["model"]["blocks"] == [2, 2, 3, 2]
    assert 0.0 <= result["acc_after"] <= 1.0 and result["steps"] == 3


def test_bad_input(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint is required"):
        validate_job("finetune", compose_config("finetune", [], tmp_path))
    with pytest.raises(ConfigError, match="checkpoint.pt does not exist"):
        validate_job("finetune", compose_config("finetune", [f"checkpoint={tmp_path}"], tmp_path))
    (tmp_path / "checkpoint.pt").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="is not a checkpoint"):
        validate_job("finetune", compose_config("finetune", [f"checkpoint={tmp_path}"], tmp_path))

    ckpt = tmp_path / "tied" / "checkpoint.pt"
    ckpt.parent.mkdir()
    model = nn.Sequential(ResidualStack([nn.Linear(2, 2)] * 3, "heun"))
    torch.save({"model": model.state_dict(), "config": {"method": "heun"}}, ckpt)
    for depth, message in (("[4,4]", "a list of 1 integers"), ("1", "too small for method=heun")):
        with pytest.raises(ConfigError, match=message):
            validate_job("finetune", compose_config(
                "finetune", [f"checkpoint={ckpt}", f"depth={depth}"], tmp_path))
