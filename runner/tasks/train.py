"""rode train: train a ResNet classifier and write metrics.jsonl, summary.json, checkpoint.pt."""
from __future__ import annotations

import logging

from ..config import check_model_config, check_training_config
from ..data import DATASETS
from ..models import MODELS
from ..config import check_choice
from ..engine import train

log = logging.getLogger("rode")


def validate(cfg) -> None:
    check_choice(cfg, "dataset.name", DATASETS)
    check_choice(cfg, "model.name", MODELS)
    check_model_config(cfg)
    check_training_config(cfg)
    if cfg.model.name == "conv" and len(cfg.dataset.get("shape", [1, 8, 8])) != 3:
        from ..errors import ConfigError
        raise ConfigError(f"model=conv needs image data; dataset={cfg.dataset.name} gives "
                          f"shape {list(cfg.dataset.shape)} (set dataset.shape=[C,H,W])")


def run(cfg) -> dict:
    summary = train(cfg)
    print(f"rode train: test accuracy {100 * summary['test_acc']:.2f}% "
          f"(best {100 * summary['best_test_acc']:.2f}%) after {summary['epochs']} epochs, "
          f"{summary['seconds']:.1f} s -> {cfg.out_dir}", flush=True)
    return summary
