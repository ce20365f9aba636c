"""rode train: train a ResNet classifier and write metrics.jsonl, summary.json, checkpoint.pt."""
from __future__ import annotations

import logging
import math
import os
import statistics
from collections import defaultdict
from pathlib import Path

from omegaconf import OmegaConf

from .. import checkpoint, config, rundir
from ..engine import train
from ..errors import ConfigError
from ..io import flatten, format_size, plain, read_json
from ..preflight import check_amp
from ..reporting import Job, depth_of, factors, num, series_label, table
from ..resnet import check_resnet_config
from ..rundir import RESUME_KEYS, locate
from ..threads import apply as apply_threads
from ..vision import check_dataset_files

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
    check_dataset_files(cfg.dataset)


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
        raise ConfigError(f"resume={cfg.resume}: the run already finished "
                          f"{_how_it_ended(job)}; nothing to resume")


def finished(ckpt: dict, job) -> bool:
    """Whether the checkpoint's run is over: its summary written as completed, after
    every epoch or an early stop (a run stopped between its last checkpoint and its
    summary is not)."""
    return rundir.finished(job.out_dir)


def _how_it_ended(job) -> str:
    try:
        summary = read_json(Path(job.out_dir) / "summary.json")
    except (OSError, ValueError):
        summary = {}
    if summary.get("stopped_early"):
        return f"(stopped early after epoch {summary.get('epochs_run', '?')} of {job.epochs})"
    return f"its {job.epochs} epochs"


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
    apply_threads(cfg)   # the process is this run's alone
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
    """Test error vs depth per (method, grad, other axes), with the spread over seeds;
    for an lr x depth sweep, the learning-rate transfer section (runner.transfer) first;
    for depths N, 2N, 4N..., where trained weights converge (runner.convergence)."""
    from ..convergence import section as convergence_section
    from ..transfer import section as transfer_section

    mine = [j for j in jobs if "acc_before" not in j.summary]
    transfer = transfer_section(mine, out, figures)
    converge = convergence_section(mine, out, figures)
    errors = _test_error_section(jobs, out, figures)
    return "\n\n".join(part for part in (transfer, converge, errors) if part)


def _test_error_section(jobs: list[Job], out: Path, figures: list[str]) -> str:
    """Test error vs depth per (method, grad, other axes), with the spread over seeds,
    and the hooks' records when any were on."""
    from ..hooks.report import report_section as hooks_section
    hooks = hooks_section(jobs, out, figures)   # the hooks' records, when any were on
    done = [j for j in jobs if j.status == "completed" and depth_of(j) is not None
            and "test_acc" in j.summary and "acc_before" not in j.summary]
    if not done:
        return hooks
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
    rows_trials = _trials(done, out, figures)
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
        "![test error vs depth](test_error.png)", *rows_trials,
        *(["", hooks] if hooks else [])])


def pareto_optimal(points: list[tuple[float, float]]) -> list[bool]:
    """For (accuracy, memory) pairs: whether each is Pareto-optimal, i.e. no other pair
    has accuracy at least as high and memory at most as low, one of them strictly."""
    def beaten(a, m):
        return any(a2 >= a and m2 <= m and (a2 > a or m2 < m) for a2, m2 in points)
    return [not (math.isnan(a) or math.isnan(m)) and not beaten(a, m) for a, m in points]


def _pareto(trials: list[Job], out: Path, figures: list[str], name: str) -> list[str]:
    """A two-objective study (hparams_search=optuna_pareto: accuracy against memory):
    the figure of every trial with its Pareto-optimal ones marked, and their table."""
    names = (trials[0].summary.get("config") or {}).get("objective")
    if not isinstance(names, list) or len(names) != 2:
        return []
    acc_name, mem_name = names
    points = []
    for j in trials:
        best = j.summary.get("best_metrics") or {}
        cfg = j.summary.get("config") or {}
        grad = str(cfg.get("grad"))
        if grad == "adjoint":
            grad += f" ({(cfg.get('adjoint') or {}).get('vjp', 'exact')} vjp)"
        points.append({"job": j, "acc": num(best.get(acc_name, j.summary.get(acc_name))),
                       "memory": num(best.get(mem_name, j.summary.get(mem_name))),
                       "grad": grad, "method": str(cfg.get("method")),
                       "depth": cfg.get("depth"), "lr": cfg.get("lr")})
    for p, optimal in zip(points, pareto_optimal([(p["acc"], p["memory"]) for p in points]),
                          strict=True):
        p["pareto"] = optimal
    if not any(p["pareto"] for p in points):
        return []
    from ..plots import plot_pareto  # matplotlib: only when a report is drawn
    figure = f"pareto_{name}.png" if len(figures) and any(f.startswith("pareto") for f in figures) \
        else "pareto.png"
    plot_pareto(points, out / figure, mem_name)
    figures.append(figure)
    front = sorted((p for p in points if p["pareto"]), key=lambda p: p["memory"])
    rows = [[format_size(p["memory"]), f"{100 * p['acc']:.2f}", p["depth"], p["grad"],
             p["method"], f"{num(p['lr']):.4g}",
             format_size(num(p["job"].summary.get("saved_activation_bytes")))] for p in front]
    return ["", f"Pareto-optimal trials ({len(front)} of {len(points)}): {acc_name} against "
            f"{mem_name}, smallest memory first; no other trial is both more accurate and "
            "smaller.", "",
            table([mem_name, f"{acc_name} %", "depth", "grad", "method", "lr",
                   "saved activations"], rows), "",
            f"![accuracy vs memory]({figure})"]


def _trials(jobs: list[Job], out_dir: Path | None = None, figures: list[str] | None = None) -> list[str]:
    """A hyperparameter study (hparams_search=...): every trial, its searched values and
    its objective, best first; for a two-objective study also its Pareto front (figure
    and table). The study is found by its optimization_results.yaml."""
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
        if out_dir is not None and figures is not None:
            out += _pareto(trials, Path(out_dir), figures, study.name)
    return out


def report_result(job: Job) -> str:
    s = job.summary
    if "test_acc" not in s:
        return ""
    sel = s.get("selected_test_acc")
    at = f" (selected {100 * sel:.2f}% at epoch {s.get('best_epoch')})" if sel is not None else ""
    bpc = f"test {s['test_bpc']:.3f} bits/char, " if s.get("test_bpc") is not None else ""
    return f"{bpc}test acc {100 * s['test_acc']:.2f}%{at}"
