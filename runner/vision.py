"""Image datasets on disk: MNIST, Fashion-MNIST, CIFAR-10/100 and ImageNet folders.

Each lives under ``dataset.root`` in the layout torchvision uses, so one root can
hold them all::

    <root>/MNIST/raw/train-images-idx3-ubyte ...      (mnist; .gz files are unpacked)
    <root>/FashionMNIST/raw/train-images-idx3-ubyte ... (fashion_mnist)
    <root>/cifar-10-batches-py/data_batch_1 ...        (cifar10)
    <root>/cifar-100-python/train, test, meta          (cifar100)
    <root>/train/<class>/<image>, <root>/val/<class>/<image>   (imagenet)

Nothing is fetched unless ``dataset.download=true``; missing files are a
ConfigError that names the root searched and how to get the data.
"""
from __future__ import annotations

import gzip
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from . import names
from .compat import require_torchvision
from .databundle import DataBundle
from .errors import ConfigError, RunFailed


@dataclass(frozen=True)
class Source:
    """Where a dataset's files sit under the root, and what it looks like."""

    title: str
    folder: str                  # sub-folder of the root ("" for imagenet)
    files: tuple[str, ...]       # what must exist in it
    shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fetch: str                   # how to get the files, for the error message


_IDX = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

SOURCES: dict[str, Source] = {
    "mnist": Source("MNIST", "MNIST/raw", _IDX, (1, 28, 28), 10, (0.1307,), (0.3081,),
                    "set dataset.download=true, or put the four idx files (or their .gz) there"),
    "fashion_mnist": Source(
        "Fashion-MNIST", "FashionMNIST/raw", _IDX, (1, 28, 28), 10, (0.2860,), (0.3530,),
        "set dataset.download=true, or put the four idx files (or their .gz) there"),
    "cifar10": Source(
        "CIFAR-10", "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta"),
        (3, 32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        "set dataset.download=true, or unpack cifar-10-python.tar.gz into the root"),
    "cifar100": Source(
        "CIFAR-100", "cifar-100-python", ("train", "test", "meta"),
        (3, 32, 32), 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
        "set dataset.download=true, or unpack cifar-100-python.tar.gz into the root"),
    "imagenet": Source(
        "ImageNet", "", ("train", "val"), (3, 224, 224), 1000, _IMAGENET_MEAN, _IMAGENET_STD,
        "it cannot be downloaded automatically: lay it out as <root>/train/<class>/<image> "
        "and <root>/val/<class>/<image> (the same class folders in both)"),
}


# ---------------------------------------------------------------- checking
def root_of(cfg) -> Path:
    """``dataset.root`` as an absolute path (relative paths: from the working directory)."""
    return Path(str(cfg.root)).expanduser().resolve()


def missing_files(name: str, root: Path) -> list[Path]:
    src = SOURCES[name]
    folder = root / src.folder
    missing = []
    for f in src.files:
        path = folder / f
        if name == "imagenet":
            if not (path.is_dir() and any(p.is_dir() for p in path.iterdir())):
                missing.append(path)
        elif not path.is_file() and not (name.endswith("mnist") and path.with_suffix(".gz").is_file()):
            missing.append(path)
    return missing


def check_dataset_files(cfg) -> None:
    """An image dataset's files, unless they will be downloaded (its keys' types and
    ranges are the schema's). cfg: the ``dataset`` node. Other datasets pass through."""
    if cfg.name not in SOURCES:
        return
    require_torchvision(f"dataset={cfg.name}")
    download = bool(cfg.download)
    root = root_of(cfg)
    missing = [] if download else missing_files(cfg.name, root)
    if missing:
        src = SOURCES[cfg.name]
        raise ConfigError(f"dataset.root={root}: {src.title} not found (missing "
                          f"{_short(missing, root)}); {src.fetch}")


def _short(paths: list[Path], root: Path) -> str:
    names = [str(p.relative_to(root)) for p in paths[:2]]
    return ", ".join(names) + (f" and {len(paths) - 2} more" if len(paths) > 2 else "")


# -------------------------------------------------------------- transforms
def _transforms(src: Source, train: bool, augment: bool, cfg):
    from torchvision import transforms as T

    norm = [T.ToTensor(), T.Normalize(src.mean, src.std)]
    if src.title == "ImageNet":
        size, resize = int(cfg.image_size), int(cfg.resize)
        if train and augment:
            return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *norm])
        return T.Compose([T.Resize(resize), T.CenterCrop(size), *norm])
    if train and augment and src.shape[0] == 3:   # CIFAR: the standard crop + flip
        return T.Compose([T.RandomCrop(src.shape[-1], padding=4), T.RandomHorizontalFlip(), *norm])
    return T.Compose(norm)


