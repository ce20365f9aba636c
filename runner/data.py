"""Datasets: a registry of builders, each returning train and test splits in memory
or on disk, with the input shape and number of classes the model needs."""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from . import names
from .databundle import DataBundle
from .text import text
from .vision import VISION_DATASETS


def _split(x: torch.Tensor, y: torch.Tensor, test_fraction: float, seed: int):
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(test_fraction * len(x))))
    test, train = order[:n_test], order[n_test:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def digits(cfg) -> DataBundle:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes)."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (n, 1, 8, 8)
    y = torch.tensor(raw.target, dtype=torch.long)
    train, test = _split(x, y, cfg.test_fraction, cfg.split_seed)
    # Normalise with training statistics only.
    xt = train.tensors[0]
    mean, std = xt.mean(), xt.std()
    train = TensorDataset((xt - mean) / std, train.tensors[1])
    test = TensorDataset((test.tensors[0] - mean) / std, test.tensors[1])
    return DataBundle(train, test, (1, 8, 8), 10)


def synthetic(cfg) -> DataBundle:
    """A seeded in-memory task: Gaussian clusters around random class centres."""
    g = torch.Generator().manual_seed(cfg.seed)
    shape = tuple(int(s) for s in cfg.shape)
    dim = int(torch.tensor(shape).prod())
    centres = torch.randn(cfg.num_classes, dim, generator=g) * cfg.separation
    y = torch.randint(0, cfg.num_classes, (cfg.num_samples,), generator=g)
    x = centres[y] + torch.randn(cfg.num_samples, dim, generator=g)
    x = x.reshape(cfg.num_samples, *shape)
    train, test = _split(x, y, cfg.test_fraction, cfg.seed)
    return DataBundle(train, test, shape, int(cfg.num_classes))


DATASETS: dict[str, Callable[..., DataBundle]] = {"digits": digits, "synthetic": synthetic,
                                                  **VISION_DATASETS, "text": text}
names.agree(DATASETS, names.DATASETS, "DATASETS")


def build_dataset(cfg) -> DataBundle:
    """cfg: the ``dataset`` node of a task config."""
    return DATASETS[cfg.name](cfg)


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int,
                num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0)
