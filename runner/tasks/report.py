"""rode report <dir>: markdown tables and PNG figures from the job dirs of a sweep.

``dir`` is a multirun directory (outputs/multirun/<time>/, one job dir per
combination of overrides), a single run directory, or any folder of them. Every
directory holding ``.hydra/`` or a result file is a job; its task comes from
Hydra's record of it (or from the files it wrote). A job without a summary
(``summary.json``, or ``bench.json`` for ``rode bench``) is listed as unfinished,
one whose summary says ``status: failed`` as failed: neither is dropped silently.

Writes ``report.md`` and, for what the jobs hold, ``test_error.png`` (train),
``grad_error.png`` (gradcheck), ``memory.png`` (memory), ``bench.png`` (bench),
``discretization.png`` and ``linear_weights.png`` / ``linear_increments.png``
into ``out_dir`` (by default the sweep directory itself).
"""
from __future__ import annotations

import csv
import json
import logging
import math
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from ..errors import ConfigError

log = logging.getLogger("rode")

POSITIONAL = "dir"   # `rode report <dir>` is `rode report dir=<dir>`

# Result files -> the task that writes them (used when Hydra's record is missing).
RESULT_FILES = {"grad_error.csv": "gradcheck", "memory.csv": "memory", "bench.csv": "bench",
                "discretization.csv": "discretization", "linear_metrics.csv": "linear",
                "metrics.jsonl": "train"}
SUMMARY_FILES = ("summary.json", "bench.json")
# Keys that are not an experimental factor when telling series apart.
NOT_FACTORS = {"depth", "seed", "out_dir", "progress", "device", "method", "grad", "checkpoint"}


@dataclass
class Job:
    path: Path
    name: str
    task: str
    status: str                      # completed | failed | unfinished
    error: str = ""
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)


# ------------------------------------------------------------- finding jobs
def is_job_dir(path: Path) -> bool:
    return (path / ".hydra").is_dir() or any(
        (path / f).is_file() for f in (*SUMMARY_FILES, *RESULT_FILES))


def find_jobs(root: Path) -> list[Job]:
    """Every job dir under root (root itself when it is one), in path order."""
    if is_job_dir(root):
        return [load_job(root, root)]
    jobs = []
    for path in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: natural(str(p))):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        if any(parent in (j.path for j in jobs) for parent in path.parents):
            continue   # inside a job dir already found
        if is_job_dir(path):
            jobs.append(load_job(path, root))
    return jobs


def _load_yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return None


def load_job(path: Path, root: Path) -> Job:
    name = "." if path == root else str(path.relative_to(root))
    hydra_cfg = _load_yaml(path / ".hydra" / "hydra.yaml") or {}
    task = (hydra_cfg.get("hydra", {}).get("job", {}) or {}).get("name")
    if not task:
        task = next((t for f, t in RESULT_FILES.items() if (path / f).is_file()), "unknown")
    summary, error = None, ""
    for f in SUMMARY_FILES:
        if (path / f).is_file():
            try:
                summary = json.loads((path / f).read_text())
            except (OSError, json.JSONDecodeError) as e:
                summary, error = {}, f"{f} unreadable: {e}"
            break
    if summary is None:
        status = "unfinished"
        error = _last_event(path) or "no summary file (still running, killed, or crashed)"
    else:
        status = "failed" if error or summary.get("status") == "failed" else "completed"
        error = error or str(summary.get("error", ""))
    config = (summary or {}).get("config") or _load_yaml(path / ".hydra" / "config.yaml") or {}
    return Job(path, name, task, status, error, config, summary or {})


def _last_event(path: Path) -> str:
    """Why a run without a summary stopped, when its metrics.jsonl says (e.g. a signal)."""
    try:
        lines = (path / "metrics.jsonl").read_text().splitlines()
        last = json.loads(lines[-1]) if lines else {}
    except (OSError, json.JSONDecodeError):
        return ""
    if last.get("event") == "interrupted":
        return (f"interrupted by {last.get('signal', 'a signal')} at epoch {last.get('epoch')}, "
                f"step {last.get('step')}; continue with: rode train resume={path}")
    return ""


