"""The training loop: one readable function, with hooks called at fixed points."""
from __future__ import annotations

import json
import logging
import math
import os
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm

from .data import DataBundle, build_dataset, make_loader
from .errors import RunFailed
from .hooks import Hook, build_hooks
from .models import build_model

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
def evaluate(model, loader, device) -> tuple[float, float]:
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        count += len(y)
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
    metrics_path: Path = field(init=False)

    def __post_init__(self):
        self.metrics_path = self.out_dir / "metrics.jsonl"

    def log(self, hook: str | None, record: dict) -> None:
        """Append one JSON line to metrics.jsonl (flushed at once: a crash loses nothing)."""
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
          data: DataBundle | None = None) -> dict:
    """Train the model ``cfg`` describes; write metrics.jsonl, checkpoint.pt and
    summary.json into ``cfg.out_dir``. Returns the summary. ``model`` and ``data``,
    when given, are used instead of building them from ``cfg`` (e.g. fine-tuning)."""
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    data = build_dataset(cfg.dataset) if data is None else data
    if model is None:
        model = build_model(cfg, data.input_shape, data.num_classes)
    model = model.to(device)
    optimizer = build_optimizer(cfg, model)
    workers = int(cfg.dataset.get("num_workers", 0) or 0)
    pin = device.type == "cuda"
    train_loader = make_loader(data.train, cfg.batch_size, shuffle=True, seed=cfg.seed,
                               num_workers=workers, pin_memory=pin)
    test_loader = make_loader(data.test, 1024, shuffle=False, seed=cfg.seed,
                              num_workers=workers, pin_memory=pin)
    autocast, scaler = mixed_precision(bool(cfg.get("amp", False)), device)
    total_steps = cfg.epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(cfg.schedule, s, total_steps))

    run = Run(cfg, out_dir, model, optimizer, data, device)
    run.metrics_path.write_text("")          # a fresh run owns its metrics file
    hooks = build_hooks(cfg.get("hooks")) if hooks is None else hooks
    show_progress = bool(cfg.progress) and sys.stdout.isatty()
    best_acc, start = 0.0, time.perf_counter()
    for hook in hooks:
        hook.on_train_start(run)

    for epoch in range(1, cfg.epochs + 1):
        run.epoch = epoch
        # ---- train one epoch
        model.train()
        loss_sum, seen = 0.0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{cfg.epochs}", leave=False,
                   disable=not show_progress, dynamic_ncols=True)
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast():
                loss = F.cross_entropy(model(x), y)
            if not torch.isfinite(loss):
                _fail(run, f"loss became {loss.item()} at epoch {epoch}, step {run.step + 1}; "
                      f"try a smaller lr (lr={cfg.lr})", start)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            run.step += 1
            run.last_loss = loss.item()
            loss_sum += run.last_loss * len(y)
            seen += len(y)
            bar.set_postfix(loss=f"{run.last_loss:.4f}")
            for hook in hooks:
                hook.on_step_end(run)
        bar.close()

        # ---- evaluate, log, checkpoint
        with autocast():
            test_loss, test_acc = evaluate(model, test_loader, device)
        best_acc = max(best_acc, test_acc)
        record = {"epoch": epoch, "step": run.step, "train_loss": loss_sum / seen,
                  "test_loss": test_loss, "test_acc": test_acc,
                  "lr": optimizer.param_groups[0]["lr"],
                  "seconds": round(time.perf_counter() - start, 3)}
        run.log(None, record)
        log.info("epoch %d/%d  train_loss %.4f  test_loss %.4f  test_acc %.4f",
                 epoch, cfg.epochs, record["train_loss"], test_loss, test_acc)
        atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "scheduler": scheduler.state_dict(), "epoch": epoch,
                           "step": run.step, "config": _config_dict(cfg)},
                          out_dir / "checkpoint.pt")
        for hook in hooks:
            hook.on_epoch_end(run)

    for hook in hooks:
        hook.on_train_end(run)
    peak, peak_kind = peak_memory(device)
    summary = {"status": "completed", "test_acc": test_acc, "best_test_acc": best_acc,
               "test_loss": test_loss, "train_loss": record["train_loss"],
               "seconds": round(time.perf_counter() - start, 3), "steps": run.step,
               "epochs": cfg.epochs, "peak_memory_bytes": peak, "peak_memory_kind": peak_kind,
               "device": str(device), "config": _config_dict(cfg)}
    write_json(summary, out_dir / "summary.json")
    return summary


def _fail(run: Run, message: str, start: float) -> None:
    """Write what the run had, then stop it: the last good checkpoint stays as it was."""
    run.log(None, {"event": "failed", "epoch": run.epoch, "step": run.step, "error": message})
    write_json({"status": "failed", "error": message, "epoch": run.epoch, "steps": run.step,
                "seconds": round(time.perf_counter() - start, 3),
                "config": _config_dict(run.cfg)}, run.out_dir / "summary.json")
    raise RunFailed(f"{message} (run dir: {run.out_dir})")
