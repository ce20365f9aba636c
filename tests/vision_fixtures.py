"""Tiny image datasets written in each dataset's real on-disk format, so that the
real loading code runs on them (tests only: nothing here is downloaded)."""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def cifar_images(n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """n random 32x32 colour images as CIFAR stores them (n x 3072, channel-major)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), [int(v) for v in rng.integers(0, 10, n)]


def _pickle(obj, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root: Path, per_batch: int = 8, test: int = 8) -> dict:
    """<root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for i in range(1, 6):
        data, labels = cifar_images(per_batch, i)
        _pickle({"batch_label": f"training batch {i} of 5", "labels": labels, "data": data,
                 "filenames": [f"img_{i}_{k}.png" for k in range(per_batch)]},
                folder / f"data_batch_{i}")
        written[f"data_batch_{i}"] = (data, labels)
    data, labels = cifar_images(test, 0)
    _pickle({"batch_label": "testing batch 1 of 1", "labels": labels, "data": data,
             "filenames": [f"test_{k}.png" for k in range(test)]}, folder / "test_batch")
    written["test_batch"] = (data, labels)
    _pickle({"num_cases_per_batch": per_batch, "num_vis": 3072,
             "label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                             "horse", "ship", "truck"]}, folder / "batches.meta")
    return written


def write_cifar100(root: Path, train: int = 12, test: int = 6) -> dict:
    """<root>/cifar-100-python/{train, test, meta} (fine and coarse labels)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    written = {}
    for name, n, seed in (("train", train, 1), ("test", test, 2)):
        data, _ = cifar_images(n, seed)
        fine = [(7 * k + seed) % 100 for k in range(n)]
        _pickle({"filenames": [f"{name}_{k}.png" for k in range(n)], "batch_label": name,
                 "fine_labels": fine, "coarse_labels": [f // 5 for f in fine], "data": data},
                folder / name)
        written[name] = (data, fine)
    _pickle({"fine_label_names": [f"class{k}" for k in range(100)],
             "coarse_label_names": [f"super{k}" for k in range(20)]}, folder / "meta")
    return written


def _idx(array: np.ndarray) -> bytes:
    """The idx format: magic (0, 0, type 0x08 = ubyte, ndim), big-endian dims, data."""
    head = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return head + array.astype(np.uint8).tobytes()


def write_mnist(root: Path, folder: str = "MNIST", train: int = 20, test: int = 10,
                gz: bool = False) -> dict:
    """<root>/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for split, n in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            path = raw / f"{split}-{kind}-ubyte"
            blob = _idx(array)
            if gz:
                with gzip.open(path.with_suffix(".gz"), "wb") as f:
                    f.write(blob)
            else:
                path.write_bytes(blob)
        written[split] = (images, labels)
    return written


def write_image_folder(root: Path, classes=("ant", "bee"), train: int = 3, val: int = 2,
                       size: tuple[int, int] = (40, 30)) -> Path:
    """<root>/train/<class>/*.png and <root>/val/<class>/*.png."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True)
            for k in range(n):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{c}_{k}.png")
    return root
