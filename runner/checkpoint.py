"""Checkpoints that survive crashes and preemption, and resuming from them.

A checkpoint is written to a temporary file beside its target, flushed to disk,
then renamed over it (rename is atomic on POSIX): a run killed at any moment leaves
the previous checkpoint or the new one, never half of one. SIGTERM (what SLURM and
torchrun send before killing a job) and SIGINT (Ctrl-C) only raise a flag: the
training loop checkpoints at the end of the step it is in, then stops with
:class:`~runner.errors.Interrupted`. A checkpoint holds everything a run needs to go on exactly
as if it had not stopped: weights, optimizer, scheduler, loss scaler, epoch, step,
the position within the epoch and the random number generators' states.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from .config import upgrade_config
from .errors import ConfigError, RunFailed
from .io import atomic_open
from .models import build_model
from .rundir import CHECKPOINT, locate, os_error_cause

FILENAME = CHECKPOINT
CHECKSUM = "sha256"
FORMAT = "rode-checkpoint"
VERSION = 1


# ------------------------------------------------------------ save, load
def save(state: dict, path: Path) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename), with
    the checksum of its contents that :func:`load` verifies."""
    state = {**state, CHECKSUM: checksum(state)}
    with atomic_open(path, "wb") as f:
        torch.save(state, f)


def checksum(state) -> str:
    """sha256 over every tensor of ``state`` (its place, dtype, shape and bytes), in a
    fixed order: a flipped bit anywhere in the weights, optimizer or RNG states
    changes it. Other values (the config, counters) are left out: pickled, they do
    not load when damaged, and a config may be edited by hand."""
    digest = hashlib.sha256()

    def feed(where: str, value) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{where} {t.dtype} {tuple(value.shape)}".encode())
            digest.update(t.view(torch.uint8).numpy())   # the buffer itself, not a copy
        elif isinstance(value, dict):
            for k in sorted(value, key=repr):
                if k != CHECKSUM:
                    feed(f"{where}/{k!r}", value[k])
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                feed(f"{where}/{i}", v)

    feed("", state)
    return digest.hexdigest()


def remove_stale_temporaries(run_dir) -> list[Path]:
    """Delete the ``.<name>.<pid>.tmp`` files that a killed process left in ``run_dir``
    (a process alive under that pid keeps its own). Returns the deleted files."""
    removed = []
    for tmp in Path(run_dir).glob(".*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if not pid.isdigit() or (int(pid) != os.getpid() and _alive(int(pid))):
            continue
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load(value, key: str = "checkpoint") -> dict:
    """Load a rode checkpoint on the CPU, or raise ConfigError saying why it is not one.
    Read and checksummed once per process per file version; callers share the dict
    (and must not change it)."""
    path = locate(value, key)
    stat = path.stat()
    seen = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if seen in _LOADED:   # validation, resume=auto and the run share one read
        return _LOADED[seen]
    ckpt = _read(path, value, key)
    _LOADED[seen] = ckpt
    while len(_LOADED) > _KEEP:
        _LOADED.pop(next(iter(_LOADED)))
    return ckpt


# Checkpoints this process has read and verified, by (path, mtime, size): a changed
# file is read again. A few only: a sweep resumes its jobs one after another.
_LOADED: dict[tuple, dict] = {}
_KEEP = 2


def _read(path: Path, value, key: str) -> dict:
    """Read and verify one checkpoint file (its sha256 too)."""
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
    if CHECKSUM in ckpt and checksum(ckpt) != ckpt[CHECKSUM]:
        raise ConfigError(f"{key}={value}: {path} is corrupted (its contents do not match the "
                          f"sha256 checksum written with it); use an intact copy")
    return {**ckpt, "config": upgrade_config(ckpt["config"])}   # keys renamed since it was written


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
    record: dict | None = None   # the last evaluated epoch's metrics line

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
class WriteFailed(RunFailed):
    """A result file could not be written (disk full, permission lost): the message
    names the cause and the file, e.g. 'no space left on device while writing
    checkpoint.pt'."""

    def __init__(self, error: OSError, path, epoch: int | None = None, step: int | None = None):
        path = Path(path)
        failed = Path(error.filename) if error.filename else None
        if failed is not None and not failed.name.startswith((path.name, f".{path.name}.")):
            # the file that failed is another (a tracker's), not path or its temporary
            name = (str(failed.relative_to(path.parent)) if failed.is_relative_to(path.parent)
                    else str(failed))
        else:
            name = path.name
        super().__init__(f"{os_error_cause(error)} while writing {name}")
        self.path, self.epoch, self.step = path, epoch, step


@contextlib.contextmanager
def writing(path, epoch: int | None = None, step: int | None = None):
    """Turn an OSError raised within the block into :class:`WriteFailed` naming ``path``."""
    try:
        yield
    except OSError as e:
        raise WriteFailed(e, path, epoch, step) from e


def _stop_signals() -> tuple[int, ...]:
    """SIGTERM (SLURM at the time limit, torchrun, kill), SIGINT (Ctrl-C), SIGUSR1 and
    SIGUSR2 (schedulers' "time is almost up"), and submitit's preemption signal
    (SUBMITIT_PREEMPT_SIGNAL, e.g. USR2)."""
    found = [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2]
    extra = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)
    if isinstance(extra, signal.Signals) and extra not in found:
        found.append(extra)
    return tuple(found)


class StopSignals:
    """Within ``with StopSignals() as stop:``, SIGTERM, SIGINT, SIGUSR1, SIGUSR2 (and
    submitit's preemption signal) set ``stop.signum`` instead of killing the process;
    a second SIGINT (Ctrl-C twice) stops at once. Once the run has checkpointed,
    :meth:`pass_on` hands the signal to the handler that was there before (submitit's
    checkpoint-and-requeue under its launchers). Outside the main thread, where
    handlers cannot be installed, it does nothing."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self.SIGNALS = _stop_signals()

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

    def pass_on(self) -> None:
        """Call the previous Python handler of the signal received, if there was one
        (not Python's default Ctrl-C handler): e.g. submitit's, which requeues the
        job and exits."""
        handler = self._previous.get(self.signum) if self.signum else None
        if callable(handler) and handler is not signal.default_int_handler:
            self.__exit__()
            handler(self.signum, None)

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
    shapes = ckpt.get("data")
    if not shapes:
        return
    config = OmegaConf.create(config if isinstance(config, dict) else OmegaConf.to_container(config))
    if config.get("model", {}).get("pretrained"):
        config.model.pretrained = None   # the checkpoint holds the weights
    try:
        with torch.random.fork_rng(devices=[]):   # building draws initial weights
            model = build_model(config, tuple(shapes["input_shape"]), shapes["num_classes"])
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"{what}: its config does not build a model ({type(e).__name__}: {e})"
                          ) from None
    check_architecture(model, ckpt["model"], what)
