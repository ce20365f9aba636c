"""The training engine on the real configs, in-process."""
import json
import subprocess
import sys
import zipfile
from itertools import pairwise

import pytest

from conftest import ROOT, compose_config
from runner.engine import train


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_defaults_reach_95_percent_on_digits(tmp_path):
    cfg = compose_config("train", ["progress=false", "device=cpu"], tmp_path)
    assert (cfg.dataset.name, cfg.model.name, cfg.depth, cfg.method, cfg.grad) == \
        ("digits", "mlp", 16, "euler", "adjoint")
    summary = train(cfg)
    assert summary["test_acc"] >= 0.95
    assert len(read_metrics(tmp_path)) == cfg.epochs


def test_same_config_and_seed_give_identical_metrics(tmp_path):
    runs = []
    for name in ["a", "b"]:
        cfg = compose_config("train", ["epochs=2", "depth=6", "method=heun", "init=iid",
                                       "progress=false", "device=cpu"], tmp_path / name)
        train(cfg)
        runs.append([{k: v for k, v in r.items() if k != "seconds"}
                     for r in read_metrics(tmp_path / name)])
    assert runs[0] == runs[1] and len(runs[0]) == 2


@pytest.mark.parametrize("grad", ["backprop", "adjoint"])
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_conv_resnet_with_batchnorm_trains(tmp_path, grad, method):
    cfg = compose_config("train", ["model=conv", "width=8", "depth=4", "epochs=1", f"grad={grad}",
                                   f"method={method}", "lr=0.01", "schedule=constant",
                                   "progress=false", "device=cpu", "dataset.val_fraction=0",
                                   "monitor=train_loss"], tmp_path)
    summary = train(cfg)
    assert summary["train_loss"] < 2.15   # ln(10) = 2.30 at chance
    assert summary["test_acc"] > 0.2      # chance is 0.1


@pytest.mark.parametrize("init", ["smooth", "iid", "zero", "tied"])
def test_every_init_trains_on_synthetic_data(tmp_path, init):
    cfg = compose_config("train", ["dataset=synthetic", f"init={init}", "epochs=2", "depth=8",
                                   "progress=false", "device=cpu"], tmp_path)
    assert train(cfg)["test_acc"] > 0.5   # 4 classes


def test_inits_shape_the_weights():
    import torch

    from runner.inits import init_iid, init_smooth, init_tied, init_zero
    from runner.models import MLPBlock

    def make():
        return MLPBlock(4, 4)

    tied = init_tied(make, 5)
    assert all(b is tied[0] for b in tied)
    zero = init_zero(make, 3)
    x = torch.randn(2, 4)
    assert all(torch.equal(b(x), torch.zeros(2, 4)) for b in zero)

    def max_increment(blocks):
        flat = [torch.cat([p.flatten() for p in b.parameters()]) for b in blocks]
        return max((a - b).norm().item() for a, b in pairwise(flat))
    # smooth in depth: increments O(1/N); iid: O(1) whatever N
    assert max_increment(init_smooth(make, 64)) < max_increment(init_smooth(make, 8)) / 4
    assert max_increment(init_iid(make, 64)) > 0.5 * max_increment(init_iid(make, 8))


@pytest.mark.slow   # builds a wheel with pip in a separate process
def test_built_wheel_ships_the_configs(tmp_path):
    """`pip install .` (not only -e) must carry conf/ as runner/conf."""
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    if out.returncode != 0 and "No module named" in out.stderr:
        pytest.skip("setuptools/wheel not available for a no-isolation build")
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("rode-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "runner/conf/train.yaml" in names
    assert "runner/conf/dataset/digits.yaml" in names and "runner/conf/hydra/rode.yaml" in names
    assert "runner/cli.py" in names


def test_momentum_factor_comes_from_config(tmp_path):
    from runner.models import build_model

    cfg = compose_config("train", ["method=momentum", "gamma=0.99", "depth=4"], tmp_path)
    model = build_model(cfg, (1, 8, 8), 10)
    assert model.stack.integrator.name == "momentum" and model.stack.integrator.gamma == 0.99


def test_tied_conv_blocks_share_weights_but_not_batchnorm_statistics():
    import torch

    from runner import ResidualStack
    from runner.inits import init_tied
    from runner.models import ConvBlock

    torch.manual_seed(0)
    blocks = init_tied(lambda: ConvBlock(4), 4)
    stack = ResidualStack(blocks, "euler", "adjoint").train()
    assert len(list(stack.parameters())) == len(list(blocks[0].parameters()))   # one weight set
    x = torch.randn(8, 4, 6, 6, requires_grad=True)
    stack(x).square().sum().backward()
    means = [b[1].running_mean for b in blocks]
    assert not torch.equal(means[0], means[3])   # each layer keeps its own statistics
    grads = [p.grad for p in blocks[0].parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
