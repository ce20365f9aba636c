"""rode gradcheck: the adjoint's gradient against exact backprop, per residual layer.

On a fixed probe batch (the first ``batch`` training examples), computes the
gradient of the loss with ordinary backprop and with the discrete adjoint, on
the same weights (those ``rode train`` starts from with the same seed, or a
trained model's with ``checkpoint=``), and writes

- ``grad_error.csv``: ``layer, rel_error, cosine``, one row per residual
  function with its own parameters (a tied stack has one row, layer 0);
- ``summary.json``: the totals (``rel_error``, ``cosine`` over all
  parameters; ``stack_rel_error``, ``stack_cosine`` over the residual
  functions) and the setting.
"""
from __future__ import annotations

import csv
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf, open_dict

from .. import checkpoint as ckpt
from ..config import MAX_DEPTH, check_choice, check_device, check_image_data, check_int
from ..data import DATASETS, build_dataset, make_loader
from ..engine import resolve_device, seed_everything, write_json
from ..errors import ConfigError
from ..gradmodes import get_grad_mode
from ..integrators import INTEGRATORS
from ..measure import gradient_error, residual_stacks
from ..models import INITS, MODELS, build_model

DTYPES = {"float64": torch.float64, "float32": torch.float32}
# What a checkpoint's config decides: the model it holds.
ARCHITECTURE = ("model", "dataset", "depth", "width", "method", "init", "adjoint")


def validate(cfg) -> None:
    check_int(cfg, "batch", 1)
    check_choice(cfg, "dtype", DTYPES)
    check_int(cfg, "seed", 0)
    check_device(cfg)
    if cfg.checkpoint is not None:
        # The checkpoint's config gives the architecture: it must rebuild that model.
        saved = ckpt.load(cfg.checkpoint)
        ckpt.check_rebuilds(saved, saved["config"], f"checkpoint={cfg.checkpoint}")
        return
    check_architecture(cfg)


def check_architecture(cfg) -> None:
    check_choice(cfg, "dataset.name", DATASETS)
    check_choice(cfg, "model.name", MODELS)
    method = check_choice(cfg, "method", INTEGRATORS)
    check_choice(cfg, "init", INITS)
    depth = check_int(cfg, "depth", 1, MAX_DEPTH)
    low = INTEGRATORS[method].min_functions
    if depth < low:
        raise ConfigError(f"depth={depth} is too small for method={method}: it needs depth >= {low}")
    check_int(cfg, "width", 1, 65_536)
    check_image_data(cfg)


def architecture(cfg):
    """(config that builds the model, checkpoint or None)."""
    arch = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    checkpoint = None
    if cfg.checkpoint is not None:
        checkpoint = ckpt.load(cfg.checkpoint)
        saved = checkpoint["config"]
        for key in ARCHITECTURE:
            if key in saved:
                arch[key] = saved[key]
        check_architecture(arch)
    with open_dict(arch):
        arch.grad = "backprop"   # build_model needs one; the probe uses both
    return arch, checkpoint


def run(cfg) -> dict:
    start = time.perf_counter()
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arch, checkpoint = architecture(cfg)
    dtype = DTYPES[cfg.dtype]

    # The same order as `rode train`, so that the same seed gives the same weights.
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    data = build_dataset(arch.dataset)
    model = build_model(arch, data.input_shape, data.num_classes)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    model.to(device=device, dtype=dtype)
    x, y = next(iter(make_loader(data.train, cfg.batch, shuffle=False, seed=0)))
    x, y = x.to(device=device, dtype=dtype), y.to(device)

    adjoint = get_grad_mode("adjoint", **(arch.get("adjoint") or {}))
    result = gradient_error(model, x, y, adjoint=adjoint)
    layers = result["layers"]

    with open(out_dir / "grad_error.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["layer", "rel_error", "cosine"])
        writer.writeheader()
        writer.writerows(layers)
    summary = {
        "rel_error": result["rel_error"], "cosine": result["cosine"],
        "stack_rel_error": result["stack_rel_error"], "stack_cosine": result["stack_cosine"],
        "max_layer_rel_error": max((r["rel_error"] for r in layers), default=0.0),
        "num_layers": len(layers),
        # Residual functions in all the model's stacks (= depth for mlp and conv).
        "depth": sum(s.depth for s in residual_stacks(model)), "method": arch.method, "init": arch.init,
        "model": arch.model.name, "width": int(arch.width), "dataset": arch.dataset.name,
        "batch": len(y), "dtype": cfg.dtype, "seed": int(cfg.seed), "device": str(device),
        "checkpoint": None if checkpoint is None else str(ckpt.locate(cfg.checkpoint)),
        "step": None if checkpoint is None else checkpoint.get("step"),
        "seconds": round(time.perf_counter() - start, 3),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    write_json(summary, out_dir / "summary.json")
    print(f"rode gradcheck: depth {summary['depth']} {arch.method} init={arch.init}: "
          f"rel_error {summary['rel_error']:.3e}, cosine {summary['cosine']:.8f} "
          f"({len(layers)} layers, largest layer rel_error "
          f"{summary['max_layer_rel_error']:.3e}) -> {out_dir}", flush=True)
    return summary
