"""Validation of a task's config: its typed schema, then the rules that tie keys together.

``validate(task, cfg)`` is what the command line runs for every job before anything
is written. Types, ranges and choices come from ``runner.schema`` (one spec per
key); the cross-field rules of every task are here, each written once. Neither
imports torch: checks that need it (a CUDA device, a checkpoint's weights, a
dataset's files) are the third stage, each task module's ``validate(cfg)``, which
``validate(task, cfg, environment=runner.tasks.environment_check(task))`` runs after
these (see ``runner.once``); this module does not import the tasks.
"""
from __future__ import annotations

import copy
import importlib.util
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import ConfigError
from .names import IMAGE_MODELS, LOGGERS, METHOD_MULTIPLES, METHODS
from .schema import MAX_DEPTH, check_config, to_list

# Renamed keys: old dotted key -> new. The old spelling works on the command line with a
# one-line note (runner.cli.renamed_keys); a checkpoint's stored config is upgraded when
# it is read (upgrade_config), so old runs resume and fine-tune as before.
RENAMED = {"batch": "batch_size",
           "checkpoint.every_steps": "save.every_steps",       # `checkpoint` is an input path
           "checkpoint.every_minutes": "save.every_minutes",
           "model.weights": "model.pretrained",                # `weights`: weight profiles
           "model.depths": "model.blocks",                     # `depths`: a sweep list
           "hidden": "model.hidden", "activation": "model.activation",   # rode bench's
           **{f"hooks.{h}.batch": f"hooks.{h}.batch_size" for h in ("grad_error", "memory", "recon")}}


def upgrade_config(saved: dict) -> dict:
    """A stored config (a checkpoint's) with every RENAMED key under its new name."""
    out = copy.deepcopy(saved)
    for old, new in RENAMED.items():
        (*head, last), (*new_head, new_last) = old.split("."), new.split(".")
        node = out
        for part in head:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or last not in node:
            continue
        target = out
        for part in new_head:
            target = target.setdefault(part, {})
        if new_last not in target:
            target[new_last] = node.pop(last)
        if head and not node and head[0] in out and out[head[0]] == {}:
            del out[head[0]]   # checkpoint: {} once both its keys moved
    return out


def as_list(cfg, key: str) -> list:
    """``cfg[key]`` as a list (a single value is a list of one), once validated."""
    return to_list(cfg[key])


def show_progress(cfg) -> bool:
    """tqdm bars: on with ``progress=true`` and only when stdout is a terminal."""
    return bool(cfg.get("progress", True)) and sys.stdout.isatty()


# ------------------------------------------------------------ cross-field rules
def check_depths(depths, methods, key: str, per_layer: int = 1) -> None:
    """The one rule of depth: each scheme needs at least its fewest residual functions
    (and coupled an even number of them). ``per_layer``: functions per unit of depth
    (2 for a sequential transformer block)."""
    methods = list(methods)
    low = max(METHODS[m] for m in methods)
    for d in to_list(depths):
        for m in methods:
            multiple = METHOD_MULTIPLES.get(m, 1)
            if (d * per_layer) % multiple:
                raise ConfigError(f"{key}={d} does not fit method={m}: it couples residual "
                                  f"functions in pairs, so {key} must be a multiple of "
                                  f"{multiple}")
        if d < low:
            which = methods[0] if len(methods) == 1 else ", ".join(methods)
            raise ConfigError(f"{key}={d} is too small for method={which}: it needs "
                              f"{key} >= {low}" + ("" if key == "depth" else f" (every depth in [{low}, "
                                                   f"{MAX_DEPTH}])"))


def check_image_data(cfg) -> None:
    """Convolutional models need (C, H, W) inputs; a flat dataset is refused by name."""
    if cfg.model.name in IMAGE_MODELS and len(cfg.dataset.get("shape", [1, 8, 8])) != 3:
        raise ConfigError(f"model={cfg.model.name} needs image data; dataset={cfg.dataset.name} "
                          f"gives shape {list(cfg.dataset.shape)} (set dataset.shape=[C,H,W])")


