"""What the measurement hooks logged, in `rode report`: a figure and its CSV per hook.

Reads the hook records of each run's ``metrics.jsonl`` (lines with a ``hook`` field)
through the schema each hook declares (``Hook.record``: the per-layer field, the scalar
that follows training), so that the report and the hooks agree on one set of field
names. For every run and hook: a layer × step heatmap and the scalar over training
(``hook_<name><suffix>.png`` and ``.csv``, one row per step and layer). For a sweep,
each hook's runs compared at their last common step (``hook_<name>_compare.png``/.csv).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..io import read_jsonl, write_csv
from ..reporting import Job, factors, figure_suffixes, series_label, table
from . import HOOKS


def hook_records(job: Job) -> dict[str, list[dict]]:
    """hook name -> its records in this job's metrics.jsonl, in order (hooks with a schema)."""
    path = job.path / "metrics.jsonl"
    if not path.is_file():
        return {}
    try:
        lines = read_jsonl(path)
    except (OSError, json.JSONDecodeError):
        return {}
    found: dict[str, list[dict]] = {}
    for line in lines:
        name = line.get("hook")
        schema = getattr(HOOKS.get(name), "record", None)
        if schema is not None and isinstance(line.get(schema.per_layer), list):
            found.setdefault(name, []).append(line)
    return found


def _value(v) -> float:
    return float("nan") if v is None else float(v)


def run_rows(records: list[dict], schema) -> list[dict]:
    """The numbers behind a run's figure: one row per (step, layer)."""
    return [{"step": r["step"], "epoch": r.get("epoch"), "layer": n,
             schema.per_layer: _value(v), schema.scalar: _value(r.get(schema.scalar))}
            for r in records for n, v in enumerate(r[schema.per_layer])]


def report_section(jobs: list[Job], out: Path, figures: list[str]) -> str:
    """Markdown, figures and CSVs for the hook records of these jobs ('' when there are none)."""
    from ..plots import plot_hook_run  # matplotlib: only when a report is drawn

    have = [(j, recs) for j in jobs if (recs := hook_records(j))]
    if not have:
        return ""
    with_hooks = [j for j, _ in have]
    suffixes = dict(zip((j.path for j in with_hooks), figure_suffixes(with_hooks), strict=True))
    extra = factors(with_hooks)
    labels = {j.path: series_label(j, ["method", "grad"], extra).replace(" | ", ", ")
              + ("" if extra else f" N={j.config.get('depth', '?')}") for j in with_hooks}
    if len({*labels.values()}) < len(labels):
        labels = {j.path: f"{labels[j.path]} ({j.name})" for j in with_hooks}
    parts = ["## Measurement hooks (`rode train hooks=...`)", "",
             "Per-layer records of the hooks over training, from each run's metrics.jsonl; "
             "the CSV beside each figure holds its numbers."]
    for name, hook in HOOKS.items():
        schema = hook.record
        runs = [(j, recs[name]) for j, recs in have if name in recs]
        if schema is None or not runs:
            continue
        rows = []
        for j, recs in runs:
            base = f"hook_{name}{suffixes[j.path]}"
            steps = [r["step"] for r in recs]
            scalar = [_value(r.get(schema.scalar)) for r in recs]
            plot_hook_run(steps, [r[schema.per_layer] for r in recs], scalar, schema,
                          f"{name}: {labels[j.path]}", out / f"{base}.png")
            write_csv(run_rows(recs, schema), out / f"{base}.csv")
            figures.append(f"{base}.png")
            last = [v for v in recs[-1][schema.per_layer] if v is not None and math.isfinite(v)]
            rows.append([labels[j.path], steps[-1], scalar[-1],
                         min(last, default=math.nan), max(last, default=math.nan),
                         f"![{name}]({base}.png) ([csv]({base}.csv))"])
        parts += ["", f"### `{name}`: {schema.per_layer_label}", "",
                  table(["run", "last step", f"{schema.scalar} (last)",
                         f"min layer {schema.per_layer}", f"max layer {schema.per_layer}",
                         "figure"], rows)]
        if len(runs) > 1:
            parts += ["", _compare(name, schema, runs, labels, out, figures)]
    return "\n".join(parts)


def _compare(name, schema, runs, labels, out: Path, figures: list[str]) -> str:
    """The runs of a sweep at their last common step (their own last one if none is common)."""
    from ..plots import plot_hook_compare

    common = set.intersection(*({r["step"] for r in recs} for _, recs in runs))
    compared, rows = {}, []
    for j, recs in runs:
        at = [r for r in recs if r["step"] == max(common)] if common else recs[-1:]
        rec = at[-1]
        compared[labels[j.path]] = {
            "step": rec["step"], "layers": [_value(v) for v in rec[schema.per_layer]],
            "steps": [r["step"] for r in recs],
            "scalar": [_value(r.get(schema.scalar)) for r in recs]}
        rows += [{"run": labels[j.path], "job": j.name, "step": rec["step"], "layer": n,
                  "t": n / len(rec[schema.per_layer]), schema.per_layer: _value(v)}
                 for n, v in enumerate(rec[schema.per_layer])]
    base = f"hook_{name}_compare"
    plot_hook_compare(compared, schema, f"{name}: {schema.per_layer_label}, runs compared",
                      out / f"{base}.png")
    write_csv(rows, out / f"{base}.csv")
    figures.append(f"{base}.png")
    step = f"step {max(common)}" if common else "each run's last step"
    return "\n".join([f"Runs compared at {step}:", "",
                      f"![{name} compared]({base}.png) ([csv]({base}.csv))"])

