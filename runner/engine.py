"""The training loop: one readable function, with hooks called at fixed points."""
from __future__ import annotations

import gc
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm

from . import checkpoint, distributed, measure, provenance, rundir, selection, tracking
from .config import show_progress
from .data import build_dataset, make_loader
from .databundle import DataBundle
from .errors import Interrupted, RunFailed
from .hooks import build_hooks
from .hooks.base import Hook
from .io import append_jsonl, plain, write_json, write_text
from .models import build_model
from .optim import build_optimizer
from .preflight import resolve_device
from .stack import roundtrip_error
from .threads import loader_workers

log = logging.getLogger("rode")


# ------------------------------------------------------------------ helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


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
        count += y.numel()   # per position for a language model
    if dist is not None:
        total_loss, correct, count = dist.sum([total_loss, correct, count], device)
    return total_loss / count, correct / count


def mixed_precision(amp: bool, device: torch.device):
    """(autocast context factory, gradient scaler) for ``amp``: bfloat16 where the GPU
    has it, else float16 with loss scaling; both are no-ops when amp is off or not on CUDA."""
    autocast, dtype = measure.autocast_of(device, amp and device.type == "cuda")
    return autocast, torch.amp.GradScaler("cuda", enabled=dtype == "float16")


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
    sinks: list = field(default_factory=list)   # trackers: each called with (hook, line)
    metrics_path: Path = field(init=False)

    def __post_init__(self):
        self.metrics_path = self.out_dir / "metrics.jsonl"

    def log(self, hook: str | None, record: dict) -> None:
        """Append one JSON line to metrics.jsonl (flushed at once: a crash loses nothing)."""
        if not self.is_main:
            return
        line = {"hook": hook, "epoch": self.epoch, "step": self.step, **record} if hook else record
        append_jsonl(line, self.metrics_path)
        for sink in self.sinks:
            sink(hook, line)

    def probe_batch(self, size: int = 128):
        """A fixed batch of training data, the same at every call."""
        x, y = next(iter(make_loader(self.data.train, size, shuffle=False, seed=0)))
        return x.to(self.device), y.to(self.device)


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
    except checkpoint.WriteFailed as e:   # disk full, permission lost: say so, keep the rest
        if dist.is_main:
            rundir.write_failed_summary(cfg.out_dir, str(e), epoch=e.epoch, steps=e.step,
                                        config=plain(cfg))
        raise RunFailed(f"{e} (run dir: {cfg.out_dir})") from None
    finally:
        gc.unfreeze()   # what _train froze: collectable again
        if dist.enabled:
            # DistributedDataParallel's reducer holds the process group and sits in
            # reference cycles: freed by the interpreter's teardown, gloo's threads can
            # abort the process ("terminate called without an active exception")
            # after the run is done. Free it while the interpreter is whole.
            gc.collect()
        dist.close()