def check_dataset_values(cfg) -> None:
    """The dataset's keys that tie together (its files are ``vision.check_dataset_files``)."""
    d = cfg.dataset
    if d.name == "synthetic":
        if len(d.shape) not in (1, 3):
            raise ConfigError(f"dataset.shape={list(d.shape)} must be [D] (vectors) or [C,H,W] "
                              f"(images)")
        n_test = max(1, int(round(d.test_fraction * d.num_samples)))
        if d.num_samples - n_test < 1:
            raise ConfigError(f"dataset.num_samples={d.num_samples} with dataset.test_fraction="
                              f"{d.test_fraction} leaves no training example")
        val = d.get("val_fraction") or 0
        if val and d.num_samples - n_test - max(1, int(round(val * (d.num_samples - n_test)))) < 1:
            raise ConfigError(f"dataset.val_fraction={val} of the {d.num_samples - n_test} training "
                              f"examples (dataset.num_samples={d.num_samples}) leaves none to "
                              f"train on; set a smaller dataset.val_fraction")
    if d.name == "imagenet":
        if d.resize < d.image_size:
            raise ConfigError(f"dataset.resize={d.resize} must be >= dataset.image_size={d.image_size}")
        if d.download:
            raise ConfigError("dataset.download=true is not possible for imagenet: it has no "
                              "public download; put an ImageFolder tree under dataset.root")


def check_world(cfg) -> None:
    world = env_world_size()
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size={cfg.batch_size} must be a multiple of the {world} "
                          f"processes (each takes batch_size/{world} examples)")


def env_world_size() -> int:
    """How many processes the launcher started (1 when run plainly)."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    # A SLURM job of several tasks under submitit: every task runs the same job.
    if not os.environ.get("SUBMITIT_EXECUTOR") or int(os.environ.get("SLURM_NTASKS", 1)) <= 1:
        return 1
    return int(os.environ["SLURM_NTASKS"])


def functions_per_layer(cfg) -> int:
    """Residual functions per unit of ``depth``: 2 for a sequential transformer block."""
    model = cfg.get("model") or {}
    return 2 if model.get("name") == "transformer" and model.get("block") == "sequential" else 1


def check_sequence_data(cfg) -> None:
    """Token data (dataset=text) needs model=transformer; val_bpc needs dataset=text;
    the transformer's heads must divide the width and its patch the inputs."""
    model, data = cfg.get("model") or {}, cfg.get("dataset") or {}
    path = data.get("path") if data.get("name") == "text" else None
    if path is not None and not Path(str(path)).is_file():
        raise ConfigError(f"dataset.path={path} is not a readable file (null: the standard "
                          f"library's argparse.py)")
    if data.get("name") == "text" and model.get("name") != "transformer":
        raise ConfigError(f"dataset=text needs model=transformer (model={model.get('name')} "
                          f"takes real-valued inputs)")
    if str(cfg.get("monitor")) == "val_bpc" and data.get("name") != "text":
        raise ConfigError(f"monitor=val_bpc needs dataset=text; dataset={data.get('name')} "
                          f"reports val_acc and val_loss")
    if model.get("name") == "transformer":
        width, heads = int(cfg.width), int(model.heads)
        if width % heads:
            raise ConfigError(f"model.heads={heads} must divide width={width}")
        if data.get("name") != "text":
            shape = list(data.get("shape", [1, 8, 8]))
            sizes = shape[1:] if len(shape) == 3 else shape
            if data.get("name") not in ("digits", "synthetic"):
                sizes = []   # files on disk: checked when the model is built
            if any(int(s) % int(model.patch) for s in sizes):
                raise ConfigError(f"model.patch={model.patch} must divide the input size "
                                  f"{'x'.join(str(s) for s in sizes)}")


def _stack_model(cfg) -> None:
    check_depths(cfg.depth, [cfg.method], "depth", functions_per_layer(cfg))
    check_image_data(cfg)
    check_dataset_values(cfg)
    check_sequence_data(cfg)


