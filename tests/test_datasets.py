"""The image datasets, loaded by the real code from fixtures in their real on-disk formats."""
import numpy as np
import pytest
import torch

from conftest import compose_config, validate_job
from runner.data import build_dataset
from runner.errors import ConfigError
from runner.vision import SOURCES
from vision_fixtures import write_cifar10, write_cifar100, write_image_folder, write_mnist


def dataset_cfg(tmp_path, name, *overrides):
    cfg = compose_config("train", [f"dataset={name}", f"dataset.root={tmp_path / 'data'}",
                                   "dataset.num_workers=0", *overrides], tmp_path)
    return cfg.dataset


def normalised(pixels: np.ndarray, name: str) -> torch.Tensor:
    """(H, W, C) uint8 -> the (C, H, W) tensor ToTensor + Normalize give."""
    src = SOURCES[name]
    x = torch.tensor(pixels, dtype=torch.float32).permute(2, 0, 1) / 255
    return (x - torch.tensor(src.mean)[:, None, None]) / torch.tensor(src.std)[:, None, None]


def test_cifar10_pickles(tmp_path):
    written = write_cifar10(tmp_path / "data", per_batch=4, test=6)
    data = build_dataset(dataset_cfg(tmp_path, "cifar10"))
    assert (len(data.train), len(data.test)) == (20, 6)
    assert data.input_shape == (3, 32, 32) and data.num_classes == 10

    # Test images: exactly the stored pixels (channel-major rows), normalised.
    raw, labels = written["test_batch"]
    for i in (0, 5):
        x, y = data.test[i]
        pixels = raw[i].reshape(3, 32, 32).transpose(1, 2, 0)
        assert torch.allclose(x, normalised(pixels, "cifar10"), atol=1e-5)
        assert y == labels[i]
    # Training batches in order 1..5; labels follow.
    assert [data.train[k][1] for k in range(4, 8)] == written["data_batch_2"][1]

    # Augmentation: random crop (padding 4) + flip changes the image, seeded by torch.
    x0 = normalised(written["data_batch_1"][0][0].reshape(3, 32, 32).transpose(1, 2, 0), "cifar10")
    torch.manual_seed(0)
    draws = [data.train[0][0] for _ in range(8)]
    assert all(d.shape == (3, 32, 32) for d in draws)
    assert any(not torch.allclose(d, x0, atol=1e-5) for d in draws)
    torch.manual_seed(0)
    assert torch.equal(data.train[0][0], draws[0])   # the same seed, the same crop

    plain = build_dataset(dataset_cfg(tmp_path, "cifar10", "dataset.augment=false"))
    assert torch.allclose(plain.train[0][0], x0, atol=1e-5)


def test_cifar100_fine_labels_and_limit(tmp_path):
    written = write_cifar100(tmp_path / "data", train=12, test=6)
    data = build_dataset(dataset_cfg(tmp_path, "cifar100"))
    assert data.num_classes == 100 and (len(data.train), len(data.test)) == (12, 6)
    assert [data.test[i][1] for i in range(6)] == written["test"][1]

    small = build_dataset(dataset_cfg(tmp_path, "cifar100", "dataset.limit=5"))
    assert (len(small.train), len(small.test)) == (5, 5)
    again = build_dataset(dataset_cfg(tmp_path, "cifar100", "dataset.limit=5"))
    assert small.train.indices == again.train.indices   # seeded


@pytest.mark.parametrize("name,folder,gz", [("mnist", "MNIST", True),
                                            ("fashion_mnist", "FashionMNIST", False)])
def test_mnist_idx_files(tmp_path, name, folder, gz):
    written = write_mnist(tmp_path / "data", folder, train=20, test=10, gz=gz)
    data = build_dataset(dataset_cfg(tmp_path, name))
    assert (len(data.train), len(data.test)) == (20, 10)
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10
    images, labels = written["t10k"]
    x, y = data.test[3]
    assert torch.allclose(x, normalised(images[3][:, :, None], name), atol=1e-5)
    assert y == int(labels[3])
    if gz:   # the distributed .gz files were unpacked next to themselves
        assert (tmp_path / "data" / folder / "raw" / "train-images-idx3-ubyte").is_file()


def test_image_folder(tmp_path):
    root = write_image_folder(tmp_path / "data" / "imagenet", train=3, val=2, size=(40, 30))
    cfg = dataset_cfg(tmp_path, "imagenet", f"dataset.root={root}", "dataset.image_size=16",
                      "dataset.resize=20")
    data = build_dataset(cfg)
    assert data.num_classes == 2 and data.input_shape == (3, 16, 16)
    assert (len(data.train), len(data.test)) == (6, 4)
    assert data.train.classes == ["ant", "bee"]
    x, y = data.test[3]
    assert x.shape == (3, 16, 16) and y == 1
    assert data.train[0][0].shape == (3, 16, 16)

    (root / "val" / "cow").mkdir()
    (root / "val" / "bee").rename(root / "val" / "cow" / "x")
    with pytest.raises(ConfigError, match="same class folders"):
        build_dataset(cfg)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "cifar100", "imagenet"])
def test_missing_files_name_root_and_remedy(tmp_path, name):
    cfg = dataset_cfg(tmp_path, name)
    with pytest.raises(ConfigError) as e:
        build_dataset(cfg)
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / "data") in message
    assert ("dataset.download=true" in message) != (name == "imagenet")
    assert "<root>/train/<class>" in message or name != "imagenet"


def test_missing_files_through_the_cli(tmp_path, rode_cli):
    """Exit 2, one line naming the root and the remedy, nothing written."""
    for name, remedy in (("cifar10", "dataset.download=true"), ("imagenet", "<root>/val/<class>")):
        run_dir = tmp_path / name
        out = rode_cli("train", f"dataset={name}", f"dataset.root={tmp_path}", "model=resnet",
                       f"hydra.run.dir={run_dir}")
        assert out.code == 2, out.err
        lines = out.err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in out.err
        assert str(tmp_path) in lines[0] and remedy in lines[0]
        assert not run_dir.exists()


def test_bad_knobs(tmp_path):
    write_cifar10(tmp_path / "data")
    def train_cfg(name, *overrides):
        return compose_config("train", [f"dataset={name}", f"dataset.root={tmp_path / 'data'}",
                                        *overrides], tmp_path)

    with pytest.raises(ConfigError, match="dataset.num_workers"):
        validate_job("train", train_cfg("cifar10", "dataset.num_workers=-1"))
    with pytest.raises(ConfigError, match="dataset.download=true is not possible for imagenet"):
        validate_job("train", train_cfg("imagenet", "dataset.download=true"))