def _train(cfg, hooks, model, data, resume, dist, device, stop) -> dict:
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    provenance.set_deterministic(bool(cfg.get("deterministic", False)))
    seed_everything(cfg.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    data = build_dataset(cfg.dataset) if data is None else data
    data = selection.split_validation(data, float(cfg.dataset.get("val_fraction") or 0))
    if model is None:
        model = build_model(cfg, data.input_shape, data.num_classes)
    model = model.to(device)
    optimizer = build_optimizer(cfg, model)
    workers = loader_workers(cfg)
    pin = device.type == "cuda"
    # batch_size is the global batch: each of the world_size processes takes its share.
    train_loader = distributed.loader(data.train, cfg.batch_size // dist.world_size, dist,
                                      shuffle=True, seed=cfg.seed, num_workers=workers,
                                      pin_memory=pin)
    test_loader = distributed.loader(data.test, int(cfg.get("eval_batch_size", 1024)), dist,
                                     shuffle=False, seed=cfg.seed, num_workers=workers,
                                     pin_memory=pin)
    val_loader = None if data.val is None else distributed.loader(
        data.val, int(cfg.get("eval_batch_size", 1024)), dist, shuffle=False, seed=cfg.seed,
        num_workers=workers, pin_memory=pin)
    autocast, scaler = mixed_precision(bool(cfg.get("amp", False)), device)
    total_steps = cfg.epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(cfg.schedule, s, total_steps))

    # Where training starts: from scratch, or exactly where the checkpoint left off.
    progress = checkpoint.Progress()
    if resume is not None:
        progress = checkpoint.restore(resume, model, optimizer, scheduler, scaler,
                                      f"resume={out_dir}")
    sel = selection.from_config(cfg, (resume or {}).get("selection"))   # best epoch so far
    net = dist.wrap(model, device)           # what trains: DDP over the processes, or the model
    run = Run(cfg, out_dir, model, optimizer, data, device, step=progress.step,
              is_main=dist.is_main)
    # Measurements run once, in the process that writes.
    hooks = (build_hooks(cfg.get("hooks")) if hooks is None else hooks) if dist.is_main else []
    if run.is_main:
        checkpoint.remove_stale_temporaries(out_dir)   # left by a killed process
        with checkpoint.writing(run.metrics_path):
            if resume is None:
                run.metrics_path.write_text("")      # a fresh run owns its metrics file
            else:                                    # lines of work the checkpoint lacks go
                _rewind_metrics(run.metrics_path, progress)
    trackers = tracking.start(cfg, out_dir, plain(cfg), (resume or {}).get("tracking")) \
        if dist.is_main else None
    if trackers is not None:
        run.sinks.append(trackers)
    progress_bar = show_progress(cfg) and dist.is_main
    start = time.perf_counter()

    def seconds() -> float:                  # training time, across resumes
        return round(progress.seconds + time.perf_counter() - start, 3)

    def save() -> None:
        nonlocal last_save
        last_save = time.monotonic()
        if dist.is_main:
            path = out_dir / checkpoint.FILENAME
            with checkpoint.writing(path, run.epoch, run.step):
                checkpoint.save(checkpoint.training_state(model, optimizer, scheduler, scaler,
                                                          progress, plain(cfg), seconds(),
                                                          data)
                                | {"selection": sel.state(),
                                   "tracking": trackers.state() if trackers else {}}, path)

    # Checkpoints within epochs too: every K steps and/or every T minutes.
    every = cfg.get("save") if OmegaConf.is_dict(cfg.get("save")) else {}
    every_steps, every_minutes = every.get("every_steps"), every.get("every_minutes")
    last_save = time.monotonic()

    def save_due() -> bool:
        return bool((every_steps and run.step % every_steps == 0) or
                    (every_minutes and time.monotonic() - last_save >= 60 * every_minutes))

    for hook in hooks:
        hook.on_train_start(run)
    # The model, optimizer state and data exist for the whole run: keep them out of the
    # cyclic collector's full passes, which at depth 1000 (about a million objects) take
    # 0.1-0.2 s each. train() unfreezes them.
    gc.freeze()
    if resume is not None:
        checkpoint.set_rng_state(resume["rng"])
        run.log(None, {"event": "resumed", "epoch": progress.epoch, "step": progress.step})

    last_batch = None
    for epoch in range(progress.epoch, cfg.epochs + 1):
        if sel.stopped:                      # resumed after early stopping: nothing to train
            break
        run.epoch = epoch
        # ---- train one epoch (a resumed one from the batch it had reached)
        net.train()
        distributed.start_epoch(train_loader, epoch, progress.batch)
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{cfg.epochs}", leave=False,
                   disable=not progress_bar, dynamic_ncols=True, initial=progress.batch,
                   total=progress.batch + len(train_loader))
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            # Before the forward pass: the freed gradients' memory then serves its
            # activations (at depth 1000 this is 3% of a step faster than after it).
            optimizer.zero_grad(set_to_none=True)
            last_batch = (x, y)
            with autocast():
                loss = F.cross_entropy(net(x), y)
            # One collective per step: the loss over every process's share of the
            # batch, and whether any process was told to stop.
            loss_sum, n, stopping = dist.sum([loss.item() * len(y), len(y),
                                              float(stop.requested)], device)
            if not math.isfinite(loss_sum):
                _fail(run, f"loss became {loss_sum / n} at epoch {epoch}, step {run.step + 1}; "
                      f"try a smaller lr (lr={cfg.lr})", seconds())
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
            if save_due():
                save()
        bar.close()

        # ---- evaluate, log, checkpoint
        with autocast():
            test_loss, test_acc = evaluate(model, test_loader, device, dist)
        progress.best_acc = max(progress.best_acc, test_acc)
        record = {"epoch": epoch, "step": run.step, "train_loss": progress.loss_sum / progress.seen,
                  "test_loss": test_loss, "test_acc": test_acc,
                  "lr": optimizer.param_groups[0]["lr"], "seconds": seconds()}
        if val_loader is not None:
            with autocast():
                record["val_loss"], record["val_acc"] = evaluate(model, val_loader, device, dist)
        if data.sequence:   # a language model: the loss per character, in bits
            record["test_bpc"] = record["test_loss"] / math.log(2)
            if "val_loss" in record:
                record["val_bpc"] = record["val_loss"] / math.log(2)
        if sel.update(record) and dist.is_main:
            selection.save_best(model, plain(cfg), data, record, out_dir / selection.BEST)
        roundtrip = roundtrip_error(model)   # the adjoint's self-check, at the last step
        if roundtrip is not None:
            record["roundtrip_error"] = roundtrip
        progress.record = record
        progress.next_epoch()
        save()                 # first the checkpoint, then its line: a kill between the two
        with checkpoint.writing(run.metrics_path, epoch, run.step):   # ... is mended on resume
            run.log(None, record)
        if dist.is_main:
            log.info("%s", epoch_line(record, cfg.epochs, sel))
        for hook in hooks:
            hook.on_epoch_end(run)
        if sel.stopped:
            run.log(None, {"event": "early_stopping", "epoch": epoch, "step": run.step,
                           "best_epoch": sel.best_epoch, sel.monitor: sel.best_value})
            break
        # Told to stop while evaluating: stop, unless only the summary is left to write.
        if dist.sum([float(stop.requested)], device)[0] and epoch < cfg.epochs:
            _interrupt(run, stop, dist, device, seconds())

    # The last epoch's line; from the checkpoint when the run stopped before its summary.
    record = progress.record
    test_loss, test_acc = record["test_loss"], record["test_acc"]

    for hook in hooks:
        hook.on_train_end(run)
    peak, peak_kind = measure.peak_memory(None, device)
    # The network's own memory for one step (saved activations, parameters, gradients,
    # optimizer state), on the last batch trained; it leaves the run as it was.
    with measure.preserved_rng():
        batch = last_batch if last_batch is not None else run.probe_batch(cfg.batch_size)
    memory = measure.model_memory(model, *batch, optimizer=optimizer, autocast=autocast)
    del batch, last_batch
    summary = {"status": "completed", "test_acc": test_acc, "best_test_acc": progress.best_acc,
               "test_loss": test_loss, "train_loss": record["train_loss"],
               "seconds": seconds(), "steps": run.step,
               "epochs": cfg.epochs, "peak_memory_bytes": peak, "peak_memory_kind": peak_kind,
               **memory, "device": str(device), "world_size": dist.world_size,
               "config": plain(cfg)}
    if "test_bpc" in record:
        summary["test_bpc"] = record["test_bpc"]
    summary.update(sel.summary(), epochs_run=progress.epoch - 1, best_metrics=sel.best_record,
                   provenance=provenance.provenance(device))
    if dist.enabled:   # DDP keeps the replicas equal; say so, measured
        summary["rank_param_max_diff"] = distributed.max_param_divergence(model, dist)
    if dist.is_main:
        with checkpoint.writing(out_dir / "summary.json", cfg.epochs, run.step):
            write_json(summary, out_dir / "summary.json")
    if trackers is not None:
        trackers.finish(summary)
    return summary