# ----------------------------------------------------------------- readers
class CIFAR(Dataset):
    """CIFAR-10/100 from the python pickles (``data``: N x 3072 uint8, labels)."""

    def __init__(self, folder: Path, files: list[str], label_key: str, transform=None):
        images, labels = [], []
        for name in files:
            with open(folder / name, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            images.append(np.asarray(entry["data"], dtype=np.uint8))
            labels.extend(entry[label_key])
        self.data = np.concatenate(images).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        self.targets = [int(t) for t in labels]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        image = Image.fromarray(self.data[i])
        return (self.transform(image) if self.transform else image), self.targets[i]


def _cifar(cfg, name: str) -> tuple[Dataset, Dataset]:
    check_dataset_files(cfg)
    src, root = SOURCES[name], root_of(cfg)
    if cfg.download:
        _download(name, root)
    folder = root / src.folder
    if name == "cifar10":
        train_files, test_files, key = list(src.files[:5]), ["test_batch"], "labels"
    else:
        train_files, test_files, key = ["train"], ["test"], "fine_labels"
    augment = bool(cfg.get("augment", True))
    try:
        train = CIFAR(folder, train_files, key, _transforms(src, True, augment, cfg))
        test = CIFAR(folder, test_files, key, _transforms(src, False, augment, cfg))
    except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as e:
        raise ConfigError(f"dataset.root={root}: cannot read {src.title} from {folder} "
                          f"({type(e).__name__}: {e}); {src.fetch}") from None
    return train, test


def _mnist(cfg, name: str) -> tuple[Dataset, Dataset]:
    from torchvision import datasets

    check_dataset_files(cfg)
    src, root = SOURCES[name], root_of(cfg)
    if cfg.download:
        _download(name, root)
    raw = root / src.folder
    for f in src.files:   # the files as distributed are gzipped; torchvision reads them unpacked
        if not (raw / f).is_file() and (raw / f).with_suffix(".gz").is_file():
            with gzip.open((raw / f).with_suffix(".gz"), "rb") as fin, open(raw / f, "wb") as fout:
                shutil.copyfileobj(fin, fout)
    cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
    try:
        return (cls(str(root), train=True, transform=_transforms(src, True, False, cfg)),
                cls(str(root), train=False, transform=_transforms(src, False, False, cfg)))
    except (RuntimeError, OSError, ValueError, TypeError, AssertionError) as e:
        raise ConfigError(f"dataset.root={root}: cannot read {src.title} from {raw} "
                          f"({type(e).__name__}: {e}); {src.fetch}") from None


def _imagenet(cfg) -> tuple[Dataset, Dataset]:
    from torchvision import datasets

    check_dataset_files(cfg)
    src, root = SOURCES["imagenet"], root_of(cfg)
    augment = bool(cfg.get("augment", True))
    train = datasets.ImageFolder(str(root / "train"), _transforms(src, True, augment, cfg))
    test = datasets.ImageFolder(str(root / "val"), _transforms(src, False, augment, cfg))
    if train.classes != test.classes:
        extra = sorted(set(train.classes) ^ set(test.classes))[:3]
        raise ConfigError(f"dataset.root={root}: train/ and val/ must hold the same class "
                          f"folders (they differ in e.g. {', '.join(extra)})")
    return train, test


def _download(name: str, root: Path) -> None:
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST,
           "cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    root.mkdir(parents=True, exist_ok=True)
    try:
        cls(str(root), train=True, download=True)
    except Exception as e:   # network errors come in many types; all mean the same here
        raise RunFailed(f"could not download {SOURCES[name].title} into {root}: "
                        f"{type(e).__name__}: {e}") from None


# ----------------------------------------------------------------- builders
def _bundle(cfg, name: str, train: Dataset, test: Dataset, num_classes: int) -> DataBundle:
    src = SOURCES[name]
    shape = src.shape if name != "imagenet" else (3, int(cfg.image_size), int(cfg.image_size))
    limit = cfg.get("limit")
    if limit is not None:   # a seeded random subset: ImageFolder is sorted by class
        train, test = _subset(train, limit, 0), _subset(test, limit, 1)
    return DataBundle(train, test, shape, num_classes)


def _subset(dataset: Dataset, limit: int, seed: int) -> Dataset:
    if limit >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, order[:limit].tolist())


def mnist(cfg) -> DataBundle:
    """MNIST handwritten digits: 60000 + 10000 28x28 grey images, 10 classes."""
    return _bundle(cfg, "mnist", *_mnist(cfg, "mnist"), 10)


def fashion_mnist(cfg) -> DataBundle:
    """Fashion-MNIST: 60000 + 10000 28x28 grey images of clothes, 10 classes."""
    return _bundle(cfg, "fashion_mnist", *_mnist(cfg, "fashion_mnist"), 10)


def cifar10(cfg) -> DataBundle:
    """CIFAR-10: 50000 + 10000 32x32 colour images, 10 classes; crop+flip augmentation."""
    return _bundle(cfg, "cifar10", *_cifar(cfg, "cifar10"), 10)


def cifar100(cfg) -> DataBundle:
    """CIFAR-100: 50000 + 10000 32x32 colour images, 100 (fine) classes."""
    return _bundle(cfg, "cifar100", *_cifar(cfg, "cifar100"), 100)


def imagenet(cfg) -> DataBundle:
    """An ImageFolder tree with train/ and val/ (ILSVRC-2012 or any subset of it)."""
    train, test = _imagenet(cfg)
    return _bundle(cfg, "imagenet", train, test, len(train.classes))


VISION_DATASETS = {"mnist": mnist, "fashion_mnist": fashion_mnist, "cifar10": cifar10,
                   "cifar100": cifar100, "imagenet": imagenet}
names.agree(VISION_DATASETS, names.IMAGE_DATASETS, "VISION_DATASETS")
names.agree(SOURCES, names.IMAGE_DATASETS, "SOURCES")