def check_tracking(cfg) -> None:
    """A logger needs its package; a validation monitor needs a validation split."""
    missing = [n for n in (cfg.get("logger") or {}) if n in LOGGERS
               and importlib.util.find_spec(LOGGERS[n]) is None]
    if missing:
        raise ConfigError(f"logger={','.join(missing)} needs its package: "
                          f"pip install 'rode[tracking]'")
    fraction = (cfg.get("dataset") or {}).get("val_fraction", 0)
    if str(cfg.get("monitor", "")).startswith("val_") and fraction is not None and not fraction:
        raise ConfigError(f"monitor={cfg.monitor} needs a validation split: set "
                          f"dataset.val_fraction > 0 (or monitor=train_loss)")


def _train(cfg) -> None:
    check_tracking(cfg)
    if cfg.get("resume") and cfg.resume != "auto":
        return   # the checkpoint's own config is validated when it is read
    _stack_model(cfg)
    check_world(cfg)


def _memory(cfg) -> None:
    check_depths(cfg.depths, [cfg.method], "depths", functions_per_layer(cfg))
    check_image_data(cfg)
    check_dataset_values(cfg)
    check_sequence_data(cfg)


def _bench(cfg) -> None:
    check_depths(cfg.depths, to_list(cfg.methods), "depths", functions_per_layer(cfg))
    if cfg.model.name == "transformer" and int(cfg.width) % int(cfg.model.heads):
        raise ConfigError(f"model.heads={cfg.model.heads} must divide width={cfg.width}")


def _linear(cfg) -> None:
    check_depths(cfg.depths, [cfg.method], "depths")


def _discretization(cfg) -> None:
    largest = max(to_list(cfg.depths))
    if cfg.ref_steps < 4 * largest:
        raise ConfigError(f"ref_steps={cfg.ref_steps} must be at least 4 x the largest depth "
                          f"({4 * largest}) for the reference to be finer than the ResNets")


def _gradcheck(cfg) -> None:
    if cfg.get("amp") and cfg.dtype != "float32":
        raise ConfigError(f"amp=true autocasts float32 weights; dtype={cfg.dtype} needs amp=false "
                          f"(or set dtype=float32)")
    if cfg.checkpoint is None:   # else the checkpoint's config gives the architecture
        _stack_model(cfg)


RULES = {"train": _train, "finetune": check_tracking, "memory": _memory, "bench": _bench, "linear": _linear,
         "discretization": _discretization, "gradcheck": _gradcheck}


def validate(task: str, cfg, environment: Callable | None = None,
             skip=frozenset()) -> tuple[str, ...]:
    """The checks of a job's config in their three stages (``runner.once.STAGES``): the
    schema of ``task``, its cross-field rules, and, given ``environment`` (the task's
    own check, ``runner.tasks.environment_check(task)``: files, devices, checkpoints;
    imports torch), that check. ConfigError on the first bad value. Stages in ``skip``
    (already passed for this config) are left out; returns the stages that ran."""
    ran = []
    if "schema" not in skip:
        check_config(task, cfg)
        ran.append("schema")
    rule = RULES.get(task)
    if "rules" not in skip:
        if rule is not None:
            rule(cfg)
        ran.append("rules")
    if environment is not None and "environment" not in skip:
        environment(cfg)
        ran.append("environment")
    return tuple(ran)


# ------------------------------------------------------------------ paths
def check_writable_dir(path, key: str = "out_dir") -> Path:
    """ConfigError unless ``path`` is, or can be created as, a directory this process
    can write in. Probes by creating (and removing) a temporary dir in the nearest
    existing ancestor: permission bits alone do not tell (root, read-only mounts)."""
    if path is None or not str(path).strip():
        raise ConfigError(f"{key} is empty; give a directory")
    path = Path(str(path)).expanduser().absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}={path}: cannot create a directory there ({existing} is a file)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".rode-probe-", dir=existing))
    except OSError as e:
        raise ConfigError(f"{key}={path}: cannot write there ({e.strerror or type(e).__name__} "
                          f"in {existing})") from None
    return path
