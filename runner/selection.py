"""Honest model selection: a validation split taken from the training set, the
monitored metric, the best epoch (``best.pt``) and early stopping.

The test set is only ever reported, never used to choose: the best epoch is the one
with the best monitored value (``monitor``, a validation metric by default), and the
summary quotes the test accuracy *at that epoch*.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch.utils.data import Subset

from . import checkpoint, names
from .databundle import DataBundle
from .errors import ConfigError

BEST = "best.pt"

# The validation examples are the same for every run of a sweep (whatever its seed):
# runs are then compared on the same held-out data.
VAL_SPLIT_SEED = 0
# monitor -> True when larger is better
MONITORS = {"val_acc": True, "val_loss": False, "train_loss": False, "val_bpc": False}
names.agree(MONITORS, names.MONITORS, "MONITORS")


def split_validation(data: DataBundle, fraction: float, seed: int = VAL_SPLIT_SEED) -> DataBundle:
    """``data`` with ``fraction`` of its training examples (seeded) moved to ``val``."""
    if not fraction or data.val is not None:
        return data
    n = len(data.train)
    n_val = max(1, int(round(fraction * n)))
    if n_val >= n:
        raise ConfigError(f"dataset.val_fraction={fraction:g} of {n} training examples leaves "
                          f"none to train on; set a smaller dataset.val_fraction")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return DataBundle(Subset(data.train, order[n_val:]), data.test, data.input_shape,
                      data.num_classes, val=Subset(data.train, order[:n_val]))


@dataclass
class Selection:
    """The best epoch so far under ``monitor``, and the early-stopping count."""

    monitor: str = "val_acc"
    patience: int | None = None
    best_value: float | None = None
    best_epoch: int | None = None
    best_record: dict = field(default_factory=dict)
    bad_epochs: int = 0
    stopped: bool = False

    def update(self, record: dict) -> bool:
        """Take one epoch's record; True when it is the new best."""
        value = record.get(self.monitor)
        if value is None or not math.isfinite(value):
            improved = False
        elif self.best_value is None:
            improved = True
        else:
            improved = value > self.best_value if MONITORS[self.monitor] else value < self.best_value
        if improved:
            self.best_value, self.best_epoch = float(value), int(record["epoch"])
            self.best_record = dict(record)
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
            if self.patience is not None and self.bad_epochs >= self.patience:
                self.stopped = True
        return improved

    def state(self) -> dict:
        return asdict(self)

    def summary(self) -> dict:
        """What summary.json says about the chosen epoch."""
        rec = self.best_record
        return {"monitor": self.monitor, "best_epoch": self.best_epoch,
                "best_value": self.best_value,
                "selected_test_acc": rec.get("test_acc"), "selected_test_loss": rec.get("test_loss"),
                "selected_val_acc": rec.get("val_acc"), "selected_val_loss": rec.get("val_loss"),
                **({"selected_val_bpc": rec.get("val_bpc"), "selected_test_bpc": rec.get("test_bpc")}
                   if "test_bpc" in rec else {}),
                "stopped_early": self.stopped}


def save_best(model, config: dict, data: DataBundle, record: dict, path) -> None:
    """best.pt: the weights of the best epoch with their config (``rode finetune
    checkpoint=<run>/best.pt`` and ``rode gradcheck checkpoint=...`` read it)."""
    state = {"format": "rode-best", "model": model.state_dict(), "config": config,
             "data": {"input_shape": list(data.input_shape), "num_classes": data.num_classes},
             "epoch": int(record["epoch"]), "metrics": dict(record)}
    checkpoint.save(state, path)   # atomic, with the checksum checkpoint.load verifies


def from_config(cfg, saved: dict | None = None) -> Selection:
    """The run's selection state: fresh, or as a resumed checkpoint left it."""
    monitor = cfg.get("monitor") or "val_acc"
    stopping = cfg.get("early_stopping") or {}
    patience = stopping.get("patience") if hasattr(stopping, "get") else None
    sel = Selection(monitor=monitor, patience=patience)
    if saved:
        for key, value in saved.items():
            if key not in ("monitor", "patience") and hasattr(sel, key):
                setattr(sel, key, value)
    return sel


def objective(cfg, summary: dict):
    """The value(s) a hyperparameter search optimises: each name of ``objective``
    (default: the monitored metric), read from the best epoch's record, else from the
    summary (peak_memory_bytes, seconds). A list of names gives a list of values."""
    names = cfg.get("objective") or summary.get("monitor") or "val_acc"
    single = isinstance(names, str)
    values = []
    for name in ([names] if single else list(names)):
        best = summary.get("best_metrics") or {}
        value = best.get(name, summary.get(name))
        values.append(float(value) if value is not None else math.nan)
    return values[0] if single else values
