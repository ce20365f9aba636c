import os
import sys
from pathlib import Path

# Tiny models in tests: one thread is faster than two and does not fight other
# processes; subprocesses (the real `rode` command) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RODE = [sys.executable, "-m", "runner"]


@pytest.fixture(autouse=True, scope="session")
def _threads():
    # Tiny models: one thread is faster than two and does not fight other processes.
    torch.set_num_threads(1)


def compose_config(task: str, overrides: list[str], out_dir):
    """The real task config, composed as `rode <task> overrides` would, with out_dir set."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module("runner.conf", version_base="1.3"):
        cfg = compose(config_name=task, overrides=[*overrides, f"out_dir={out_dir}"])
    GlobalHydra.instance().clear()
    return cfg


def tanh_block(width: int = 8):
    """A small float64 residual function f(x) = W2 tanh(W1 x + b1) + b2."""
    from runner.models import MLPBlock

    return MLPBlock(width, width, "tanh").double()


def flat_grads(stack, x):
    """Gradients of a fixed scalar loss w.r.t. the input and every parameter, flattened."""
    x = x.clone().requires_grad_(True)
    out = stack(x)
    loss = (out ** 2).sum() + out.sum()
    grads = torch.autograd.grad(loss, [x, *stack.parameters()])
    return torch.cat([g.flatten() for g in grads])
