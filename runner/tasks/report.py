"""rode report <dir>: markdown tables and PNG figures from the job dirs of a sweep.

``dir`` is a multirun directory (outputs/multirun/<time>/, one job dir per
combination of overrides), a single run directory, or any folder of them. Every
directory holding ``.hydra/`` or a result file is a job; its task comes from
Hydra's record of it (or from the files it wrote). A job without a summary
(``summary.json``) is listed as unfinished, one whose summary says ``status:
failed`` as failed: neither is dropped silently.

Each task that has jobs here adds its own section, tables and figures (its
module's ``report_section``, see :mod:`runner.reporting`), in the order of the
task registry. Writes ``report.md`` and the figures into ``out_dir`` (by default
the sweep directory itself).
"""
from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from pathlib import Path

import yaml

from ..errors import ConfigError
from ..io import read_json, read_jsonl, write_text
from ..reporting import Job, table
from . import TASKS, load_task

log = logging.getLogger("rode")

# Result files -> the task that writes them (used when Hydra's record is missing), from
# each task's declaration; metrics.jsonl (which other tasks' hooks append to) is tried last.
RESULT_FILES = dict(sorted(((f, name) for name, t in TASKS.items() for f in t.results),
                           key=lambda pair: pair[0] == "metrics.jsonl"))
# summary.json; bench.json is what rode bench wrote before it wrote summary.json.
SUMMARY_FILES = ("summary.json", "bench.json")


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


def natural(text: str) -> list:
    """Sort key that puts depth=4 before depth=16."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


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
                summary = read_json(path / f)
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
        events = read_jsonl(path / "metrics.jsonl")
    except (OSError, json.JSONDecodeError):
        return ""
    last = events[-1] if events else {}
    if last.get("event") == "interrupted":
        return (f"interrupted by {last.get('signal', 'a signal')} at epoch {last.get('epoch')}, "
                f"step {last.get('step')}; continue with: rode train resume={path}")
    return ""


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


def task_sections(jobs: list[Job], modules: dict, out: Path, figures: list[str]) -> list[str]:
    """Each task's own section over its jobs, in the order of the task registry."""
    parts = []
    for task, module in modules.items():
        if not TASKS[task].section:
            continue
        section = module.report_section
        try:
            parts.append(section([j for j in jobs if j.task == task], out, figures))
        except Exception as e:   # one odd job must not cost the rest of the report
            log.exception("report section of %s failed", task)
            parts.append(f"**report section of {task} failed:** `{type(e).__name__}: {e}`")
    return parts


def section_all_jobs(jobs: list[Job], modules: dict) -> str:
    def result(j: Job) -> str:
        if j.task not in modules or not TASKS[j.task].result_line:
            return ""
        return modules[j.task].report_result(j)
    return "\n".join(["## All jobs", "",
                      table(["job", "task", "status", "result"],
                            [[f"`{j.name}`", j.task, j.status, result(j)] for j in jobs])])


def task_modules(jobs: list[Job]) -> dict:
    """The modules of the tasks these jobs ran, in the order of the task registry."""
    present = {j.task for j in jobs}
    return {name: load_task(name) for name in TASKS if name in present}


# -------------------------------------------------------------------- task
def validate(cfg) -> None:
    path = Path(str(cfg.dir))
    if not path.is_dir():
        raise ConfigError(f"dir={str(cfg.dir)!r} is not a directory")
    if not has_jobs(path):   # before Hydra's log or report.md: nothing is written
        raise ConfigError(_no_jobs(path))


def has_jobs(root: Path) -> bool:
    """Whether root holds a job dir (found as :func:`find_jobs` finds them), without
    reading any of them."""
    return is_job_dir(root) or any(
        p.is_dir() and is_job_dir(p)
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        for p in root.rglob("*"))


def _no_jobs(root: Path) -> str:
    return (f"dir={str(root)!r} holds no job directories (no .hydra/ or result files); "
            f"nothing to report, nothing written")


def run(cfg) -> dict:
    root = Path(str(cfg.dir))
    out = Path(cfg.out_dir)
    jobs = find_jobs(root)
    if not jobs:
        raise ConfigError(_no_jobs(root))
    out.mkdir(parents=True, exist_ok=True)
    figures: list[str] = []
    modules = task_modules(jobs)
    parts = [f"# Report: `{root}`", section_jobs(jobs),
             *task_sections(jobs, modules, out, figures)]
    parts = [p for p in parts if p]
    parts.append(section_all_jobs(jobs, modules))
    write_text("\n\n".join(parts).rstrip() + "\n", out / "report.md")

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
