"""Nothing overwrites a finished result, by any route.

Each route a user can take to start a task in a dir that already holds results
(Hydra's own flags, out_dir=, a sweep re-run, a resume pointed elsewhere, a task's
partial results, an early-stopped run) goes through the real entry point
(runner.cli.main, in process) and must leave every earlier file byte for byte.
"""
import hashlib
import shutil

import pytest

from conftest import ROOT, compose_config

CONF = str(ROOT / "conf")
# A finished run: one epoch on 200 synthetic examples, no validation split.
RUN = ["dataset=synthetic", "dataset.num_samples=200", "dataset.val_fraction=0",
       "monitor=train_loss", "depth=2", "width=8", "epochs=1", "progress=false", "device=cpu"]
# An early-stopped run: the learning rate too small to change the validation loss,
# patience 1: it stops after epoch 2 of 4, status completed.
EARLY = ["dataset=synthetic", "dataset.num_samples=200", "dataset.val_fraction=0.2",
         "monitor=val_loss", "early_stopping.patience=1", "lr=1e-12", "depth=2", "width=8",
         "epochs=4", "progress=false", "device=cpu"]


def digest(root):
    """Every file under ``root`` (.hydra/ included) -> its sha256."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from runner.engine import train
    from runner.io import read_json

    root = tmp_path_factory.mktemp("runs")
    train(compose_config("train", RUN, root / "run"))
    train(compose_config("train", EARLY, root / "early"))
    assert read_json(root / "early" / "summary.json")["stopped_early"]
    # a finished sweep: two job dirs, each a finished run
    for job in ("depth=2", "depth=3"):
        shutil.copytree(root / "run", root / "sweep" / job)
    shutil.copytree(root / "run", root / "other")
    # an interrupted bench: its rows so far, no summary
    from runner.io import write_csv
    from runner.tasks.bench import COLUMNS

    (root / "bench").mkdir()
    write_csv([{c: 1 for c in COLUMNS}], root / "bench" / "bench.csv", COLUMNS)
    return root


@pytest.fixture
def tripwire(monkeypatch):
    """A task that starts despite the checks fails the test at once (instead of running)."""
    from runner.tasks import load_task

    def install(task):
        def ran(cfg):
            raise AssertionError(f"rode {task} ran: the checks let it through")
        monkeypatch.setattr(load_task(task), "run", ran)
    return install


def refused(r, *words):
    lines = r.err.strip().splitlines()
    assert r.code == 2 and len(lines) == 1, f"exit {r.code}:\n{r.err[-2000:]}"
    for word in words:
        assert word in lines[0], lines[0]


# Hydra's flags, as users type them: none may skip the checks.
FLAGS = [[], ["--run"], ["-r"], ["--config-dir", CONF], [f"-cd={CONF}"],
         ["--config-name", "train"], ["-cn=train"], ["--config-path", CONF],
         ["hydra.mode=RUN"], ["-r", "--config-dir", CONF, "--config-name=train"]]


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: " ".join(f) or "plain")
def test_hydra_flags_do_not_skip_the_never_overwrite_rule(flags, runs, rode_cli, tripwire,
                                                          tmp_path):
    tripwire("train")
    before = digest(runs)
    r = rode_cli("train", "depth=8", *flags, f"hydra.run.dir={runs / 'run'}")
    refused(r, "hydra.run.dir", "already holds a run")
    assert digest(runs) == before
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("flags", [["-m"], ["--multirun", "--config-dir", CONF],
                                   ["hydra.mode=MULTIRUN"], ["-r", "hydra.mode=MULTIRUN"]],
                         ids=" ".join)
def test_a_sweep_rerun_is_refused_by_every_route(flags, runs, rode_cli, tripwire):
    tripwire("train")
    before = digest(runs)
    r = rode_cli("train", *flags, "depth=2,3", f"hydra.sweep.dir={runs / 'sweep'}")
    refused(r, "hydra.sweep.dir", "earlier sweep")
    assert digest(runs) == before


def test_bad_input_with_a_flag_writes_nothing(rode_cli, tmp_path):
    r = rode_cli("train", "-r", "depth=0")
    refused(r, "depth=0")
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("task", ["train", "gradcheck"])
def test_out_dir_is_checked_like_a_run_dir(task, runs, rode_cli, tripwire, tmp_path):
    tripwire(task)
    before = digest(runs)
    r = rode_cli(task, f"out_dir={runs / 'run'}")
    refused(r, "out_dir=", "already holds")
    assert digest(runs) == before
    assert not (tmp_path / "outputs").exists()


def test_one_out_dir_for_every_job_of_a_sweep_is_refused(rode_cli, tripwire, tmp_path):
    tripwire("train")
    r = rode_cli("-m", "train", "depth=2,3", f"out_dir={tmp_path / 'shared'}")
    refused(r, "out_dir=", "same dir for 2 jobs")
    assert not (tmp_path / "shared").exists()


def test_resume_with_run_dir_at_another_finished_run_is_refused(runs, rode_cli, tripwire):
    tripwire("train")
    before = digest(runs)
    r = rode_cli("train", f"resume={runs / 'early'}", f"hydra.run.dir={runs / 'other'}")
    refused(r, "hydra.run.dir", "already holds a run")
    assert digest(runs) == before


def test_partial_results_of_a_task_count(runs, rode_cli, tripwire):
    """An interrupted bench left bench.csv: a re-run into its dir is refused."""
    tripwire("bench")
    before = digest(runs)
    r = rode_cli("bench", f"hydra.run.dir={runs / 'bench'}")
    refused(r, "hydra.run.dir", "bench.csv")
    assert digest(runs) == before


def test_an_early_stopped_run_is_finished(runs, rode_cli):
    before = digest(runs)
    r = rode_cli("train", f"resume={runs / 'early'}")
    refused(r, "already finished", "stopped early after epoch 2 of 4")
    assert digest(runs) == before
    # resume=auto, the same command line again: nothing to do, nothing rewritten
    r = rode_cli("train", *EARLY, "resume=auto", f"hydra.run.dir={runs / 'early'}")
    assert r.code == 0 and "already finished" in r.out, r.err
    assert digest(runs) == before


def test_a_sweep_job_dir_at_a_finished_run_is_refused_before_hydra_writes(runs, rode_cli,
                                                                          tripwire, tmp_path):
    """hydra.sweep.subdir pointing into a finished run (as a path, or through
    ${hydra.job.num} / ${hydra.job.override_dirname}): refused by the pre-flight, which
    computes each job's dir as the launcher will, before Hydra writes .hydra/ there."""
    tripwire("train")
    before = digest(runs)
    for subdir in (runs / "other", "${hydra.job.override_dirname}"):
        sweep_dir = tmp_path / "fresh" if subdir != "${hydra.job.override_dirname}" \
            else runs / "sweep"
        words = ["depth=2"] if sweep_dir == tmp_path / "fresh" else ["depth=2,3"]
        r = rode_cli("-m", "train", *words, f"hydra.sweep.dir={sweep_dir}",
                     f"hydra.sweep.subdir={subdir}")
        refused(r, "already holds")
        assert digest(runs) == before
    assert not (tmp_path / "fresh").exists()


