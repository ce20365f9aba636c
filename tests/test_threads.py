"""threads: auto -- the cores this process may use (affinity, cgroup quota), divided among the
jobs a launcher runs at once, one thread for a small MLP; OMP_NUM_THREADS honored; threads=k wins."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import compose_config
from runner import threads
from runner.tasks import TASKS


@pytest.fixture
def bare(monkeypatch):
    """No OMP_NUM_THREADS (the test suite sets it), no RODE_JOBS, no cgroup quota, 6 usable cores."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(threads.JOBS_ENV, raising=False)
    monkeypatch.setattr(threads, "_CGROUP", Path("/nonexistent-cgroup"))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)


def test_auto_takes_the_affinity_not_the_machine(bare, monkeypatch):
    assert threads.choose("auto")[0] == 6
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2, 5})   # e.g. taskset -c 2,5
    assert threads.choose("auto")[0] == 2


def test_auto_takes_the_cgroup_quota(bare, monkeypatch, tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")   # 1.5 cores (cgroup v2)
    assert threads.cgroup_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_quota(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.cgroup_quota(v1) == 3
    monkeypatch.setattr(threads, "cgroup_quota", lambda root=None: 1.5)
    assert threads.usable_cores() == 2 and threads.choose("auto")[0] == 2


def _with_launcher(monkeypatch, tmp_path, overrides):
    """HydraConfig as a launcher sets it in each job (the same object the job reads)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    with initialize_config_module("runner.conf", version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"out_dir={tmp_path}"],
                      return_hydra_config=True)
    GlobalHydra.instance().clear()
    from omegaconf import open_dict
    with open_dict(cfg):
        cfg.hydra.mode = "MULTIRUN"
    HydraConfig.instance().set_config(cfg)


def test_the_launchers_job_count_divides_the_cores(bare, monkeypatch, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    from hydra.core.hydra_config import HydraConfig

    try:
        _with_launcher(monkeypatch, tmp_path, ["hydra/launcher=parallel"])   # n_jobs: 2
        assert threads.concurrent_jobs() == 2
        assert threads.choose("auto") == (3, "threads=auto: 6 usable cores / 2 concurrent jobs")
        _with_launcher(monkeypatch, tmp_path, ["hydra/launcher=parallel",
                                               "hydra.launcher.n_jobs=4"])
        assert threads.choose("auto")[0] == 1           # 6 // 4
        _with_launcher(monkeypatch, tmp_path, ["hydra/launcher=parallel",
                                               "hydra.launcher.n_jobs=-1"])   # one per core
        assert threads.concurrent_jobs() == 6 and threads.choose("auto")[0] == 1
    finally:
        HydraConfig.instance().cfg = None
    monkeypatch.setenv(threads.JOBS_ENV, "3")          # by hand, for launchers rode cannot see
    assert threads.choose("auto")[0] == 2


def test_omp_num_threads_and_small_models(bare, monkeypatch, tmp_path):
    small = compose_config("train", [], tmp_path)                   # the default: width 64 MLP
    wide = compose_config("train", ["width=512"], tmp_path)
    assert threads.small_model(small) and not threads.small_model(wide)
    assert threads.choose("auto", small=True)[0] == 1
    assert threads.choose("auto", small=False)[0] == 6
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert threads.choose("auto", small=True)[0] == 4
    assert threads.choose(None) == (None, "threads=null: torch's default")


def test_threads_k_overrides_everything(bare, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    monkeypatch.setenv(threads.JOBS_ENV, "2")
    assert threads.choose(5, small=True)[0] == 5


def test_loader_workers_follow_the_budget(bare, monkeypatch, tmp_path):
    cfg = compose_config("train", ["dataset=cifar10"], tmp_path)        # num_workers: 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert threads.loader_workers(cfg) == 2
    monkeypatch.setenv(threads.JOBS_ENV, "2")
    assert threads.loader_workers(cfg) == 1      # never 0: augmentations stay in the workers
    cfg.threads = 3
    assert threads.loader_workers(cfg) == 4      # threads set by hand: workers as asked


def test_the_cli_applies_it(bare, rode_cli, tmp_path):
    """`rode <task>` sets the threads its config chooses (gradcheck: the quickest task)."""
    run = tmp_path / "run"
    r = rode_cli("gradcheck", "depth=2", "width=8", "device=cpu", f"hydra.run.dir={run}")
    assert r.code == 0, r.err
    log = (run / "gradcheck.log").read_text()
    assert "1 torch threads (threads=auto: a small MLP runs fastest on one thread)" in log


def test_threads_k_is_set(bare, tmp_path):
    import torch
    before = torch.get_num_threads()
    try:
        cfg = compose_config("train", ["threads=3"], tmp_path)
        assert threads.apply(cfg) == 3 == torch.get_num_threads()
        cfg = compose_config("train", ["threads=null"], tmp_path)
        torch.set_num_threads(2)
        assert threads.apply(cfg) == 2          # null: left as it is
    finally:
        torch.set_num_threads(before)


def test_bad_threads_is_one_line(rode_cli, tmp_path):
    r = rode_cli("train", "threads=many", f"hydra.run.dir={tmp_path / 'run'}")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1
    assert "threads='many'" in r.err and "auto or an integer" in r.err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_parallel_sweep_jobs_share_the_cores(tmp_path):
    """A real two-job hydra/launcher=parallel sweep: each job takes its share of the cores."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", threads.JOBS_ENV)}
    out = subprocess.run([sys.executable, "-m", "runner", "-m", "train", "depth=2", "width=256",
                          "epochs=1", "progress=false", "device=cpu",
                          "seed=0,1", "hydra/launcher=parallel", f"hydra.sweep.dir={sweep}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    share = max(1, threads.usable_cores() // 2)
    logs = [p.read_text() for p in sweep.glob("*/train.log")]
    assert len(logs) == 2
    assert all(f"{share} torch threads (threads=auto" in text for text in logs), logs


def test_the_parallel_launchers_job_count_is_read_from_the_command_line(bare):
    assert threads.launcher_jobs(["seed=0,1", "hydra/launcher=parallel"]) == 2   # parallel.yaml
    assert threads.launcher_jobs(["hydra/launcher=parallel", "hydra.launcher.n_jobs=4"]) == 4
    assert threads.launcher_jobs(["hydra/launcher=parallel", "hydra.launcher.n_jobs=-1"]) == 6
    assert threads.launcher_jobs(["hydra/launcher=parallel", "hydra.launcher.n_jobs=x"]) is None
    assert threads.launcher_jobs(["hydra/launcher=local"]) is None
    assert threads.launcher_jobs(["seed=0,1"]) is None


# A parallel job that imports nothing: its parent process, whether the preloaded module was
# there before it, and its thread variable (eval: pickled by reference, unlike a test function
# whose module would import torch in the worker).
WHERE = ("(__import__('os').getppid(), 'colorsys' in __import__('sys').modules, "
         "__import__('os').environ.get('OMP_NUM_THREADS'))")


def test_parallel_workers_are_forked_from_one_preloaded_server(bare, monkeypatch):
    """hydra/launcher=parallel: loky's workers come from the forkserver started before the
    sweep, which imported the task's module (so a worker imports nothing again) with the
    thread variables of the jobs' share of the cores; the command's own environment stays
    as it was. Not for other launchers, nor one job at a time, nor with RODE_FORKSERVER=0."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    from multiprocessing import forkserver

    from joblib import Parallel, delayed
    from joblib.externals.loky import get_reusable_executor
    from joblib.externals.loky.backend import context

    assert not threads.preload_workers("json", ["hydra/launcher=local"])
    assert not threads.preload_workers("json", ["hydra/launcher=parallel", "hydra.launcher.n_jobs=1"])
    monkeypatch.setenv(threads.FORKSERVER_ENV, "0")
    assert not threads.preload_workers("json", ["hydra/launcher=parallel"])
    monkeypatch.delenv(threads.FORKSERVER_ENV)
    assert context.get_start_method() in (None, "loky")

    monkeypatch.setattr(threads, "PRELOAD", ())        # the test's task module: colorsys
    forkserver._forkserver._stop()                      # a server of another test: gone
    try:
        assert threads.preload_workers("colorsys", ["hydra/launcher=parallel"])
        assert "OMP_NUM_THREADS" not in os.environ      # only the server's: 6 cores // 2 jobs
        server = forkserver._forkserver._forkserver_pid
        results = Parallel(n_jobs=2, backend="loky")(delayed(eval)(WHERE) for _ in range(2))
        assert results == [(server, True, "3")] * 2, (server, results)
    finally:
        get_reusable_executor().shutdown(wait=True)
        context.set_start_method(None, force=True)
        threads.stop_server()


def test_a_parallel_sweep_starts_the_server_before_its_pre_flight(bare, rode_cli, tmp_path):
    """`rode -m ... hydra/launcher=parallel` starts the workers' server first (it imports
    while the pre-flight runs); bad input is still one line, exit 2, nothing written."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    from multiprocessing import forkserver

    from joblib.externals.loky.backend import context

    forkserver._forkserver._stop()
    try:
        r = rode_cli("-m", "train", "seed=0,1", "threads=many", "hydra/launcher=parallel",
                     f"hydra.sweep.dir={tmp_path / 'sweep'}")
        assert r.code == 2 and len(r.err.strip().splitlines()) == 1, r.err
        assert "threads='many'" in r.err and not (tmp_path / "sweep").exists()
        assert forkserver._forkserver._forkserver_pid is not None
        assert context.get_start_method() == "forkserver"
    finally:
        context.set_start_method(None, force=True)
        threads.stop_server()
    assert forkserver._forkserver._forkserver_pid is None


def test_the_workers_server_preloads_only_what_the_task_imports():
    """torch._dynamo (an optimizer is built) and scikit-learn (dataset=digits) only for the
    tasks whose jobs import them; scikit-learn not when the command line names only other
    datasets."""
    base = ["runner.cli", "hydra_plugins.hydra_joblib_launcher._core"]
    both = ["torch._dynamo", "sklearn.datasets"]
    assert threads.preload_modules("runner.tasks.train", ["depth=2,4"]) == \
        ["runner.tasks.train", *base, *both]
    assert threads.preload_modules("runner.tasks.train", ["dataset=synthetic", "seed=0,1"]) == \
        ["runner.tasks.train", *base, "torch._dynamo"]
    for digits in ("dataset=synthetic,digits", "dataset=choice(text,digits)", "+dataset=digits"):
        assert "sklearn.datasets" in threads.preload_modules("runner.tasks.memory", [digits])
    assert threads.preload_modules("runner.tasks.gradcheck", []) == \
        ["runner.tasks.gradcheck", *base, "sklearn.datasets"]
    assert threads.preload_modules("runner.tasks.linear", []) == \
        ["runner.tasks.linear", *base, "torch._dynamo"]
    assert threads.preload_modules("runner.tasks.bench", []) == \
        ["runner.tasks.bench", *base, "torch._dynamo"]
    for task in ("discretization", "report"):
        assert threads.preload_modules(f"runner.tasks.{task}", []) == [f"runner.tasks.{task}", *base]
    assert set(threads.TASK_PRELOAD) <= {t.module for t in TASKS.values()}
