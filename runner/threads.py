"""How many CPU threads a rode process uses: ``threads: auto`` (the default).

torch's default is one intra-op thread per core of the machine. Next to any other
busy process (a second experiment, a sweep's other job), those threads spin
against each other and a run takes many times longer (docs/benchmarks.md,
"Threads"). ``auto`` takes instead:

1. ``OMP_NUM_THREADS`` when it is set (the user's choice, or a launcher's: joblib's
   workers get cores // n_jobs);
2. else the cores this process may use -- its CPU affinity (``taskset``, Slurm's
   cgroup cpuset) and its cgroup CPU quota (``cpu.max``, containers), not the
   machine's count -- divided among the jobs a launcher runs at once
   (``hydra/launcher=parallel``'s ``n_jobs``, or ``RODE_JOBS``);
3. one thread for a small MLP (width <= ``SMALL_WIDTH``), which one thread runs
   fastest: its matrix products are too small to split.

``threads=<k>`` forces k; ``threads=null`` leaves torch's default. Data-loader
workers follow the same budget (:func:`loader_workers`).

A ``hydra/launcher=parallel`` sweep's workers are forked from one server that imported
torch and the task once, with ``OMP_NUM_THREADS = cores // n_jobs`` in its environment
(:func:`preload_workers`; docs/scaling.md, "Parallel sweeps: where the time goes").
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import re
import signal
from pathlib import Path

log = logging.getLogger(__name__)

AUTO = "auto"
#: Jobs running at once on this machine, for launchers rode cannot see (set by hand).
JOBS_ENV = "RODE_JOBS"
#: A residual MLP at most this wide runs fastest on one thread (docs/benchmarks.md).
SMALL_WIDTH = 128
_CGROUP = Path("/sys/fs/cgroup")


def cgroup_quota(root: Path | None = None) -> float | None:
    """The CPU quota of this process's cgroup in cores (``cpu.max`` of cgroup v2, or
    ``cpu.cfs_quota_us / cpu.cfs_period_us`` of v1); None when there is none."""
    root = _CGROUP if root is None else root
    try:
        fields = (root / "cpu.max").read_text().split()
        if fields and fields[0] != "max":
            return int(fields[0]) / int(fields[1] if len(fields) > 1 else 100_000)
        return None
    except (OSError, ValueError, ZeroDivisionError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """The cores this process may use: its affinity, capped by its cgroup quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):   # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def _positive_int(text) -> int | None:
    try:
        value = int(str(text).strip())
    except (TypeError, ValueError):
        return None
    return value if value >= 1 else None


def concurrent_jobs(cores: int | None = None) -> int:
    """How many rode jobs share this machine's cores now: ``RODE_JOBS`` if set, else
    the ``n_jobs`` of a Hydra launcher that runs jobs side by side (joblib's
    ``hydra/launcher=parallel``; -1 means one per core), else 1."""
    jobs = _positive_int(os.environ.get(JOBS_ENV))
    if jobs:
        return jobs
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return 1
        hc = HydraConfig.get()
        n_jobs = hc.launcher.get("n_jobs") if hc.mode == RunMode.MULTIRUN else None
    except Exception:   # noqa: BLE001 - no Hydra, or a launcher without n_jobs
        return 1
    if n_jobs is None:
        return 1
    n_jobs = int(n_jobs)
    if n_jobs < 0:   # joblib: -1 is every core, -2 all but one, ...
        n_jobs = max(1, (cores or usable_cores()) + 1 + n_jobs)
    return max(1, n_jobs)


