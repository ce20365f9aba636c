"""Character-level language modelling on a text file (``dataset=text``).

The text is cut into non-overlapping windows of ``context + 1`` characters; a
seeded permutation of the windows assigns each to train, validation or test, so
the three splits are disjoint by position (no character is in two of them). A
sample is a window's first ``context`` characters, and its targets the next
character at every position: ``x = w[:-1]``, ``y = w[1:]``. The vocabulary is the
sorted set of characters of the whole text; the loss is per character, and the
train loop reports it in bits per character (``val_bpc``, ``test_bpc``).

``dataset.path=null`` reads a file every Python installation has, at run time:
the standard library's own ``argparse.py`` (its first ``max_chars`` characters).
"""
from __future__ import annotations

import sysconfig
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from .databundle import DataBundle
from .errors import ConfigError

DEFAULT_MODULE = "argparse.py"


def default_path() -> Path:
    """The standard library's ``argparse.py`` on this Python."""
    return Path(sysconfig.get_paths()["stdlib"]) / DEFAULT_MODULE


def read_text(cfg) -> str:
    path = Path(cfg.path) if cfg.get("path") else default_path()
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise ConfigError(f"dataset.path={path}: cannot read it ({e.strerror or e})") from None
    limit = cfg.get("max_chars")
    return text[:limit] if limit else text


def window_split(num_windows: int, test_fraction: float, val_fraction: float,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train, val, test) window indices: a seeded permutation, cut by fractions."""
    order = torch.randperm(num_windows, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(test_fraction * num_windows)))
    rest = num_windows - n_test
    n_val = int(round(val_fraction * rest)) if val_fraction else 0
    if val_fraction and n_val == 0:
        n_val = 1
    test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    return train, val, test


def text(cfg) -> DataBundle:
    """cfg: the ``dataset`` node (path, max_chars, context, test_fraction,
    val_fraction, split_seed)."""
    chars = read_text(cfg)
    context = int(cfg.context)
    vocab = sorted(set(chars))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in chars], dtype=torch.long)
    num_windows = len(ids) // (context + 1)
    val_fraction = float(cfg.get("val_fraction") or 0)
    if num_windows < 3:
        raise ConfigError(f"dataset.context={context}: the text has {len(ids)} characters, "
                          f"fewer than 3 windows of context+1; lower dataset.context")
    windows = ids[: num_windows * (context + 1)].reshape(num_windows, context + 1)
    train, val, test = window_split(num_windows, float(cfg.test_fraction), val_fraction,
                                    int(cfg.split_seed))
    if len(train) == 0:
        raise ConfigError(f"dataset.test_fraction={cfg.test_fraction} with dataset.val_fraction="
                          f"{val_fraction} leaves no training window")

    def part(rows):
        w = windows[rows]
        return TensorDataset(w[:, :-1].contiguous(), w[:, 1:].contiguous())

    bundle = DataBundle(part(train), part(test), (context,), len(vocab),
                        val=part(val) if len(val) else None, sequence=True)
    bundle.positions = {"train": train, "val": val, "test": test}   # window indices, for checks
    return bundle
