"""Experiment trackers beside metrics.jsonl: TensorBoard, Weights & Biases, MLflow.

``logger=tensorboard`` (or ``logger=[tensorboard,mlflow]``) adds a tracker; metrics.jsonl
is always written. Every line the run logs goes to each tracker: an epoch's line as
scalars, a hook's per-layer series (lists of numbers) as histograms (TensorBoard,
W&B) or per-layer scalars (MLflow), at the optimizer step. The run's config goes in
as hyperparameters at the start, the summary's numbers as metrics at the end.
Only the process that writes (rank 0 under DDP) builds trackers.

Whether each logger's package is installed is checked before anything runs, without
importing it (``runner.config.check_tracking``).
"""
from __future__ import annotations

import atexit
import math
import numbers
import os
import uuid
from pathlib import Path

from omegaconf import OmegaConf

from . import names
from .io import flatten, naming


def _number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _series(v) -> bool:
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(_number(x) for x in v)


def split_record(record: dict) -> tuple[dict, dict]:
    """(scalars, per-layer series) of one logged line; step/epoch/hook are the axes."""
    skip = {"hook", "step"}
    scalars = {k: float(v) for k, v in record.items() if k not in skip and _number(v)}
    series = {k: [float(x) for x in v] for k, v in record.items()
              if _series(v) and k != "layers"}   # layers: the index, not a measurement
    return scalars, series


def _hparams(config: dict) -> dict:
    """The config as flat hyperparameters (numbers, strings, bools; others as text)."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
            for k, v in flatten(config).items()}


# ---------------------------------------------------------------- backends
class TensorBoard:
    def __init__(self, opts: dict, out_dir: Path, config: dict, saved: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(opts.get("save_dir") or out_dir / "tensorboard")
        self.where = self.log_dir   # what a failed write names
        self.writer = SummaryWriter(str(self.log_dir))
        self.config = config
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in _hparams(config).items()))

    def log(self, hook, record, step):
        scalars, series = split_record(record)
        prefix = f"{hook}/" if hook else ""
        for k, v in scalars.items():
            self.writer.add_scalar(prefix + k, v, step)
        for k, v in series.items():
            import numpy as np
            self.writer.add_histogram(prefix + k, np.asarray(v), step)
            for i, x in enumerate(v):
                self.writer.add_scalar(f"{prefix}{k}/layer_{i}", x, step)

    def finish(self, summary):
        metrics = {f"summary/{k}": float(v) for k, v in flatten(summary).items()
                   if _number(v) and not k.startswith(("config.", "provenance."))}
        self.writer.add_hparams(_hparams(self.config), metrics, run_name=".")
        self.writer.close()

    def close(self):
        self.writer.close()

    def state(self):
        return {}


class WandB:
    def __init__(self, opts: dict, out_dir: Path, config: dict, saved: dict):
        import wandb

        run_id = saved.get("wandb_id") or opts.get("id") or uuid.uuid4().hex[:8]
        base = Path(opts.get("save_dir") or out_dir)
        self.where = base / "wandb"   # what a failed write names: W&B writes under dir/wandb
        self.run = wandb.init(project=opts.get("project") or "rode", name=opts.get("name"),
                              dir=str(base), mode=opts.get("mode") or "offline",
                              id=run_id, resume="allow", config=config, reinit="create_new")
        self.id = run_id

    def log(self, hook, record, step):
        import wandb

        scalars, series = split_record(record)
        prefix = f"{hook}/" if hook else ""
        data = {prefix + k: v for k, v in scalars.items()}
        for k, v in series.items():
            data[prefix + k] = wandb.Histogram(v)
            data.update({f"{prefix}{k}/layer_{i}": x for i, x in enumerate(v)})
        self.run.log(data, step=step)

    def finish(self, summary):
        self.run.summary.update({k: v for k, v in flatten(summary).items()
                                 if _number(v) and not k.startswith(("config.", "provenance."))})
        self.run.finish()

    def close(self):
        self.run.finish()

    def state(self):
        return {"wandb_id": self.id}


class MLflow:
    def __init__(self, opts: dict, out_dir: Path, config: dict, saved: dict):
        from mlflow.tracking import MlflowClient

        uri = opts.get("tracking_uri") or f"file:{default_store(out_dir)}"
        if uri.startswith("file:"):   # MLflow 3 asks for this to keep using a file store
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        self.uri = self.where = uri
        name = opts.get("experiment_name") or "rode"
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(name)
        if saved.get("mlflow_run_id"):
            self.run_id = saved["mlflow_run_id"]
        else:
            run_name = opts.get("run_name") or out_dir.name
            self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
            from mlflow.entities import Param
            params = [Param(k, str(v)[:6000]) for k, v in _hparams(config).items()]
            for i in range(0, len(params), 100):
                self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, hook, record, step):
        import time

        from mlflow.entities import Metric

        scalars, series = split_record(record)
        prefix = f"{hook}." if hook else ""
        now = int(time.time() * 1000)
        metrics = [Metric(prefix + k, v, now, step) for k, v in scalars.items()]
        for k, v in series.items():
            metrics += [Metric(f"{prefix}{k}.layer_{i}", x, now, step) for i, x in enumerate(v)]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def finish(self, summary):
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(f"summary.{k}", float(v), now, 0) for k, v in flatten(summary).items()
                   if _number(v) and not k.startswith(("config.", "provenance."))]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)
        self.client.set_terminated(self.run_id, status="FINISHED")

    def close(self):
        pass

    def state(self):
        return {"mlflow_run_id": self.run_id}


BACKENDS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}
names.agree(BACKENDS, names.LOGGERS, "BACKENDS")


def default_store(out_dir: Path) -> Path:
    """mlruns/ under the sweep dir in a sweep (one experiment for all its jobs),
    else under the run dir."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return Path(hc.sweep.dir).absolute() / "mlruns"
    except Exception:
        pass
    return Path(out_dir).absolute() / "mlruns"


# ---------------------------------------------------------------- the set
class Trackers:
    """The trackers of one run, called like a sink: ``trackers(hook, line)``."""

    def __init__(self, backends: dict):
        self.backends = backends
        self._closed = False
        atexit.register(self.close)   # a failed run still flushes what it logged

    def __call__(self, hook, line: dict) -> None:
        if "event" in line:
            return
        step = int(line.get("step", 0) or 0)
        for b in self.backends.values():
            with naming(b.where):   # a full disk names the tracker's files, as for ours
                b.log(hook, line, step)

    def state(self) -> dict:
        out = {}
        for b in self.backends.values():
            out.update(b.state())
        return out

    def finish(self, summary: dict) -> None:
        for b in self.backends.values():
            with naming(b.where):
                b.finish(summary)
        self._closed = True

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for b in self.backends.values():
                try:
                    b.close()
                except Exception:
                    pass


def start(cfg, out_dir: Path, config: dict, saved: dict | None) -> Trackers | None:
    """The trackers ``cfg.logger`` asks for (None when there are none)."""
    chosen = cfg.get("logger") or {}
    names = [n for n in chosen if n in BACKENDS]
    if not names:
        return None
    backends = {}
    for name in names:
        opts = chosen[name]
        opts = OmegaConf.to_container(opts, resolve=True) if OmegaConf.is_config(opts) else dict(opts or {})
        try:
            backends[name] = BACKENDS[name](opts, Path(out_dir), config, saved or {})
        except Exception as e:   # a tracking URI or server the logger cannot use: one line
            from .errors import RunFailed
            where = opts.get("tracking_uri") or opts.get("dir") or out_dir
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RunFailed(f"logger={name} cannot start with {where}: {first}") from None
    return Trackers(backends)
