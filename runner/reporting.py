"""What `rode report` knows of a job, and the table helpers each task's report section uses.

A task whose declaration (``runner.tasks.TASKS``) says ``section=True`` defines
``report_section(jobs, out, figures) -> str`` (markdown; it draws its figures into ``out`` and appends their
file names to ``figures``); one that says ``result_line=True``, ``report_result(job) -> str`` (its
one-cell result in the table of all jobs). ``rode report`` passes each task its
own jobs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from . import io
from .io import read_csv

# Settings of how a job ran, not of what it measured: never a factor of a sweep.
RUN_CONTROL = {"resume", "threads", "progress", "device", "out_dir", "eval_batch_size"}
# ... nor these, which every section puts on an axis or in the label itself.
NOT_FACTORS = RUN_CONTROL | {"depth", "seed", "method", "grad", "checkpoint"}


@dataclass
class Job:
    path: Path
    name: str
    task: str
    status: str                      # completed | failed | unfinished
    error: str = ""
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)


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


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def flatten(d: dict) -> dict:
    """A job's config as dotted keys, lists as JSON text (so that values are hashable)."""
    return io.flatten(d, lists_as_json=True)


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
    keys = factors(jobs, exclude=RUN_CONTROL)
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


def table_jobs(jobs: list[Job], filename: str) -> list[tuple[Job, list[dict]]]:
    """(job, its rows of ``filename``) for the completed jobs that wrote that file."""
    return [(j, read_csv(j.path / filename)) for j in jobs
            if j.status == "completed" and (j.path / filename).is_file()]
