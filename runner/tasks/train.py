"""rode train: train a ResNet classifier and write metrics.jsonl, summary.json, checkpoint.pt."""
from __future__ import annotations

import logging
import math
import os
import statistics
from collections import defaultdict
from pathlib import Path

import torch
from omegaconf import OmegaConf

from .. import checkpoint, config
from ..engine import train
from ..errors import ConfigError
from ..io import flatten, format_size, plain, read_json
from ..preflight import check_amp
from ..reporting import Job, depth_of, factors, num, series_label, table
from ..resnet import check_resnet_config
from ..rundir import RESUME_KEYS, locate
from ..selection import objective  # noqa: F401  (what a sweeper optimises; cli calls it)
from ..vision import check_dataset

log = logging.getLogger("rode")


def validate(cfg) -> None:
    """What the schema and rules cannot see: the device, resnet weights, dataset files;
    for resume=, the checkpoint and the run's own config."""
    if cfg.get("resume") == AUTO:
        cfg = auto_resume(cfg)
    if cfg.get("resume"):
        validate_resume(cfg)
        return
    check_amp(cfg)
    if cfg.model.name == "resnet":
        check_resnet_config(cfg)
    check_dataset(cfg.dataset)


def validate_resume(cfg) -> None:
    ckpt = checkpoint.load(cfg.resume, "resume")
    if ckpt.get("format") != checkpoint.FORMAT or "progress" not in ckpt:
        raise ConfigError(f"resume={cfg.resume}: the checkpoint has no training state to "
                          f"resume from (written by another task, or by an older rode)")
    job = resume_config(cfg, ckpt)
    job.resume = None
    config.validate("train", job)          # the run's own config, on this machine
    validate(job)
    checkpoint.check_rebuilds(ckpt, job, f"resume={cfg.resume}")
    if finished(ckpt, job) and not cfg.get("auto"):
        raise ConfigError(f"resume={cfg.resume}: the run already finished its {job.epochs} "
                          f"epochs; nothing to resume")


def finished(ckpt: dict, job) -> bool:
    """Whether the checkpoint's run is over: every epoch done and its summary written
    (a run stopped between its last checkpoint and its summary is not)."""
    if ckpt["progress"]["epoch"] <= job.epochs:
        return False
    try:
        return read_json(Path(job.out_dir) / "summary.json").get("status") == "completed"
    except (OSError, ValueError, AttributeError):
        return False


# ------------------------------------------------------------------ resume=auto
AUTO = "auto"
# Keys that may differ between a command line and the checkpoint resume=auto continues.
_AUTO_FREE = ("resume", "out_dir", "checkpoint", *RESUME_KEYS)


def auto_resume(cfg):
    """resume=auto: a copy of ``cfg`` with resume=<its checkpoint> when the run's dir
    holds a checkpoint of the same config, resume=None when it holds none (a fresh
    run); ConfigError naming the keys that differ when it holds another config's."""
    job = OmegaConf.create(plain(cfg, exclude=("out_dir",)))
    try:
        out_dir = Path(str(cfg.out_dir))
    except Exception:      # Hydra's dir, known only once the job runs: checked then
        out_dir = None
    job.out_dir = None if out_dir is None else str(out_dir)
    path = None if out_dir is None else out_dir / checkpoint.FILENAME
    if path is None or not path.is_file():
        job.resume = None
        return job
    ckpt = checkpoint.load(path, "resume")
    differ = config_differences(ckpt.get("config", {}), plain(job))
    if differ:
        shown = "; ".join(f"{k}: {a!r} here, {b!r} in the checkpoint" for k, a, b in differ[:4])
        more = f" (and {len(differ) - 4} more)" if len(differ) > 4 else ""
        raise ConfigError(f"resume=auto: {out_dir} holds a checkpoint of another config "
                          f"({shown}{more}); choose another dir, or continue that run with "
                          f"resume={out_dir}")
    job.resume = str(path)
    job.auto = True
    return job


def config_differences(saved: dict, mine: dict) -> list[tuple[str, object, object]]:
    """(dotted key, this value, the checkpoint's) for every key that differs, but those
    that may change between a run and its continuation."""
    def flat(d):
        return {k: v for k, v in flatten(d).items() if k.split(".")[0] not in _AUTO_FREE}

    a, b = flat(mine), flat(saved)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def resume_config(cfg, ckpt: dict):
    """The resumed run's config: the checkpoint's, with this command's RESUME_KEYS,
    writing into the checkpoint's run dir."""
    job = OmegaConf.create(ckpt["config"])
    for key in RESUME_KEYS:
        if key in cfg:
            job[key] = cfg[key]
    path = locate(cfg.resume, "resume")
    job.resume = str(path)
    job.out_dir = str(path.parent)
    return job


