"""The training loop: one readable function, with hooks called at fixed points."""
from __future__ import annotations

import json
import logging
import math
import os
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm

from . import checkpoint, distributed
from .data import DataBundle, build_dataset, make_loader
from .config import show_progress
from .errors import RunFailed
from .hooks import Hook, build_hooks
from .models import build_model
from .stack import roundtrip_error

log = logging.getLogger("rode")


# ------------------------------------------------------------------ helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what they measure): allocator peak on CUDA, process peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_peak_rss"


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = model.parameters()
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(schedule: str, step: int, total: int) -> float:
    """constant; step: /10 at 1/3 and 2/3 of training (the paper's); cosine to 0."""
    if schedule == "step":
        return 0.1 ** sum(step >= total * k / 3 for k in (1, 2))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))
    return 1.0


@torch.no_grad()
def evaluate(model, loader, device, dist: distributed.Dist | None = None) -> tuple[float, float]:
    """(mean loss, accuracy) over ``loader``; summed over processes when ``dist`` is given
    and each process holds a share of the data."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        count += len(y)
    if dist is not None:
        total_loss, correct, count = dist.sum([total_loss, correct, count], device)
    return total_loss / count, correct / count


def mixed_precision(amp: bool, device: torch.device):
    """(autocast context factory, gradient scaler) for ``amp``: bfloat16 where the GPU
    has it, else float16 with loss scaling; both are no-ops when amp is off or not on CUDA."""
    enabled = amp and device.type == "cuda"
    dtype = torch.bfloat16 if enabled and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=enabled and dtype == torch.float16)
    return (lambda: torch.autocast("cuda", dtype=dtype, enabled=enabled)), scaler


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------- run state
@dataclass
class Run:
    """What hooks can see and use while a run trains."""

    cfg: object
    out_dir: Path
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    data: DataBundle
    device: torch.device
    epoch: int = 0
    step: int = 0
    last_loss: float = float("nan")
    is_main: bool = True            # the process that writes (all but one skip it under DDP)
    metrics_path: Path = field(init=False)

    def __post_init__(self):
        self.metrics_path = self.out_dir / "metrics.jsonl"

    def log(self, hook: str | None, record: dict) -> None:
        """Append one JSON line to metrics.jsonl (flushed at once: a crash loses nothing)."""
        if not self.is_main:
            return
        line = {"hook": hook, "epoch": self.epoch, "step": self.step, **record} if hook else record
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(line) + "\n")

    def probe_batch(self, size: int = 128):
        """A fixed batch of training data, the same at every call."""
        x, y = next(iter(make_loader(self.data.train, size, shuffle=False, seed=0)))
        return x.to(self.device), y.to(self.device)


def _config_dict(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


# -------------------------------------------------------------------- train
def train(cfg, hooks: list[Hook] | None = None, *, model: torch.nn.Module | None = None,
          data: DataBundle | None = None, resume: dict | None = None) -> dict:
    """Train the model ``cfg`` describes; write metrics.jsonl, checkpoint.pt and
    summary.json into ``cfg.out_dir``. Returns the summary. ``model`` and ``data``,
    when given, are used instead of building them from ``cfg`` (e.g. fine-tuning).
    ``resume``: a checkpoint (runner.checkpoint.load) to continue from.

    Under torchrun each process trains a share of every batch (DistributedDataParallel);
    only rank 0 writes. SIGTERM/SIGINT: checkpoint at the end of the step, then stop."""
    dist, device = distributed.setup(resolve_device(cfg.device))
    try:
        with checkpoint.StopSignals() as stop:
            return _train(cfg, hooks, model, data, resume, dist, device, stop)
    finally:
        dist.close()


def _train(cfg, hooks, model, data, resume, dist, device, stop) -> dict:
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    data = build_dataset(cfg.dataset) if data is None else data
    if model is None:
        model = build_model(cfg, data.input_shape, data.num_classes)
    model = model.to(device)
    optimizer = build_optimizer(cfg, model)
    workers = int(cfg.dataset.get("num_workers", 0) or 0)
    pin = device.type == "cuda"
    # batch_size is the global batch: each of the world_size processes takes its share.
    train_loader = distributed.loader(data.train, cfg.batch_size // dist.world_size, dist,
                                      shuffle=True, seed=cfg.seed, num_workers=workers,
                                      pin_memory=pin)
    test_loader = distributed.loader(data.test, int(cfg.get("eval_batch_size", 1024)), dist,
                                     shuffle=False, seed=cfg.seed, num_workers=workers,
                                     pin_memory=pin)
    autocast, scaler = mixed_precision(bool(cfg.get("amp", False)), device)
    total_steps = cfg.epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(cfg.schedule, s, total_steps))

    # Where training starts: from scratch, or exactly where the checkpoint left off.
    progress = checkpoint.Progress()
    if resume is not None:
        progress = checkpoint.restore(resume, model, optimizer, scheduler, scaler,
                                      f"resume={out_dir}")
    net = dist.wrap(model, device)           # what trains: DDP over the processes, or the model
    run = Run(cfg, out_dir, model, optimizer, data, device, step=progress.step,
              is_main=dist.is_main)
    # Measurements run once, in the process that writes.
    hooks = (build_hooks(cfg.get("hooks")) if hooks is None else hooks) if dist.is_main else []
    if resume is None and run.is_main:
        run.metrics_path.write_text("")      # a fresh run owns its metrics file
    progress_bar = show_progress(cfg) and dist.is_main
    start = time.perf_counter()

    def seconds() -> float:                  # training time, across resumes
        return round(progress.seconds + time.perf_counter() - start, 3)

    def save() -> None:
        if dist.is_main:
            checkpoint.save(checkpoint.training_state(model, optimizer, scheduler, scaler,
                                                      progress, _config_dict(cfg), seconds(),
                                                      data),
                            out_dir / checkpoint.FILENAME)

    for hook in hooks:
        hook.on_train_start(run)
    if resume is not None:
        checkpoint.set_rng_state(resume["rng"])
        run.log(None, {"event": "resumed", "epoch": progress.epoch, "step": progress.step})

    for epoch in range(progress.epoch, cfg.epochs + 1):
        run.epoch = epoch
        # ---- train one epoch (a resumed one from the batch it had reached)
        net.train()
        distributed.start_epoch(train_loader, epoch, progress.batch)
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{cfg.epochs}", leave=False,
                   disable=not progress_bar, dynamic_ncols=True, initial=progress.batch,
                   total=progress.batch + len(train_loader))
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast():
                loss = F.cross_entropy(net(x), y)
            # One collective per step: the loss over every process's share of the
            # batch, and whether any process was told to stop.
            loss_sum, n, stopping = dist.sum([loss.item() * len(y), len(y),
                                              float(stop.requested)], device)
            if not math.isfinite(loss_sum):
                _fail(run, f"loss became {loss_sum / n} at epoch {epoch}, step {run.step + 1}; "
                      f"try a smaller lr (lr={cfg.lr})", seconds())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            run.step = progress.step = run.step + 1
            progress.batch += 1
            run.last_loss = loss_sum / n
            progress.loss_sum += loss_sum
            progress.seen += int(n)
            bar.set_postfix(loss=f"{run.last_loss:.4f}")
            for hook in hooks:
                hook.on_step_end(run)
            if stopping or (stop.requested and not dist.enabled):   # keep this step, stop
                save()
                _interrupt(run, stop, dist, device, seconds())
        bar.close()

        # ---- evaluate, log, checkpoint
        with autocast():
            test_loss, test_acc = evaluate(model, test_loader, device, dist)
        progress.best_acc = max(progress.best_acc, test_acc)
        record = {"epoch": epoch, "step": run.step, "train_loss": progress.loss_sum / progress.seen,
                  "test_loss": test_loss, "test_acc": test_acc,
                  "lr": optimizer.param_groups[0]["lr"], "seconds": seconds()}
        roundtrip = roundtrip_error(model)   # the adjoint's self-check, at the last step
        if roundtrip is not None:
            record["roundtrip_error"] = roundtrip
        run.log(None, record)
        if dist.is_main:
            log.info("epoch %d/%d  train_loss %.4f  test_loss %.4f  test_acc %.4f",
                     epoch, cfg.epochs, record["train_loss"], test_loss, test_acc)
        progress.next_epoch()
        save()
        for hook in hooks:
            hook.on_epoch_end(run)
        if dist.sum([float(stop.requested)], device)[0]:   # told to stop while evaluating
            _interrupt(run, stop, dist, device, seconds())

    for hook in hooks:
        hook.on_train_end(run)
    peak, peak_kind = peak_memory(device)
    summary = {"status": "completed", "test_acc": test_acc, "best_test_acc": progress.best_acc,
               "test_loss": test_loss, "train_loss": record["train_loss"],
               "seconds": seconds(), "steps": run.step,
               "epochs": cfg.epochs, "peak_memory_bytes": peak, "peak_memory_kind": peak_kind,
               "device": str(device), "world_size": dist.world_size,
               "config": _config_dict(cfg)}
    if dist.enabled:   # DDP keeps the replicas equal; say so, measured
        summary["rank_param_max_diff"] = distributed.max_param_divergence(model, dist)
    if dist.is_main:
        write_json(summary, out_dir / "summary.json")
    return summary


def _fail(run: Run, message: str, seconds: float) -> None:
    """Write what the run had, then stop it: the last good checkpoint stays as it was."""
    run.log(None, {"event": "failed", "epoch": run.epoch, "step": run.step, "error": message})
    if run.is_main:
        write_json({"status": "failed", "error": message, "epoch": run.epoch, "steps": run.step,
                    "seconds": seconds, "config": _config_dict(run.cfg)},
                   run.out_dir / "summary.json")
    raise RunFailed(f"{message} (run dir: {run.out_dir})")


def _interrupt(run: Run, stop, dist, device, seconds: float) -> None:
    """Stop after a signal, the checkpoint written. No summary.json: the run is not over."""
    run.log(None, {"event": "interrupted", "signal": stop.name or "SIGTERM", "epoch": run.epoch,
                   "step": run.step, "seconds": seconds})
    dist.barrier()                           # rank 0 has finished writing the checkpoint
    raise checkpoint.Interrupted(
        f"stopped by {stop.name or 'a signal on another process'} at epoch {run.epoch}, "
        f"step {run.step}; checkpoint saved, continue with: rode train resume={run.out_dir}",
        stop.signum or 15)
