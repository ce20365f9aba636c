"""Run dirs: where a run's results live, and the rule that no run overwrites another's.

Torch-free, so the command line can refuse a bad dir before torch loads.
"""
from __future__ import annotations

from pathlib import Path

from .errors import ConfigError
from .io import read_json, write_json

CHECKPOINT = "checkpoint.pt"
# Files whose presence means a dir holds a run's results: every task's, and the partial
# ones written while a task runs (bench.csv grows after each depth).
RESULTS = ("summary.json", CHECKPOINT, "metrics.jsonl", "bench.csv", "bench.json",
           "memory.csv", "grad_error.csv", "discretization.csv", "slopes.csv",
           "linear_metrics.csv")
# What `rode train resume=<dir>` may change: the rest is the checkpoint's config.
RESUME_KEYS = ("device", "progress", "threads", "save")


def locate(value, key: str = "checkpoint") -> Path:
    """A run dir (holding checkpoint.pt) or a checkpoint file -> the file; ConfigError if absent."""
    if value is None or not str(value).strip():
        raise ConfigError(f"{key} is empty; give a run dir holding {CHECKPOINT}, or the checkpoint file")
    path = Path(str(value)).expanduser()
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        where = f"{value}/{CHECKPOINT}" if Path(str(value)).expanduser().is_dir() else str(value)
        raise ConfigError(f"{key}={value}: {where} does not exist (give a run dir holding "
                          f"{CHECKPOINT}, or the checkpoint file)")
    return path


def results_in(path: Path, depth: int = 0) -> Path | None:
    """The first result file in ``path`` (and, with ``depth``, in its subdirs), or None."""
    path = Path(path)
    if not path.is_dir():
        return None
    for name in RESULTS:
        if (path / name).is_file():
            return path / name
    if depth > 0:
        for child in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
            found = results_in(child, depth - 1)
            if found is not None:
                return found
    return None


def finished(run_dir) -> bool:
    """Whether the run in ``run_dir`` is over: its summary says completed (every epoch
    done, or stopped early by its monitor)."""
    try:
        return read_json(Path(str(run_dir)) / "summary.json").get("status") == "completed"
    except (OSError, ValueError, AttributeError):
        return False


def check_fresh(path, key: str, sweep: bool, auto: bool = False, task: str | None = None) -> None:
    """ConfigError if ``path`` already holds a run's results (a sweep dir: in any job dir).
    ``auto`` (resume=auto): a dir holding a checkpoint passes (that its config is the
    command's is checked when the checkpoint is read), and so does one holding no
    summary (a run killed before its first checkpoint starts again). The refusal
    suggests what ``task`` accepts: ``resume=`` only where its schema has it."""
    found = results_in(Path(str(path)).expanduser(), depth=3 if sweep else 0)
    if found is None:
        return
    if auto and (sweep or (found.parent / CHECKPOINT).is_file()
                 or not (found.parent / "summary.json").is_file()):
        return
    raise ConfigError(f"{key}={path} already holds "
                      f"{'the jobs of an earlier sweep' if sweep else 'a run'} "
                      f"({found.name} in {found.parent}); {fresh_hint(task, key, path, sweep)}")


def fresh_hint(task: str | None, key: str, path, sweep: bool = False) -> str:
    """What to do instead of overwriting a run in ``path`` (given as ``key``): another
    dir, or, for a task that can continue a run (its schema has ``resume``), that."""
    from .schema import has_key

    if task is None or not has_key(task, "resume"):
        return f"nothing was overwritten: choose another {key}"
    where = "<job dir>" if sweep else path
    return (f"continue {'each job' if sweep else 'it'} with rode {task} resume={where}, "
            f"or choose another {key}")


def os_error_cause(e: OSError) -> str:
    """What went wrong, in the system's words: 'no space left on device'."""
    return (e.strerror or str(e) or type(e).__name__).lower()


def os_error_message(e: OSError) -> str:
    """One line for a failed file operation: the cause, then the file, e.g.
    'no space left on device: report.md (in <dir>)' (a temporary file of an atomic
    write is named by its target)."""
    cause = os_error_cause(e)
    if not e.filename:
        return cause
    name = Path(str(e.filename)).name
    if name.startswith(".") and name.endswith(".tmp") and name.count(".") >= 3:
        name = name[1:].rsplit(".", 2)[0]          # .report.md.<pid>.tmp -> report.md
    return f"{cause}: {name} (in {Path(str(e.filename)).parent})"


def write_failed_summary(out_dir, message: str, **details) -> None:
    """summary.json with status failed (and ``details``), where it can be written and no
    finished run's is."""
    path = Path(str(out_dir)) / "summary.json"
    try:
        if path.is_file() and read_json(path).get("status") == "completed":
            return
        write_json({"status": "failed", "error": message, **details}, path)
    except (OSError, ValueError, AttributeError):
        pass


def unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def prepare_resume(overrides: list[str], multirun: bool) -> list[str]:
    """``resume=<run dir>`` on the command line, before Hydra sees it.

    The dir is quoted when it holds '=' or ',' (a sweep's job dir); only RESUME_KEYS
    may be set beside it; the run's own dir becomes Hydra's output dir and no new
    .hydra/ is written there, so its original config stays."""
    values = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in overrides if "=" in o}
    resume = values.get("resume")
    if resume is None or resume == "null" or unquote(resume) == "auto":
        return overrides   # auto: the whole command line, re-run (checked against the run's)
    if not unquote(resume).strip():
        raise ConfigError("resume is empty; give the run dir (or checkpoint.pt) to continue, "
                          "or leave resume out to start a new run")
    if Path(unquote(resume)).exists() and unquote(resume) == resume:
        overrides = [f"resume='{resume}'" if o == f"resume={resume}" else o for o in overrides]
    other = [k for k in values if k != "resume" and k.split(".")[0] not in RESUME_KEYS
             and not k.lstrip("+~").startswith("hydra")]
    if other:
        raise ConfigError(f"resume= continues a run with its own config; only "
                          f"{', '.join(RESUME_KEYS)} can be set with it (got {other[0]}=...)")
    if multirun or "hydra.run.dir" in values:
        return overrides
    run_dir = locate(unquote(resume), "resume").parent
    return [*overrides, f"hydra.run.dir='{run_dir}'", "hydra.output_subdir=null"]
