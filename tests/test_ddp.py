"""DistributedDataParallel with 2 CPU processes on gloo: one step of K processes equals
one step of a single process on the combined batch, with the adjoint's custom
autograd Function inside; the real `torchrun ... -m runner train` writes once."""
import copy
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import compose_config

WORLD = 2
# (method, grad): every way gradients flow through a ResidualStack.
MODES = [("euler", "backprop"), ("euler", "adjoint"), ("heun", "adjoint")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(method, grad, tmp_path):
    from runner.data import build_dataset
    from runner.models import build_model

    cfg = compose_config("train", ["dataset=synthetic", "depth=6", "width=8", "init=iid",
                                   f"method={method}", f"grad={grad}", "device=cpu"], tmp_path)
    data = build_dataset(cfg.dataset)
    torch.manual_seed(0)
    model = build_model(cfg, data.input_shape, data.num_classes).double()
    x, y = data.train.tensors
    return model, x[:32].double(), y[:32]


def one_step(model, x, y):
    """Gradients, then weights, after one SGD step on (x, y)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    return grads, [p.detach().clone() for p in model.parameters()]


def _worker(rank, port, tmp_path, built):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from runner import distributed

    dist, device = distributed.setup(torch.device("cpu"))
    assert (dist.rank, dist.world_size) == (rank, WORLD)
    out = {}
    for mode in MODES:
        model, x, y = copy.deepcopy(built[mode])
        net = dist.wrap(model, device)
        # The sampler's split: this rank's rows of the combined batch.
        out[mode] = one_step(net, x[rank::WORLD], y[rank::WORLD])
    torch.save(out, tmp_path / f"rank{rank}.pt")
    dist.close()


def test_two_processes_step_like_one_on_the_combined_batch(tmp_path):
    # The processes are forked from this one, with the models built here (a spawned process
    # would import torch and compose the configs again: seconds each); each joins the
    # gloo group from the environment as under torchrun (distributed.setup).
    built = {mode: build(*mode, tmp_path) for mode in MODES}
    import torch._dynamo  # noqa: F401  DistributedDataParallel imports it: once, here, for both
    torch.multiprocessing.start_processes(_worker, args=(free_port(), tmp_path, built),
                                          nprocs=WORLD, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for mode in MODES:
        model, x, y = copy.deepcopy(built[mode])
        grads, weights = one_step(model, x, y)
        for r in ranks:
            ddp_grads, ddp_weights = r[mode]
            # identical on every rank (DDP's all-reduce), and the combined batch's
            for a, b in zip(ddp_grads, ranks[0][mode][0], strict=True):
                assert torch.equal(a, b), mode
            for a, b in zip(ddp_grads, grads, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=str(mode))
            for a, b in zip(ddp_weights, weights, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=str(mode))


def test_sampler_shares_make_the_single_process_batches():
    from runner.distributed import ShardSampler

    n, b = 103, 4
    single = list(ShardSampler(n, shuffle=True, seed=3))
    shares = [list(ShardSampler(n, shuffle=True, seed=3, rank=r, world_size=WORLD))
              for r in range(WORLD)]
    assert len(shares[0]) == len(shares[1]) == 52           # padded to a multiple of K
    for k in range(n // (b * WORLD)):
        combined = sorted(i for s in shares for i in s[k * b:(k + 1) * b])
        assert combined == sorted(single[k * b * WORLD:(k + 1) * b * WORLD])
    tests = [list(ShardSampler(n, shuffle=False, seed=3, rank=r, world_size=WORLD, pad=False))
             for r in range(WORLD)]
    assert sorted(tests[0] + tests[1]) == list(range(n))     # evaluation: each example once
    assert list(ShardSampler(n, shuffle=True, seed=4)) != single


@pytest.mark.slow
def test_torchrun_trains_like_one_process_and_only_rank_0_writes(tmp_path):
    args = ["train", "dataset=synthetic", "dataset.num_samples=400", "depth=4", "width=16",
            "epochs=2", "batch_size=64", "progress=false", "device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
         "-m", "runner", *args, f"hydra.run.dir={tmp_path / 'ddp'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("rode train: test accuracy") == 1      # rank 0 speaks
    single = subprocess.run([sys.executable, "-m", "runner", *args,
                             f"hydra.run.dir={tmp_path / 'one'}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr[-3000:]

    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "one"]
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("ddp", "one"))
    assert (a["world_size"], a["rank_param_max_diff"], b["world_size"]) == (2, 0.0, 1)
    assert a["steps"] == b["steps"] == 10                  # 320 training examples, batch 64
    assert a["test_acc"] == pytest.approx(b["test_acc"], abs=1e-9)
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    wa = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)["model"]
    for k in wb:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2                                 # written once, not once per rank
    log = (tmp_path / "ddp" / "train.log").read_text()
    assert log.count("epoch 2/2") == 1
