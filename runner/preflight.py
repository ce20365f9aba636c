"""Checks of a config that need torch: is the device there, can amp run on it.

They run after the schema and the rules (``runner.config``), from the ``validate``
of the tasks that need them, still before anything is written.
"""
from __future__ import annotations

import torch

from .errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_device(cfg, key: str = "device") -> torch.device:
    name = cfg[key]
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}=cuda but no CUDA device is available; use {key}=cpu or {key}=auto")
    return resolve_device(name)


def check_amp(cfg) -> None:
    """amp=true needs a CUDA device."""
    device = check_device(cfg)
    if cfg.amp and device.type != "cuda":
        raise ConfigError(f"amp=true needs a CUDA device (device={cfg.device} gives {device}); "
                          f"set amp=false")
