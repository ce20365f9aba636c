"""Sweeps beyond one process: joblib, submitit (local stand-in for SLURM), SLURM's config.
One job failing in a sweep loses none of the other jobs' outputs; the report lists it."""
import json
import subprocess
import sys

import pytest

from conftest import compose_config, validate_job

# lr=1e8 diverges at once (exit 1 for that job); lr=0.01 trains.
# The whole training set trains (no validation split): the trained job is above chance.
SWEEP = ["-m", "train", "depth=4", "width=16", "epochs=1", "optimizer=sgd", "lr=0.01,1e8",
         "dataset.val_fraction=0", "monitor=train_loss", "progress=false", "device=cpu"]


def run_sweep(tmp_path, launcher: list[str]):
    sweep = tmp_path / "sweep"
    out = subprocess.run([sys.executable, "-m", "runner", *SWEEP, *launcher,
                          f"hydra.sweep.dir={sweep}"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    return sweep, out


def check_failure_is_isolated(tmp_path, sweep, out):
    assert out.returncode == 1, out.stderr[-3000:]
    assert "loss became" in out.stderr.strip().splitlines()[-1]
    summaries = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/summary.json")}
    good = [s for name, s in summaries.items() if "lr=0.01" in name]
    bad = [s for name, s in summaries.items() if "lr=0.01" not in name]
    assert len(summaries) == 2 and len(good) == len(bad) == 1, summaries.keys()
    assert good[0]["status"] == "completed" and good[0]["test_acc"] > 0.5
    assert bad[0]["status"] == "failed"
    good_dir = next(p for p in sweep.iterdir() if "lr=0.01" in p.name)
    assert (good_dir / "checkpoint.pt").is_file() and (good_dir / "metrics.jsonl").is_file()

    from runner.tasks import load_task

    report = load_task("report")
    cfg = compose_config("report", [f"dir={sweep}"], tmp_path / "report")
    validate_job("report", cfg)
    report.run(cfg)
    text = (tmp_path / "report" / "report.md").read_text()
    bad_dir = next(p.name for p in sweep.iterdir() if p.is_dir() and "lr=0.01" not in p.name
                   and not p.name.startswith("."))
    assert [line for line in text.splitlines() if bad_dir in line and "| failed |" in line], text[-2000:]


@pytest.mark.slow
def test_submitit_local_sweep_keeps_other_jobs_when_one_fails(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="hydra-submitit-launcher not installed (pip install '.[cluster]')")
    sweep, out = run_sweep(tmp_path, ["hydra/launcher=submitit_local"])
    check_failure_is_isolated(tmp_path, sweep, out)
    assert (sweep / ".submitit").is_dir()      # it went through submitit's executor


@pytest.mark.slow
def test_joblib_sweep_keeps_other_jobs_when_one_fails(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher",
                        reason="hydra-joblib-launcher not installed (pip install '.[cluster]')")
    sweep, out = run_sweep(tmp_path, ["hydra/launcher=parallel"])
    assert "Joblib.Parallel(n_jobs=2" in out.stdout + out.stderr
    check_failure_is_isolated(tmp_path, sweep, out)


def test_slurm_config_takes_partition_time_and_gpus_from_overrides(tmp_path, monkeypatch):
    """The sbatch script our SLURM config produces, without a cluster (srun is faked)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="hydra-submitit-launcher not installed (pip install '.[cluster]')")
    import submitit
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    with initialize_config_module("runner.conf", version_base="1.3"):
        cfg = compose("train", return_hydra_config=True, overrides=[
            "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
            "hydra.launcher.timeout_min=600", "hydra.launcher.gpus_per_node=4",
            "hydra.launcher.tasks_per_node=4", "hydra.launcher.nodes=2",
            f"hydra.sweep.dir={tmp_path}"])
        params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    GlobalHydra.instance().clear()
    assert params["_target_"].endswith("SlurmLauncher")

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{__import__('os').environ['PATH']}")
    # What the launcher does with its config (hydra_submitit_launcher.BaseSubmititLauncher.launch).
    executor = submitit.AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()
                                  if k not in ("_target_", "max_num_timeout")})
    sbatch = executor._executor._make_submission_file_text("rode train", "0")
    for line in ["#SBATCH --partition=gpu", "#SBATCH --time=600", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --ntasks-per-node=4", "#SBATCH --nodes=2", "#SBATCH --job-name=train"]:
        assert line in sbatch, sbatch


def test_ddp_environment_comes_from_submitit_tasks(monkeypatch):
    from runner import distributed

    for var in ("WORLD_SIZE", "RANK", "SUBMITIT_EXECUTOR", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.env_world_size() == 1
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert distributed.env_world_size() == 1          # SLURM alone: not our job's tasks
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    assert distributed.env_world_size() == 8
    monkeypatch.setenv("WORLD_SIZE", "2")             # torchrun's word wins
    assert distributed.env_world_size() == 2