def _rewind_metrics(path: Path, progress: checkpoint.Progress) -> None:
    """metrics.jsonl as of the checkpoint a run resumes from: lines of steps after it
    (work done again now) go, events stay, and the last epoch's line is added if a
    kill came between the checkpoint and writing it."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    keep, records = [], set()
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue   # half a line, from a kill while writing it
        if isinstance(rec, dict) and "event" not in rec and rec.get("step", 0) > progress.step:
            continue
        keep.append(line)
        if isinstance(rec, dict) and "test_acc" in rec and rec.get("hook") is None:
            records.add(rec.get("epoch"))
    last = progress.record
    if last is not None and last.get("epoch") not in records:
        keep.append(json.dumps(last))
    if keep != lines:
        write_text("".join(line + "\n" for line in keep), path)


def epoch_line(record: dict, epochs: int, sel: selection.Selection) -> str:
    """The console's line for one epoch: the losses, and the monitored metric (what picks
    the best epoch and early-stops), with the best value so far."""
    monitor, value = sel.monitor, record.get(sel.monitor)
    shown = "n/a" if value is None else f"{value:.4f}"
    best = (f" (monitor; best {sel.best_value:.4f} at epoch {sel.best_epoch})"
            if sel.best_value is not None else " (monitor)")
    parts = [f"epoch {record['epoch']}/{epochs}", f"train_loss {record['train_loss']:.4f}"]
    if monitor != "train_loss":
        parts.append(f"{monitor} {shown}{best}")
    else:
        parts[-1] += best
    parts += [f"test_loss {record['test_loss']:.4f}", f"test_acc {record['test_acc']:.4f}"]
    return "  ".join(parts)


def _fail(run: Run, message: str, seconds: float) -> None:
    """Write what the run had, then stop it: the last good checkpoint stays as it was."""
    run.log(None, {"event": "failed", "epoch": run.epoch, "step": run.step, "error": message})
    if run.is_main:
        write_json({"status": "failed", "error": message, "epoch": run.epoch, "steps": run.step,
                    "seconds": seconds, "config": plain(run.cfg)},
                   run.out_dir / "summary.json")
    raise RunFailed(f"{message} (run dir: {run.out_dir})")


def _interrupt(run: Run, stop, dist, device, seconds: float) -> None:
    """Stop after a signal, the checkpoint written. No summary.json: the run is not over."""
    run.log(None, {"event": "interrupted", "signal": stop.name or "SIGTERM", "epoch": run.epoch,
                   "step": run.step, "seconds": seconds})
    dist.barrier()                           # rank 0 has finished writing the checkpoint
    stop.pass_on()                           # e.g. submitit's requeue (it exits)
    raise Interrupted(
        f"stopped by {stop.name or 'a signal on another process'} at epoch {run.epoch}, "
        f"step {run.step}; checkpoint saved, continue with: rode train resume={run.out_dir}",
        stop.signum or 15)