def test_a_job_dir_is_checked_when_the_job_starts(runs, rode_cli, tripwire, tmp_path,
                                                  monkeypatch):
    """A dir the command line cannot predict (a sweeper's or a remote launcher's job dir;
    here the pre-flight is told it cannot) is checked inside the job, before anything
    is written there: Hydra's .hydra/ too, which rode writes only after the check."""
    from runner import routes

    tripwire("train")
    monkeypatch.setattr(routes, "sweep_job_dir", lambda cfg, num: None)
    before = digest(runs / "other")
    r = rode_cli("-m", "train", "depth=2", f"hydra.sweep.dir={tmp_path / 'fresh'}",
                 f"hydra.sweep.subdir={runs / 'other'}")
    assert r.code == 2 and "already holds results" in r.err, r.err[-2000:]
    assert "Traceback" not in r.err
    assert digest(runs / "other") == before


def test_hydra_writes_its_config_as_before(rode_cli, tmp_path):
    """.hydra/ written by rode after the job's check is Hydra's own: the overrides as
    given, output_subdir as configured (not the null rode passes to Hydra)."""
    import yaml

    r = rode_cli("train", *RUN, "threads=1", f"hydra.run.dir={tmp_path / 'run'}")
    assert r.code == 0, r.err
    hydra_dir = tmp_path / "run" / ".hydra"
    hydra = yaml.safe_load((hydra_dir / "hydra.yaml").read_text())["hydra"]
    assert hydra["output_subdir"] == ".hydra"
    assert not any("output_subdir" in w for w in hydra["overrides"]["hydra"])
    assert yaml.safe_load((hydra_dir / "overrides.yaml").read_text()) == [*RUN, "threads=1"]
    assert yaml.safe_load((hydra_dir / "config.yaml").read_text())["depth"] == 2


# What each task needs besides its defaults to pass every other check (finetune also
# a checkpoint to start from, added in the test).
TASK_ARGS = {"train": ["dataset=synthetic"], "gradcheck": ["dataset=synthetic"]}


@pytest.mark.parametrize("route", ["hydra.run.dir", pytest.param("out_dir", marks=pytest.mark.slow),
                                   pytest.param("sweep", marks=pytest.mark.slow)])
def test_each_tasks_refusal_suggests_only_what_the_task_accepts(route, runs, rode_cli,
                                                                tripwire, tmp_path):
    """A dir holding results is refused for every task that writes runs; the hint names
    resume= (with the task's own name) only for a task that has the key."""
    from runner.schema import has_key
    from runner.tasks import TASKS

    for task, declared in TASKS.items():
        if not declared.writes_runs:
            continue
        tripwire(task)
        args = [*TASK_ARGS.get(task, [])]
        if task == "finetune":
            args.append(f"checkpoint={runs / 'run'}")
        if route == "sweep":
            r = rode_cli("-m", task, *args, f"hydra.sweep.dir={runs}")
        else:
            r = rode_cli(task, *args, f"{route}={runs / 'other'}")
        refused(r, "already holds")
        if has_key(task, "resume"):
            assert f"rode {task} resume=" in r.err, r.err
        else:
            assert "resume" not in r.err and "choose another" in r.err, r.err
