"""Result files: atomic writes, reads, and the small computations every task's
output shares (log-log slopes, byte sizes, configs as plain data).

A file is written to a temporary file beside its target, flushed to disk, then
renamed over it (rename is atomic on POSIX): a reader, or a run killed at any
moment, sees the previous file or the new one, never half of one.

Every result file (JSON, CSV, text, metrics.jsonl lines, checkpoints, figures) is
written through :func:`atomic_open` or :func:`append_jsonl`, so that a failed write
(a full disk, a quota, a read-only or lost mount) always names its file.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
from pathlib import Path
from typing import IO, Iterable, Iterator

from omegaconf import OmegaConf


# ------------------------------------------------------------------- write
@contextlib.contextmanager
def naming(path) -> Iterator[None]:
    """An OSError raised within the block names ``path`` if it names no file: a failed
    ``write``, ``flush`` or ``fsync`` (ENOSPC, EDQUOT, EIO) carries no file name, and
    would say only 'no space left on device'."""
    try:
        yield
    except OSError as e:
        if not e.filename:
            if e.errno is None:        # OSError("message"): keep the message, add the file
                e.args = (f"{e}: {path}",)
            else:
                e.filename = str(path)
        raise


@contextlib.contextmanager
def atomic_open(path, mode: str = "w", **kwargs) -> Iterator[IO]:
    """``open`` for writing that replaces ``path`` only once the block has finished."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with naming(path), open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        with naming(path):
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(text: str, path) -> None:
    with atomic_open(path) as f:
        f.write(text)


def write_json(obj, path) -> None:
    write_text(json.dumps(obj, indent=2) + "\n", path)


def write_csv(rows: Iterable[dict], path, fields: list[str] | None = None,
              float_format: str | None = None) -> None:
    """One row per dict, columns ``fields`` (default: the keys of the rows, in order
    of appearance); other keys are left out. ``float_format`` (e.g. ``".6g"``)
    formats the float values."""
    rows = list(rows)
    if fields is None:
        fields = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_open(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: format(v, float_format) if float_format and isinstance(v, float)
                             else v for k, v in r.items()})


def append_jsonl(record: dict, path) -> None:
    """Append one JSON line (the file is closed, hence flushed, at once)."""
    line = json.dumps(record) + "\n"
    with naming(path), open(path, "a") as f:
        f.write(line)


# -------------------------------------------------------------------- read
def read_json(path):
    return json.loads(Path(path).read_text())


def read_jsonl(path) -> list:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------- values
def fit_slope(depths, errors) -> float:
    """Least-squares slope of log(error) against log(depth), over the points with
    both positive and finite (NaN when fewer than two distinct depths remain)."""
    pts = [(math.log(d), math.log(e)) for d, e in zip(depths, errors, strict=True)
           if d > 0 and e > 0 and math.isfinite(d) and math.isfinite(e)]
    if len({x for x, _ in pts}) < 2:
        return float("nan")
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    return (sum((x - mx) * (y - my) for x, y in pts)
            / sum((x - mx) ** 2 for x, _ in pts))


def format_size(nbytes) -> str:
    """Bytes, human-readable (1024-based); '–' when not a number."""
    try:
        v = float(nbytes)
    except (TypeError, ValueError):
        v = math.nan
    if math.isnan(v):
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(v) < 1024 or unit == "GiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024


def plain(cfg, exclude: Iterable[str] = ()):
    """A config (or any value) as plain Python data, interpolations resolved; the
    top-level keys in ``exclude`` are left out (and never resolved)."""
    if not OmegaConf.is_config(cfg):
        return cfg
    exclude = set(exclude)
    if OmegaConf.is_dict(cfg) and exclude:
        return {k: plain(cfg[k]) for k in cfg if k not in exclude}
    return OmegaConf.to_container(cfg, resolve=True)


def flatten(d: dict, prefix: str = "", lists_as_json: bool = False) -> dict:
    """A nested dict as one level of dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``);
    ``lists_as_json``: list values as JSON text (one hashable value per key)."""
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + ".", lists_as_json))
        else:
            out[key] = json.dumps(v) if lists_as_json and isinstance(v, list) else v
    return out