def run(cfg) -> dict:
    if cfg.get("threads") is not None:
        torch.set_num_threads(int(cfg.threads))   # the process is this run's alone
    if cfg.get("resume") == AUTO:
        cfg = auto_resume(cfg)
    if cfg.get("resume"):
        ckpt = checkpoint.load(cfg.resume, "resume")
        job = resume_config(cfg, ckpt)
        if finished(ckpt, job):   # resume=auto, re-run after the run had ended
            log.info("%s already finished; nothing to resume", job.out_dir)
            summary = read_json(Path(job.out_dir) / "summary.json")
            print(f"rode train: already finished -> {job.out_dir}", flush=True)
            return summary
        log.info("resuming %s from epoch %d, step %d", job.out_dir,
                 ckpt["progress"]["epoch"], ckpt["progress"]["step"])
        summary = train(job, resume=ckpt)
        cfg = job
    else:
        summary = train(cfg)
    if summary.get("world_size", 1) > 1 and int(os.environ.get("RANK", 0)) != 0:
        return summary                     # rank 0 speaks for the group
    bpc = summary.get("test_bpc")
    lm = "" if bpc is None else (
        f"test {bpc:.3f} bits/char"
        + (f" ({summary['selected_test_bpc']:.3f} at epoch {summary['best_epoch']}, the best "
           f"{summary['monitor']}) " if summary.get("selected_test_bpc") is not None else " ")
        + "; ")
    print(f"rode train: {lm}test accuracy {100 * summary['test_acc']:.2f}% "
          f"{_selected(summary)}after {summary.get('epochs_run', summary['epochs'])} epochs, "
          f"{summary['seconds']:.1f} s -> {cfg.out_dir}", flush=True)
    return summary


def _selected(summary: dict) -> str:
    """The test accuracy at the epoch the monitored metric chose (not the best test one)."""
    if summary.get("selected_test_acc") is None:
        return ""
    stop = ", stopped early" if summary.get("stopped_early") else ""
    return (f"({100 * summary['selected_test_acc']:.2f}% at epoch {summary['best_epoch']}, "
            f"the best {summary['monitor']}{stop}) ")


# ------------------------------------------------------------------ report
def report_section(jobs: list[Job], out: Path, figures: list[str]) -> str:
    """Test error vs depth per (method, grad, other axes), with the spread over seeds."""
    done = [j for j in jobs if j.status == "completed" and depth_of(j) is not None
            and "test_acc" in j.summary and "acc_before" not in j.summary]
    if not done:
        return ""
    extra = factors(done)
    groups = defaultdict(list)
    for j in done:
        groups[(series_label(j, ["method", "grad"], extra), depth_of(j))].append(j)
    series = defaultdict(list)
    rows = []
    for (label, depth), js in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        errors = [1 - j.summary["test_acc"] for j in js]
        best = [1 - (j.summary.get("selected_test_acc") or j.summary["test_acc"]) for j in js]
        med = statistics.median(errors)
        series[label].append((depth, med, min(errors), max(errors), len(errors)))
        rows.append([label.replace(" | ", ", "), depth, len(js), f"{100 * med:.2f}",
                     f"{100 * min(errors):.2f}–{100 * max(errors):.2f}",
                     f"{100 * statistics.median(best):.2f}",
                     statistics.median(j.summary.get("seconds", math.nan) for j in js),
                     format_size(statistics.median(num(j.summary.get("peak_memory_bytes"))
                                                   for j in js))])
    rows_trials = _trials(done)
    from ..plots import plot_test_error  # matplotlib: only when a report is drawn
    plot_test_error(dict(series), out / "test_error.png")
    figures.append("test_error.png")
    kind = {j.summary.get("peak_memory_kind") for j in done} - {None}
    return "\n".join([
        "## Test error vs depth (`rode train`)", "",
        "Final test error in %, median over seeds, with the lowest and highest seed; "
        "selected: the test error at the epoch with the best validation metric "
        "(`monitor`; the final epoch for runs without one), median.", "",
        table(["series", "depth", "seeds", "error %", "min–max %", "selected %", "seconds",
               "peak"], rows), "",
        f"Peak memory: {', '.join(sorted(kind)) or 'not recorded'}.", "",
        "![test error vs depth](test_error.png)", *rows_trials])


def _trials(jobs: list[Job]) -> list[str]:
    """A hyperparameter study (hparams_search=...): every trial, its searched values and
    its objective, best first. The study is found by its optimization_results.yaml."""
    studies = {j.path.parent for j in jobs if (j.path.parent / "optimization_results.yaml").is_file()}
    if not studies:
        return []
    out = []
    for study in sorted(studies):
        trials = [j for j in jobs if j.path.parent == study]
        keys = sorted({k.split("=")[0] for j in trials for k in j.path.name.split(",")}
                      - {"hparams_search", "epochs", "threads", "progress"})
        rows = []
        for j in trials:
            values = dict(kv.split("=", 1) for kv in j.path.name.split(",") if "=" in kv)
            obj = j.summary.get("best_metrics", {}).get(j.summary.get("monitor", "val_acc"))
            rows.append([*(values.get(k, "") for k in keys),
                         f"{100 * obj:.2f}" if obj is not None else "–",
                         f"{100 * (j.summary.get('selected_test_acc') or math.nan):.2f}",
                         format_size(num(j.summary.get("peak_memory_bytes")))])
        rows.sort(key=lambda r: -num(r[len(keys)]) if r[len(keys)] != "–" else math.inf)
        results = (study / "optimization_results.yaml").read_text().strip()
        out += ["", f"## Hyperparameter study `{study.name}` ({len(trials)} trials)", "",
                "Validation accuracy (the monitored metric) of every trial, best first, with "
                "its test accuracy at the selected epoch.", "",
                table([*keys, "val acc %", "test acc % (selected)", "peak"], rows), "",
                "Optuna's result (optimization_results.yaml):", "", "```", results, "```"]
    return out


def report_result(job: Job) -> str:
    s = job.summary
    if "test_acc" not in s:
        return ""
    sel = s.get("selected_test_acc")
    at = f" (selected {100 * sel:.2f}% at epoch {s.get('best_epoch')})" if sel is not None else ""
    bpc = f"test {s['test_bpc']:.3f} bits/char, " if s.get("test_bpc") is not None else ""
    return f"{bpc}test acc {100 * s['test_acc']:.2f}%{at}"