def budget() -> int:
    """This job's share of the cores: usable cores // concurrent jobs (at least 1)."""
    cores = usable_cores()
    return max(1, cores // concurrent_jobs(cores))


def small_model(cfg) -> bool:
    """A residual MLP no wider than SMALL_WIDTH (hidden width included)."""
    model = cfg.get("model") if hasattr(cfg, "get") else None
    if model is None or model.get("name") != "mlp":
        return False
    widths = [cfg.get("width"), model.get("hidden")]
    return all(w is None or int(w) <= SMALL_WIDTH for w in widths)


def choose(threads, *, small: bool = False) -> tuple[int | None, str]:
    """The thread count for a ``threads`` setting, and why (None: torch's default)."""
    if threads is None:
        return None, "threads=null: torch's default"
    if threads != AUTO:
        return int(threads), f"threads={int(threads)}"
    omp = _positive_int(os.environ.get("OMP_NUM_THREADS"))
    if omp:
        return omp, f"threads=auto: OMP_NUM_THREADS={omp}"
    if small:
        return 1, "threads=auto: a small MLP runs fastest on one thread"
    cores = usable_cores()
    jobs = concurrent_jobs(cores)
    n = max(1, cores // jobs)
    return n, f"threads=auto: {cores} usable cores / {jobs} concurrent jobs"


def apply(cfg) -> int:
    """Set torch's intra-op thread count from ``cfg.threads`` (and its model, for
    ``auto``); return the count in force."""
    import torch

    n, why = choose(cfg.get("threads"), small=small_model(cfg))
    if n is not None:
        torch.set_num_threads(n)
        log.info("%d torch threads (%s)", n, why)
    return torch.get_num_threads()


def loader_workers(cfg, dataset=None) -> int:
    """``dataset.num_workers``, held to this job's core budget when ``threads`` is
    auto (a worker is a process of its own; a run asking for more workers than it
    has cores only makes them wait). A run that asks for workers keeps at least
    one, so where the random augmentations are drawn does not change."""
    dataset = cfg.get("dataset") if dataset is None else dataset
    requested = int((dataset.get("num_workers", 0) if dataset is not None else 0) or 0)
    if requested <= 0 or cfg.get("threads") != AUTO:
        return max(0, requested)
    return max(1, min(requested, budget()))


# ------------------------------------------------------- parallel sweeps' workers
#: The launcher whose workers are forked from a preloaded server (conf/hydra/launcher/).
PARALLEL_LAUNCHER = "parallel"
#: RODE_FORKSERVER=0: the parallel launcher's workers start as loky starts them (each a
#: fresh interpreter that imports torch again).
FORKSERVER_ENV = "RODE_FORKSERVER"
#: What each worker of a parallel sweep would otherwise import again, on top of the task's
#: module: rode's command line (the pickled Hydra app lives there) and the launcher's job
#: function.
PRELOAD = ("runner.cli", "hydra_plugins.hydra_joblib_launcher._core")
#: What a task's jobs import when they run, beyond its module: torch._dynamo (torch's
#: optimizers import it when the first one is built, torch.utils.checkpoint when it first
#: checkpoints a segment: bench's checkpoint contender) and scikit-learn's datasets (dataset=digits, the
#: default of train, gradcheck and memory; finetune's comes from its checkpoint). A task
#: not listed (discretization, report) needs neither.
TASK_PRELOAD = {"runner.tasks.train": ("torch._dynamo", "sklearn.datasets"),
                "runner.tasks.finetune": ("torch._dynamo", "sklearn.datasets"),
                "runner.tasks.memory": ("torch._dynamo", "sklearn.datasets"),
                "runner.tasks.gradcheck": ("sklearn.datasets",),
                "runner.tasks.linear": ("torch._dynamo",),
                "runner.tasks.bench": ("torch._dynamo",)}
#: Datasets whose builder imports scikit-learn.
SKLEARN_DATASETS = ("digits",)
#: Thread variables a worker gets (as joblib gives its own loky workers) unless already set.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def launcher_jobs(overrides) -> int | None:
    """The ``n_jobs`` of ``hydra/launcher=parallel`` on this command line (``None``: another
    launcher, or none named); the launcher's default when no ``hydra.launcher.n_jobs`` is
    given."""
    values = dict(o.split("=", 1) for o in overrides if "=" in o)
    if values.get("hydra/launcher") != PARALLEL_LAUNCHER:
        return None
    jobs = values.get("hydra.launcher.n_jobs")
    if jobs is None:
        from importlib.resources import files

        from omegaconf import OmegaConf

        try:   # the launcher's own default (runner.conf: the repo's conf/)
            conf = files("runner.conf") / "hydra" / "launcher" / f"{PARALLEL_LAUNCHER}.yaml"
            jobs = OmegaConf.create(conf.read_text()).get("n_jobs", 2)
        except (OSError, ModuleNotFoundError):
            jobs = 2
    try:
        jobs = int(jobs)
    except (TypeError, ValueError):
        return None   # the pre-flight reports the bad value
    return max(1, usable_cores() + 1 + jobs) if jobs < 0 else max(1, jobs)


def preload_modules(task_module: str, overrides) -> list[str]:
    """What the workers' server imports for a sweep of ``task_module``: the module,
    :data:`PRELOAD`, and what the task's jobs import (:data:`TASK_PRELOAD`), less
    scikit-learn where every ``dataset=`` value on the command line is another dataset.
    (A module left out is only imported by each worker itself, as without the server.)"""
    extra = TASK_PRELOAD.get(task_module, ())
    values = [o.split("=", 1)[1] for o in overrides
              if "=" in o and o.split("=", 1)[0].lstrip("+~") == "dataset"]
    # dataset=synthetic, dataset=synthetic,text, dataset=choice(text,digits): the names in it
    if values and not any(name in SKLEARN_DATASETS
                          for v in values for name in re.findall(r"\w+", v)):
        extra = tuple(m for m in extra if not m.startswith("sklearn"))
    return [task_module, *PRELOAD, *extra]


def preload_workers(task_module: str, overrides) -> bool:
    """Before a ``hydra/launcher=parallel`` sweep: have loky fork the workers from one
    server process (multiprocessing's forkserver) that imports torch, ``task_module`` and
    what its jobs need (:func:`preload_modules`) once for the whole sweep. By default each
    loky worker is a fresh interpreter that imports them again: 5-10 s of CPU per worker,
    and on a loaded machine, where a sweep's processes share one share of the CPU, what
    made the parallel sweep slower than its jobs one after the other (docs/scaling.md).

    The server starts now, so that it imports while this process runs the pre-flight, with
    the thread variables joblib gives its workers (``cores // n_jobs``) unless they are
    set. Returns whether it started: only for ``hydra/launcher=parallel`` on the command
    line with ``n_jobs`` above 1, unless ``RODE_FORKSERVER=0``."""
    jobs = launcher_jobs(overrides)
    if jobs is None or jobs < 2 or os.environ.get(FORKSERVER_ENV, "1").strip() == "0":
        return False   # (n_jobs=1: joblib runs the jobs in this process)
    import multiprocessing
    from multiprocessing import forkserver

    try:
        from joblib.externals.loky.backend.context import set_start_method
    except ImportError:   # no launcher plugins: the pre-flight says so
        return False
    preload = preload_modules(task_module, overrides)
    multiprocessing.get_context("forkserver").set_forkserver_preload(preload)
    share = str(max(1, usable_cores() // jobs))
    saved = {var: os.environ.get(var) for var in THREAD_VARS}
    try:
        for var in THREAD_VARS:
            os.environ.setdefault(var, share)
        forkserver.ensure_running()
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
    set_start_method("forkserver", force=True)   # loky's workers: forked from that server
    atexit.register(stop_server)
    return True


def stop_server() -> None:
    """The forkserver goes with this process, at once, even while it is still importing
    (a sweep whose pre-flight failed): by default it would finish its imports first."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    pid = getattr(server, "_forkserver_pid", None)
    if pid is None:
        return
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(Exception):   # closes its pipe, reaps it
        server._stop()
