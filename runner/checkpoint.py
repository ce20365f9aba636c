"""Checkpoints that survive crashes and preemption, and resuming from them.

A checkpoint is written to a temporary file beside its target, flushed to disk,
then renamed over it (rename is atomic on POSIX): a run killed at any moment leaves
the previous checkpoint or the new one, never half of one. SIGTERM (what SLURM and
torchrun send before killing a job) and SIGINT (Ctrl-C) only raise a flag: the
training loop checkpoints at the end of the step it is in, then stops with
:class:`Interrupted`. A checkpoint holds everything a run needs to go on exactly
as if it had not stopped: weights, optimizer, scheduler, loss scaler, epoch, step,
the position within the epoch and the random number generators' states.
"""
from __future__ import annotations

import os
import random
import signal
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import ConfigError, RodeError

FILENAME = "checkpoint.pt"
FORMAT = "rode-checkpoint"
VERSION = 1


# ------------------------------------------------------------ save, load
def save(state: dict, path: Path) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def locate(value, key: str = "checkpoint") -> Path:
    """A run dir (holding checkpoint.pt) or a checkpoint file -> the file; ConfigError if absent."""
    path = Path(str(value)).expanduser()
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        where = f"{value}/{FILENAME}" if Path(str(value)).expanduser().is_dir() else str(value)
        raise ConfigError(f"{key}={value}: {where} does not exist (give a run dir holding "
                          f"{FILENAME}, or the checkpoint file)")
    return path


def load(value, key: str = "checkpoint") -> dict:
    """Load a rode checkpoint on the CPU, or raise ConfigError saying why it is not one."""
    path = locate(value, key)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:   # torch.load raises many types for a file that is not a checkpoint
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
        raise ConfigError(f"{key}={value}: {path} is not a checkpoint ({type(e).__name__}"
                          f"{': ' + first if first else ''})") from None
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict)
            and isinstance(ckpt.get("config"), dict)):
        what = "a bare state dict" if isinstance(ckpt, dict) and ckpt and all(
            isinstance(v, torch.Tensor) for v in ckpt.values()) else type(ckpt).__name__
        raise ConfigError(f"{key}={value}: {path} is not a rode checkpoint (it holds {what}, "
                          f"not a model and its config)")
    return ckpt


def check_architecture(model: torch.nn.Module, state: dict, what: str) -> None:
    """ConfigError naming the first difference when ``state`` does not fit ``model``."""
    mine = model.state_dict()
    missing = [k for k in mine if k not in state]
    unexpected = [k for k in state if k not in mine]
    if missing or unexpected:
        detail = (f"the model has {missing[0]!r}, the checkpoint does not" if missing else
                  f"the checkpoint has {unexpected[0]!r}, the model does not")
        raise ConfigError(f"{what} is of another architecture: {detail} "
                          f"({len(missing)} missing, {len(unexpected)} unexpected keys)")
    for k, v in mine.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ConfigError(f"{what} is of another architecture: {k} has shape "
                              f"{list(state[k].shape)} in the checkpoint, {list(v.shape)} in "
                              f"the model")


# ------------------------------------------------------------ training state
@dataclass
class Progress:
    """Where a training run stands."""

    epoch: int = 1          # the epoch in progress, or the next one to start
    batch: int = 0          # its batches already trained (0: it has not started)
    step: int = 0           # optimizer steps so far
    loss_sum: float = 0.0   # training loss summed over the epoch's examples so far
    seen: int = 0           # ... and their number
    best_acc: float = 0.0
    seconds: float = 0.0    # training time before the current process started

    def next_epoch(self) -> None:
        self.epoch, self.batch, self.loss_sum, self.seen = self.epoch + 1, 0, 0.0, 0


def training_state(model, optimizer, scheduler, scaler, progress: Progress, config: dict,
                   seconds: float, data) -> dict:
    """Everything a run needs to continue exactly where it is (see :func:`restore`),
    after ``seconds`` of training. ``epoch`` is the last epoch completed; ``data``
    (its input shape and classes) lets a model be rebuilt without loading the data."""
    return {"format": FORMAT, "version": VERSION, "model": model.state_dict(),
            "data": {"input_shape": list(data.input_shape), "num_classes": data.num_classes},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "epoch": progress.epoch - 1, "step": progress.step,
            "progress": {**asdict(progress), "seconds": seconds}, "rng": rng_state(),
            "config": config}


def restore(ckpt: dict, model, optimizer, scheduler, scaler, what: str) -> Progress:
    """Load a checkpoint written by :func:`training_state` into the run's objects.
    The random number generators are set apart (:func:`set_rng_state`), right
    before training goes on. ConfigError when it does not fit the model."""
    if ckpt.get("format") != FORMAT or "progress" not in ckpt:
        raise ConfigError(f"{what}: the checkpoint has no training state to resume from "
                          f"(written by another task or an older rode)")
    check_architecture(model, ckpt["model"], what)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    return Progress(**ckpt["progress"])


# ------------------------------------------------------------ RNG states
def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------ stopping
class Interrupted(RodeError):
    """The run was asked to stop (SIGTERM, SIGINT) and checkpointed first.
    Exit code 128 + the signal number, as a shell reports a killed command."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignals:
    """Within ``with StopSignals() as stop:``, SIGTERM and SIGINT set ``stop.signum``
    instead of killing the process; a second SIGINT (Ctrl-C twice) stops at once.
    Outside the main thread, where handlers cannot be installed, it does nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def check_rebuilds(ckpt: dict, config, what: str) -> None:
    """ConfigError unless the model ``config`` describes (built without its data,
    from the shapes the checkpoint recorded) fits the checkpoint's weights."""
    from omegaconf import OmegaConf

    from .models import build_model

    shapes = ckpt.get("data")
    if not shapes:
        return
    config = OmegaConf.create(config if isinstance(config, dict) else OmegaConf.to_container(config))
    if config.get("model", {}).get("weights"):
        config.model.weights = None   # the checkpoint holds the weights
    try:
        with torch.random.fork_rng(devices=[]):   # building draws initial weights
            model = build_model(config, tuple(shapes["input_shape"]), shapes["num_classes"])
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"{what}: its config does not build a model ({type(e).__name__}: {e})"
                          ) from None
    check_architecture(model, ckpt["model"], what)
