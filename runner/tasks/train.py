"""rode train: train a ResNet classifier and write metrics.jsonl, summary.json, checkpoint.pt."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import OmegaConf

from .. import checkpoint, distributed
from ..config import check_image_data, check_model_config, check_training_config
from ..data import DATASETS
from ..models import MODELS
from ..config import check_bool, check_choice
from ..engine import resolve_device, train
from ..errors import ConfigError
from ..hooks import build_hooks
from ..resnet import check_resnet_config
from ..vision import check_dataset

log = logging.getLogger("rode")


# What `rode train resume=<dir>` may change: the rest is the checkpoint's config.
RESUME_KEYS = ("device", "progress", "threads")


def validate(cfg) -> None:
    if cfg.get("resume"):
        validate_resume(cfg)
        return
    check_choice(cfg, "dataset.name", DATASETS)
    check_choice(cfg, "model.name", MODELS)
    check_model_config(cfg)
    check_training_config(cfg)
    check_amp(cfg)
    check_image_data(cfg)
    if cfg.model.name == "resnet":
        check_resnet_config(cfg)
    check_dataset(cfg.dataset)
    build_hooks(cfg.get("hooks"))          # unknown hook or bad option: ConfigError
    world = distributed.env_world_size()
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size={cfg.batch_size} must be a multiple of the {world} "
                          f"processes (each takes batch_size/{world} examples)")
    build_hooks(cfg.get("hooks"))   # hook constructors validate their options


def check_amp(cfg) -> None:
    if not check_bool(cfg, "amp"):
        return
    if resolve_device(cfg.device).type != "cuda":
        raise ConfigError(f"amp=true needs a CUDA device (device={cfg.device} gives "
                          f"{resolve_device(cfg.device)}); set amp=false")


def validate_resume(cfg) -> None:
    ckpt = checkpoint.load(cfg.resume, "resume")
    if ckpt.get("format") != checkpoint.FORMAT or "progress" not in ckpt:
        raise ConfigError(f"resume={cfg.resume}: the checkpoint has no training state to "
                          f"resume from (written by another task, or by an older rode)")
    job = resume_config(cfg, ckpt)
    job.resume = None
    validate(job)                          # the run's own config, on this machine
    checkpoint.check_rebuilds(ckpt, job, f"resume={cfg.resume}")
    if ckpt["progress"]["epoch"] > job.epochs:
        raise ConfigError(f"resume={cfg.resume}: the run already finished its {job.epochs} "
                          f"epochs; nothing to resume")


def resume_config(cfg, ckpt: dict):
    """The resumed run's config: the checkpoint's, with this command's RESUME_KEYS,
    writing into the checkpoint's run dir."""
    job = OmegaConf.create(ckpt["config"])
    for key in RESUME_KEYS:
        job[key] = cfg[key]
    path = checkpoint.locate(cfg.resume, "resume")
    job.resume = str(path)
    job.out_dir = str(path.parent)
    return job


def prepare_overrides(overrides: list[str], multirun: bool) -> list[str]:
    """Command-line conveniences, before Hydra sees the overrides (called by the CLI).

    ``resume=<run dir>``: quoted when the dir holds '=' or ',' (a sweep's job dir);
    only RESUME_KEYS may be set beside it; the run's own dir is Hydra's output dir
    and no new .hydra/ is written there, so its original config stays. Without
    resume, a hydra.run.dir that already holds a checkpoint is refused: a new run
    would overwrite it."""
    values = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in overrides if "=" in o}
    resume = values.get("resume")
    if resume and os.path.exists(_unquote(resume)) and _unquote(resume) == resume:
        overrides = [f"resume='{resume}'" if o == f"resume={resume}" else o for o in overrides]
    if not resume or resume == "null":
        run_dir = values.get("hydra.run.dir")
        if run_dir and not multirun and (Path(_unquote(run_dir)) / checkpoint.FILENAME).is_file():
            raise ConfigError(f"hydra.run.dir={run_dir} already holds a run ({checkpoint.FILENAME});"
                              f" continue it with resume={run_dir}, or choose another dir")
        return overrides
    other = [k for k in values if k != "resume" and k not in RESUME_KEYS
             and not k.lstrip("+~").startswith("hydra")]
    if other:
        raise ConfigError(f"resume= continues a run with its own config; only "
                          f"{', '.join(RESUME_KEYS)} can be set with it (got {other[0]}=...)")
    if multirun or "hydra.run.dir" in values:
        return overrides
    run_dir = checkpoint.locate(_unquote(resume), "resume").parent
    return [*overrides, f"hydra.run.dir='{run_dir}'", "hydra.output_subdir=null"]


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def run(cfg) -> dict:
    if cfg.get("threads") is not None:
        import torch

        torch.set_num_threads(int(cfg.threads))   # the process is this run's alone
    if cfg.get("resume"):
        ckpt = checkpoint.load(cfg.resume, "resume")
        job = resume_config(cfg, ckpt)
        log.info("resuming %s from epoch %d, step %d", job.out_dir,
                 ckpt["progress"]["epoch"], ckpt["progress"]["step"])
        summary = train(job, resume=ckpt)
        cfg = job
    else:
        summary = train(cfg)
    if summary.get("world_size", 1) > 1 and int(os.environ.get("RANK", 0)) != 0:
        return summary                     # rank 0 speaks for the group
    print(f"rode train: test accuracy {100 * summary['test_acc']:.2f}% "
          f"(best {100 * summary['best_test_acc']:.2f}%) after {summary['epochs']} epochs, "
          f"{summary['seconds']:.1f} s -> {cfg.out_dir}", flush=True)
    return summary
