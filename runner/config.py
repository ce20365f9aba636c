"""Checks that turn a bad config value into one clear line (ConfigError, exit 2)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

from .errors import ConfigError

MAX_DEPTH = 100_000


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def check_choice(cfg, key: str, choices: Iterable[str]) -> str:
    choices = list(choices)
    value = _get(cfg, key)
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not a valid choice; choose from "
                          f"{', '.join(map(str, choices))}")
    return value


def check_int(cfg, key: str, low: int | None = None, high: int | None = None) -> int:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not value.is_integer()):
        raise ConfigError(f"{key}={value!r} must be an integer{_range(low, high)}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(f"{key}={value!r} is out of range: it must be an integer{_range(low, high)}")
    return int(value)


def check_float(cfg, key: str, low: float | None = None, high: float | None = None,
                positive: bool = False) -> float:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}={value!r} must be a number")
    if positive and not value > 0:
        raise ConfigError(f"{key}={value!r} must be a number > 0")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(f"{key}={value!r} must be a number{_range(low, high)}")
    return float(value)


def as_list(cfg, key: str) -> list:
    """``key=[a,b]`` as a list; a single value (``key=a``) is a list of one."""
    value = _get(cfg, key)
    if isinstance(value, (str, int, float, bool)) or value is None:
        values = [] if value is None else [value]
    else:
        values = list(value)
    if not values:
        raise ConfigError(f"{key}={value!r} is empty; give at least one value")
    return values


def check_choice_list(cfg, key: str, choices: Iterable[str]) -> list:
    """A non-empty list whose items are each one of ``choices``."""
    choices = list(choices)
    values = as_list(cfg, key)
    for v in values:
        if v not in choices:
            raise ConfigError(f"{key}: {v!r} is not a valid choice; choose from "
                              f"{', '.join(map(str, choices))}")
    return values


def check_int_list(cfg, key: str, low: int | None = None, high: int | None = None,
                   why: str = "") -> list[int]:
    """A non-empty list of integers in [low, high] (``why`` explains the bounds)."""
    values = as_list(cfg, key)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or (
                low is not None and v < low) or (high is not None and v > high):
            raise ConfigError(f"{key}: {v!r} must be an integer{_range(low, high)}{why}")
    return [int(v) for v in values]


def show_progress(cfg) -> bool:
    """tqdm bars: on with ``progress=true`` and only when stdout is a terminal."""
    import sys

    return bool(cfg.get("progress", True)) and sys.stdout.isatty()


def check_bool(cfg, key: str) -> bool:
    value = _get(cfg, key)
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be true or false")
    return value


def _range(low, high) -> str:
    if low is not None and high is not None:
        return f" in [{low}, {high}]"
    if low is not None:
        return f" >= {low}"
    if high is not None:
        return f" <= {high}"
    return ""


def check_device(cfg, key: str = "device") -> str:
    import torch

    device = check_choice(cfg, key, ["cpu", "cuda", "auto"])
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}=cuda but no CUDA device is available; use {key}=cpu or {key}=auto")
    return device


IMAGE_MODELS = ("conv", "resnet")


def check_image_data(cfg) -> None:
    """Convolutional models need (C, H, W) inputs; a flat dataset is refused by name."""
    if cfg.model.name in IMAGE_MODELS and len(cfg.dataset.get("shape", [1, 8, 8])) != 3:
        raise ConfigError(f"model={cfg.model.name} needs image data; dataset={cfg.dataset.name} "
                          f"gives shape {list(cfg.dataset.shape)} (set dataset.shape=[C,H,W])")


def check_model_config(cfg) -> None:
    """The knobs every task that builds a ResidualStack model shares."""
    from .gradmodes import GRAD_MODES
    from .integrators import INTEGRATORS
    from .models import INITS, grad_mode_from_config

    method = check_choice(cfg, "method", INTEGRATORS)
    if method == "momentum" and "gamma" in cfg:
        check_float(cfg, "gamma", positive=True, high=0.999999)
    check_choice(cfg, "grad", GRAD_MODES)
    grad_mode_from_config(cfg)   # a bad option of that grad mode (adjoint.vjp=...): one line
    check_choice(cfg, "init", INITS)
    low = INTEGRATORS[method].min_functions
    depth = check_int(cfg, "depth", 1, MAX_DEPTH)
    if depth < low:
        raise ConfigError(f"depth={depth} is too small for method={method}: it needs depth >= {low}")
    check_int(cfg, "width", 1, 65_536)
    check_int(cfg, "seed", 0)


def check_training_config(cfg) -> None:
    check_int(cfg, "epochs", 1)
    check_int(cfg, "batch_size", 1)
    if "eval_batch_size" in cfg:
        check_int(cfg, "eval_batch_size", 1)
    if cfg.get("threads") is not None:
        check_int(cfg, "threads", 1, 1024)
    check_float(cfg, "lr", positive=True)
    check_float(cfg, "momentum", 0.0, 1.0)
    check_float(cfg, "weight_decay", 0.0)
    check_choice(cfg, "optimizer", ["sgd", "adam"])
    check_choice(cfg, "schedule", ["constant", "step", "cosine"])
    check_bool(cfg, "progress")
    check_device(cfg)


def check_writable_dir(path, key: str = "out_dir") -> Path:
    """ConfigError unless ``path`` is, or can be created as, a directory this process
    can write in. Probes by creating (and removing) a temporary dir in the nearest
    existing ancestor: permission bits alone do not tell (root, read-only mounts)."""
    path = Path(str(path)).expanduser().absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}={path}: cannot create a directory there ({existing} is a file)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".rode-probe-", dir=existing))
    except OSError as e:
        raise ConfigError(f"{key}={path}: cannot write there ({e.strerror or type(e).__name__} "
                          f"in {existing})") from None
    return path
