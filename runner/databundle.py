"""What a dataset builder returns: train, test (and validation) splits, and the shapes a model needs."""
from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset


@dataclass
class DataBundle:
    train: Dataset
    test: Dataset
    input_shape: tuple[int, ...]
    num_classes: int
    val: Dataset | None = None   # held out from the training set (dataset.val_fraction)
    sequence: bool = False       # a target per position (dataset=text): y has x's shape
