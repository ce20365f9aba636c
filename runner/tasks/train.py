"""rode train: train a ResNet classifier and write metrics.jsonl, summary.json, checkpoint.pt."""
from __future__ import annotations

import logging

from ..config import check_model_config, check_training_config
from ..data import DATASETS
from ..models import MODELS
from ..config import check_bool, check_choice
from ..engine import resolve_device, train
from ..errors import ConfigError
from ..hooks import build_hooks
from ..resnet import check_resnet_config
from ..vision import check_dataset

log = logging.getLogger("rode")


def validate(cfg) -> None:
    check_choice(cfg, "dataset.name", DATASETS)
    check_choice(cfg, "model.name", MODELS)
    check_model_config(cfg)
    check_training_config(cfg)
    check_amp(cfg)
    if cfg.model.name in ("conv", "resnet") and len(cfg.dataset.get("shape", [1, 8, 8])) != 3:
        raise ConfigError(f"model={cfg.model.name} needs image data; dataset={cfg.dataset.name} "
                          f"gives shape {list(cfg.dataset.shape)} (set dataset.shape=[C,H,W])")
    if cfg.model.name == "resnet":
        check_resnet_config(cfg)
    check_dataset(cfg.dataset)
    build_hooks(cfg.get("hooks"))   # hook constructors validate their options


def check_amp(cfg) -> None:
    if not check_bool(cfg, "amp"):
        return
    if resolve_device(cfg.device).type != "cuda":
        raise ConfigError(f"amp=true needs a CUDA device (device={cfg.device} gives "
                          f"{resolve_device(cfg.device)}); set amp=false")
    if cfg.grad == "adjoint":
        # The adjoint's backward pass recomputes steps outside autocast, in float32,
        # on the float16 activations: it fails (see docs/datasets.md).
        raise ConfigError("amp=true does not work with grad=adjoint yet; use grad=backprop "
                          "or amp=false")


def run(cfg) -> dict:
    summary = train(cfg)
    print(f"rode train: test accuracy {100 * summary['test_acc']:.2f}% "
          f"(best {100 * summary['best_test_acc']:.2f}%) after {summary['epochs']} epochs, "
          f"{summary['seconds']:.1f} s -> {cfg.out_dir}", flush=True)
    return summary