# ---------------------------------------------------------------- helpers
def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def fmt(value, digits: int = 4) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.{digits}g}"
    return "–" if value is None else str(value)


def size(value) -> str:
    """Bytes, human-readable (1024-based)."""
    v = num(value)
    if math.isnan(v):
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(v) < 1024 or unit == "GiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024


def natural(text: str) -> list:
    """Sort key that puts depth=4 before depth=16."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list) else v
    return out


def factors(jobs: list[Job], exclude=NOT_FACTORS) -> list[str]:
    """Config keys whose value differs between these jobs (the sweep's other axes)."""
    flat = [flatten(j.config) for j in jobs]
    keys = sorted(set().union(*flat)) if flat else []
    return [k for k in keys if k not in exclude
            and len({str(f.get(k)) for f in flat}) > 1]


def series_label(job: Job, first: list[str], extra: list[str]) -> str:
    """'euler adjoint', or 'euler adjoint | init=iid' when other axes vary (a figure panel each)."""
    flat = flatten(job.config)
    label = " ".join(str(flat.get(k, "?")) for k in first)
    if extra:
        label += " | " + " ".join(f"{k}={flat.get(k)}" for k in extra)
    return label


def figure_suffixes(jobs: list[Job]) -> list[str]:
    """'' for one job; else what tells the jobs apart ('_init-iid'), or their index."""
    if len(jobs) == 1:
        return [""]
    keys = factors(jobs, exclude={"out_dir", "progress"})
    names = []
    for k, j in enumerate(jobs):
        flat = flatten(j.config)
        words = [f"{key.split('.')[-1]}-{flat.get(key)}" for key in keys]
        slug = "_".join(words).replace("/", "-").replace(" ", "")
        names.append("_" + slug if keys and len(slug) <= 60 else f"_{k}")
    return names if len(set(names)) == len(names) else [f"_{k}" for k in range(len(jobs))]


def depth_of(job: Job) -> int | None:
    d = job.summary.get("depth", job.config.get("depth"))
    return int(d) if isinstance(d, (int, float)) and not isinstance(d, bool) else None


# --------------------------------------------------------------- sections
def section_jobs(jobs: list[Job]) -> str:
    bad = [j for j in jobs if j.status != "completed"]
    counts = defaultdict(int)
    for j in jobs:
        counts[j.status] += 1
    text = [f"{len(jobs)} jobs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + "."]
    if bad:
        text += ["", "## Failed or unfinished jobs", "",
                 "These jobs have no results in the tables and figures below.", "",
                 table(["job", "task", "status", "why"],
                       [[f"`{j.name}`", j.task, j.status, j.error[:200]]
                        for j in bad])]
    return "\n".join(text)


def section_train(jobs: list[Job], out: Path, figures: list[str]) -> str:
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
        best = [1 - j.summary.get("best_test_acc", j.summary["test_acc"]) for j in js]
        med = statistics.median(errors)
        series[label].append((depth, med, min(errors), max(errors), len(errors)))
        rows.append([label.replace(" | ", ", "), depth, len(js), f"{100 * med:.2f}",
                     f"{100 * min(errors):.2f}–{100 * max(errors):.2f}",
                     f"{100 * statistics.median(best):.2f}",
                     statistics.median(j.summary.get("seconds", math.nan) for j in js),
                     size(statistics.median(num(j.summary.get("peak_memory_bytes")) for j in js))])
    from ..plots import plot_test_error
    plot_test_error(dict(series), out / "test_error.png")
    figures.append("test_error.png")
    kind = {j.summary.get("peak_memory_kind") for j in done} - {None}
    return "\n".join([
        "## Test error vs depth (`rode train`)", "",
        "Final test error in %, median over seeds, with the lowest and highest seed; "
        "best: the best epoch's error (median).", "",
        table(["series", "depth", "seeds", "error %", "min–max %", "best %", "seconds",
               "peak"], rows), "",
        f"Peak memory: {', '.join(sorted(kind)) or 'not recorded'}.", "",
        "![test error vs depth](test_error.png)"])


def section_gradcheck(jobs: list[Job], out: Path, figures: list[str]) -> str:
    """Gradient error of the adjoint vs depth, log-log, with fitted slopes."""
    done = [j for j in jobs if j.status == "completed" and (j.path / "grad_error.csv").is_file()]
    if not done:
        return ""
    extra = factors(done)
    series = defaultdict(list)
    rows = []
    for j in done:
        layers = [num(r.get("rel_error")) for r in read_csv(j.path / "grad_error.csv")]
        layers = [e for e in layers if not math.isnan(e)]
        # The residual layers' error (what the paper plots); all parameters as a fallback.
        total = num(j.summary.get("stack_rel_error", j.summary.get("rel_error")))
        if math.isnan(total) and layers:
            total = statistics.median(layers)
        depth = depth_of(j)
        if depth is None or math.isnan(total):
            continue
        label = series_label(j, ["method"], extra)
        lo, hi = (min(layers), max(layers)) if layers else (total, total)
        series[label].append((depth, total, lo, hi))
        rows.append([label.replace(" | ", ", "), depth, total, lo, hi, num(j.summary.get("rel_error")),
                     num(j.summary.get("cosine"))])
    if not series:
        return ""
    rows.sort(key=lambda r: (r[0], r[1]))
    from ..plots import fit_slope, plot_grad_error
    plot_grad_error(dict(series), out / "grad_error.png")
    figures.append("grad_error.png")
    slopes = [[label.replace(" | ", ", "), f"{fit_slope([p[0] for p in pts], [p[1] for p in pts]):+.2f}", len(pts)]
              for label, pts in sorted(series.items())]
    return "\n".join([
        "## Gradient error vs depth (`rode gradcheck`)", "",
        "||g_adjoint - g_backprop|| / ||g_backprop||: over the residual layers' parameters "
        "(stack), the lowest and highest single layer, and over all parameters.", "",
        table(["series", "depth", "stack", "min layer", "max layer", "all params", "cosine"],
              rows), "",
        "Fitted log-log slope of the stack error against depth:", "",
        table(["series", "slope", "depths"], slopes), "",
        "![gradient error vs depth](grad_error.png)"])


def _table_jobs(jobs: list[Job], filename: str) -> list[tuple[Job, list[dict]]]:
    return [(j, read_csv(j.path / filename)) for j in jobs
            if j.status == "completed" and (j.path / filename).is_file()]


def section_memory(jobs: list[Job], out: Path, figures: list[str]) -> str:
    found = _table_jobs(jobs, "memory.csv")
    rows = [r for _, rs in found for r in rs]
    if not rows:
        return ""
    from ..plots import plot_memory
    plot_memory(rows, out / "memory.png")
    figures.append("memory.png")
    kinds = {str(j.summary.get("peak_kind")) for j, _ in found if j.summary.get("peak_kind")}
    body = [[r.get("method"), r.get("grad"), int(num(r["depth"])), size(r.get("saved_bytes")),
             size(r.get("peak_bytes")), num(r.get("seconds_per_step"))]
            for r in sorted(rows, key=lambda r: (r.get("method", ""), r.get("grad", ""),
                                                 num(r["depth"])))]
    return "\n".join([
        "## Memory vs depth (`rode memory`)", "",
        table(["method", "grad", "depth", "saved for backward", "peak", "s/step"], body), "",
        f"Peak memory: {', '.join(sorted(kinds)) or 'kind not recorded'}.", "",
        "![memory vs depth](memory.png)"])


def section_bench(jobs: list[Job], out: Path, figures: list[str]) -> str:
    found = _table_jobs(jobs, "bench.csv")
    rows = [r for _, rs in found for r in rs]
    if not rows:
        return ""
    from ..plots import plot_bench
    plot_bench(rows, out / "bench.png")
    figures.append("bench.png")
    body = [[r.get("contender"), r.get("method"), int(num(r["depth"])), r.get("width"),
             r.get("batch"), num(r.get("seconds_per_step")), size(r.get("peak_bytes")),
             num(r.get("grad_rel_error"))]
            for r in sorted(rows, key=lambda r: (r.get("method", ""), num(r["depth"]),
                                                 r.get("contender", "")))]
    notes = [n for j, _ in found for n in j.summary.get("notes", [])]
    return "\n".join([
        "## Benchmark: one training step vs depth (`rode bench`)", "",
        table(["contender", "method", "depth", "width", "batch", "s/step", "peak",
               "grad error"], body), "",
        *[line for n in notes for line in (f"- note: {n}",)], *([""] if notes else []),
        "![benchmark](bench.png)"])


def section_discretization(jobs: list[Job], out: Path, figures: list[str]) -> str:
    found = _table_jobs(jobs, "discretization.csv")
    if not found:
        return ""
    from ..plots import fit_slope, plot_discretization
    text = ["## Discretization error vs depth (`rode discretization`)", "",
            "||x_N - x(1)|| / ||x(1)||: the ResNet with θ_n = θ(n/N) against the Neural ODE "
            "(exact for the linear case with constant weights, fine RK4 otherwise)."]
    for (job, rows), suffix in zip(found, figure_suffixes([j for j, _ in found])):
        name = f"discretization{suffix}.png"
        plot_discretization(rows, out / name)
        figures.append(name)
        groups = defaultdict(list)
        for r in rows:
            groups[(r.get("case", ""), r["weights"], r["method"])].append(
                (int(r["depth"]), num(r["error"])))
        body = []
        for (case, weights, method), pts in groups.items():
            pts.sort()
            body.append([case, weights, method, f"{pts[0][1]:.3g}", f"{pts[-1][1]:.3g}",
                         f"{fit_slope(*zip(*pts)):+.2f}"])
        depths = sorted({p for pts in groups.values() for p, _ in pts})
        text += ["", f"Job `{job.name}`: depths {depths[0]}..{depths[-1]}.", "",
                 table(["case", "weights", "method", f"error N={depths[0]}",
                        f"error N={depths[-1]}", "slope"], body), "",
                 f"![discretization error vs depth]({name})"]
    return "\n".join(text)


def section_linear(jobs: list[Job], out: Path, figures: list[str]) -> str:
    found = _table_jobs(jobs, "linear_metrics.csv")
    if not found:
        return ""
    import numpy as np
    from ..plots import plot_linear_increments, plot_linear_weights
    text = ["## Linear ResNets: weights along depth during training (`rode linear`)", ""]
    for (job, rows), suffix in zip(found, figure_suffixes([j for j, _ in found])):
        inc_name, w_name = f"linear_increments{suffix}.png", f"linear_weights{suffix}.png"
        plot_linear_increments(rows, out / inc_name)
        figures.append(inc_name)
        body = []
        for p in job.summary.get("per_depth", []):
            body.append([p["depth"], p["initial_loss"], p["final_loss"], p["max_increment"],
                         p["max_scaled_increment"], p.get("limit_gap")])
        cfg = job.config
        text += [f"Job `{job.name}` (init={cfg.get('init')}, {cfg.get('steps')} steps, "
                 f"lr={cfg.get('lr')}):", "",
                 table(["N", "loss start", "loss end", "max over n, t of ‖A_{n+1} − A_n‖",
                        "N × that", "gap to next N"], body), "",
                 f"Slopes vs N: max increment {fmt(job.summary.get('slope_max_increment'), 3)}, "
                 f"gap to the next depth {fmt(job.summary.get('slope_limit_gap'), 3)} "
                 f"(smooth in depth: -1 and -1).", "",
                 f"![increments along training]({inc_name})"]
        npz = job.path / "linear_weights.npz"
        if npz.is_file():
            data = np.load(npz)
            depths = sorted(int(key.split("_")[1]) for key in data.files
                            if key.startswith("weights_"))
            if depths:
                n = depths[-1]
                plot_linear_weights({"depth": n, "steps": list(data[f"steps_{n}"]),
                                     "weights": data[f"weights_{n}"]}, out / w_name)
                figures.append(w_name)
                text += ["", f"![weights against depth]({w_name})"]
        text.append("")
    return "\n".join(text)


def section_finetune(jobs: list[Job], out: Path, figures: list[str]) -> str:
    done = [j for j in jobs if j.status == "completed" and "acc_before" in j.summary]
    if not done:
        return ""
    body = []
    for j in done:
        s = j.summary
        grad = s.get("grad", "")
        untied = s.get("acc_untied", s.get("acc_refined", math.nan))
        body.append([f"`{j.name}`", _depths(s.get("depth_before")), _depths(s.get("depth_after")),
                     grad, f"{100 * s['acc_before']:.2f}", f"{100 * untied:.2f}",
                     f"{100 * s.get('acc_after', s.get('test_acc', math.nan)):.2f}",
                     size(s.get("stack_saved_bytes_backprop")),
                     size(s.get(f"stack_saved_bytes_{grad}"))])
    return "\n".join([
        "## Fine-tuning untied models (`rode finetune`)", "",
        table(["job", "depth before", "depth after", "grad", "acc before %", "untied %",
               "after %", "stack activations (backprop)", "stack activations (this grad)"], body)])


def _depths(value) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else fmt(value)


def section_all_jobs(jobs: list[Job]) -> str:
    def result(j: Job) -> str:
        s = j.summary
        if "test_acc" in s:
            return f"test acc {100 * s['test_acc']:.2f}%"
        if "rel_error" in s:
            return f"grad rel error {s['rel_error']:.3g}"
        if "slopes" in s:
            return f"{len(s['slopes'])} slopes"
        if "per_depth" in s:
            return f"{len(s['per_depth'])} depths"
        return ""
    return "\n".join(["## All jobs", "",
                      table(["job", "task", "status", "result"],
                            [[f"`{j.name}`", j.task, j.status, result(j)] for j in jobs])])


SECTIONS = [section_train, section_gradcheck, section_memory, section_bench,
            section_discretization, section_linear, section_finetune]


# -------------------------------------------------------------------- task
def validate(cfg) -> None:
    if OmegaConf.is_missing(cfg, "dir") or cfg.dir in (None, ""):
        raise ConfigError("no sweep directory given: rode report <dir> (or dir=<path>)")
    path = Path(str(cfg.dir))
    if not path.is_dir():
        raise ConfigError(f"dir={str(cfg.dir)!r} is not a directory")


def run(cfg) -> dict:
    root = Path(str(cfg.dir))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = find_jobs(root)
    if not jobs:
        raise ConfigError(f"dir={str(root)!r} holds no job directories (no .hydra/ or result files)")
    figures: list[str] = []
    parts = [f"# Report: `{root}`", section_jobs(jobs)]
    for section in SECTIONS:
        try:
            parts.append(section(jobs, out, figures))
        except Exception as e:   # one odd job must not cost the rest of the report
            log.exception("report section %s failed", section.__name__)
            parts.append(f"**{section.__name__} failed:** `{type(e).__name__}: {e}`")
    parts = [p for p in parts if p]
    parts.append(section_all_jobs(jobs))
    (out / "report.md").write_text("\n\n".join(parts).rstrip() + "\n")

    counts = defaultdict(int)
    for j in jobs:
        counts[j.status] += 1
    summary = {"dir": str(root), "jobs": len(jobs), **counts, "figures": figures}
    print(f"rode report: {len(jobs)} jobs (" + ", ".join(f"{n} {s}" for s, n in
                                                        sorted(counts.items()))
          + f"), {len(figures)} figures -> {out / 'report.md'}")
    for j in jobs:
        if j.status != "completed":
            print(f"  {j.status}: {j.name} ({j.task}) {j.error}")
    return summary
