"""rode report: tables and figures from a real sweep plus fixture job dirs in the other tasks' formats."""
import csv
import json
from pathlib import Path

import pytest
import yaml

from conftest import compose_config, validate_job

PNG = b"\x89PNG\r\n\x1a\n"


def write_job(path: Path, task: str, config: dict, files: dict, overrides=()) -> Path:
    """A job dir as Hydra and the task leave it: .hydra/{hydra,config,overrides}.yaml + files."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"name": task}}}))
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    for name, content in files.items():
        if isinstance(content, list):   # rows -> csv
            with open(path / name, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(content[0]))
                writer.writeheader()
                writer.writerows(content)
        else:
            (path / name).write_text(json.dumps(content))
    return path


def fixture_jobs(sweep: Path) -> None:
    """gradcheck at three depths (error 0.3/N: slope -1), a memory table, a bench table,
    a fine-tuning summary, a failed and an unfinished job."""
    for n in (4, 8, 16):
        layers = [{"layer": i, "rel_error": 0.3 / n * (1 + i / n), "cosine": 1.0} for i in range(n)]
        write_job(sweep / f"grad/depth={n}", "gradcheck", {"depth": n, "method": "euler"}, {
            "grad_error.csv": layers,
            "summary.json": {"rel_error": 0.1 / n, "stack_rel_error": 0.3 / n, "cosine": 1.0,
                             "depth": n, "method": "euler",
                             "config": {"depth": n, "method": "euler", "init": "smooth"}}})
    mem = [{"depth": n, "grad": g, "method": "euler",
            "saved_bytes": 1000 * n if g == "backprop" else 1000, "peak_bytes": 2000 * n,
            "seconds_per_step": 0.001 * n} for n in (16, 64) for g in ("backprop", "adjoint")]
    write_job(sweep / "mem", "memory", {"depths": [16, 64]},
              {"memory.csv": mem, "summary.json": {"peak_kind": "cpu_peak_rss_growth"}})
    bench = [{"depth": n, "contender": c, "method": "euler", "width": 8, "batch": 4,
              "seconds_per_step": 0.01 * n, "peak_bytes": "nan",
              "grad_rel_error": 0.0 if c == "backprop" else 0.1 / n}
             for n in (16, 64) for c in ("backprop", "adjoint")]
    write_job(sweep / "bench", "bench", {}, {"bench.csv": bench,
                                             "bench.json": {"notes": ["memcnn not installed"]}})
    write_job(sweep / "tuned", "finetune", {"depth": 16, "grad": "adjoint"}, {"summary.json": {
        "status": "completed", "test_acc": 0.9, "acc_before": 0.8, "acc_untied": 0.8,
        "acc_after": 0.9, "depth_before": [8], "depth_after": [16], "grad": "adjoint",
        "stack_saved_bytes_backprop": 262144, "stack_saved_bytes_adjoint": 8192}})
    write_job(sweep / "diverged", "train", {"depth": 8, "method": "euler", "grad": "adjoint"},
              {"summary.json": {"status": "failed", "error": "loss became nan at epoch 1"}})
    write_job(sweep / "killed", "train", {"depth": 16, "method": "heun", "grad": "adjoint"}, {})
    preempted = write_job(sweep / "preempted", "train", {"depth": 4}, {})
    (preempted / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_acc": 0.5}) + "\n" + json.dumps(
        {"event": "interrupted", "signal": "SIGTERM", "epoch": 2, "step": 40}) + "\n")


def test_report_on_a_real_train_sweep_with_other_tasks_fixtures(tmp_path, capsys):
    from runner.cli import main

    sweep = tmp_path / "sweep"
    main(["-m", "train", "depth=2,4", "epochs=1", "width=8", "dataset=synthetic",
          "dataset.num_samples=200", "progress=false", "device=cpu", f"hydra.sweep.dir={sweep}"])
    assert len(list(sweep.glob("*/summary.json"))) == 2
    fixture_jobs(sweep)

    main(["report", str(sweep)])   # the dispatcher, positional form
    assert "1 failed, 2 unfinished" in capsys.readouterr().out
    report = (sweep / "report.md").read_text()
    # Failed and unfinished jobs are listed, with why.
    bad = report.split("## Failed or unfinished jobs")[1].split("\n## ")[0]
    assert "`diverged`" in bad and "loss became nan" in bad and "`killed`" in bad
    assert "unfinished" in bad
    assert "`preempted` | train | unfinished | interrupted by SIGTERM at epoch 2" in bad
    # The two real train jobs: one row per depth, with the test error of the summary.
    train = report.split("## Test error vs depth")[1].split("\n## ")[0]
    for depth in (2, 4):
        summary = json.loads(next(sweep.glob(f"*depth={depth},*/summary.json")).read_text())
        assert f"| euler adjoint | {depth} | 1 | {100 * (1 - summary['test_acc']):.2f} |" in train
    # Gradient error: the slope is fitted from the jobs' numbers (0.3/N: exactly -1).
    grad = report.split("## Gradient error vs depth")[1].split("\n## ")[0]
    assert "| euler | -1.00 | 3 |" in grad
    assert "## Memory vs depth" in report and "## Benchmark" in report
    assert "memcnn not installed" in report
    assert "| `tuned` | 8 | 16 | adjoint | 80.00 | 80.00 | 90.00 | 256.0 KiB | 8.0 KiB |" in report
    for name in ("test_error.png", "grad_error.png", "memory.png", "bench.png"):
        assert (sweep / name).read_bytes()[:8] == PNG, name
        assert f"]({name})" in report


def test_report_draws_discretization_and_linear_figures(tmp_path):
    from runner.tasks import discretization, linear, report

    runs = tmp_path / "runs"
    discretization.run(compose_config("discretization", [
        "cases=[linear]", "weights=[constant,iid]", "depths=[4,8,16]", "ref_steps=64",
        "trials=1", "batch_size=4", "progress=false"], runs / "disc"))
    linear.run(compose_config("linear", ["depths=[4,8]", "steps=10", "snapshots=[0,5]",
                                         "progress=false"], runs / "lin"))
    out = tmp_path / "report"
    cfg = compose_config("report", [f"dir={runs}"], out)
    validate_job("report", cfg)
    summary = report.run(cfg)
    assert summary["jobs"] == 2 and summary.get("completed") == 2
    text = (out / "report.md").read_text()
    with open(runs / "disc" / "slopes.csv") as f:
        for s in csv.DictReader(f):
            assert f"| {s['case']} | {s['weights']} | {s['method']} |" in text
            assert f"{float(s['slope']):+.2f} |" in text
    assert "| 4 |" in text.split("## Linear ResNets")[1]
    for name in ("discretization.png", "linear_weights.png", "linear_increments.png"):
        assert (out / name).read_bytes()[:8] == PNG, name


def test_run_control_keys_do_not_split_a_series(tmp_path):
    """A resumed job, or one run with other threads, is the same experiment: one series."""
    from runner.tasks import report

    for depth, extra in ((2, {}), (4, {"resume": "x/checkpoint.pt", "threads": 1}),
                         (8, {"eval_batch_size": 256, "device": "cuda"})):
        config = {"depth": depth, "method": "euler", "grad": "adjoint", **extra}
        write_job(tmp_path / f"depth={depth}", "train", config, {"summary.json": {
            "status": "completed", "test_acc": 0.9, "config": config}})
    out = tmp_path / "out"
    report.run(compose_config("report", [f"dir={tmp_path}"], out))
    train = (out / "report.md").read_text().split("## Test error vs depth")[1].split("\n## ")[0]
    for depth in (2, 4, 8):
        assert f"| euler adjoint | {depth} | 1 |" in train


def test_report_of_a_job_dir_whose_name_holds_equals_and_commas(tmp_path):
    from runner.cli import main

    job = write_job(tmp_path / "depth=4,method=euler", "gradcheck", {"depth": 4},
                    {"grad_error.csv": [{"layer": 0, "rel_error": 0.1, "cosine": 1.0}],
                     "summary.json": {"rel_error": 0.1, "depth": 4, "method": "euler"}})
    main(["report", str(job)])
    assert "1 jobs: 1 completed" in (job / "report.md").read_text()


def test_positional_word_becomes_the_tasks_key(tmp_path):
    from runner.cli import bind_positional
    from runner.errors import ConfigError
    from runner.tasks import TASKS

    report, train = TASKS["report"].positional, TASKS["train"].positional
    assert bind_positional(report, ["x/y", "out_dir=o"]) == ["dir='x/y'", "out_dir=o"]
    (tmp_path / "a=1,b=2").mkdir()
    path = str(tmp_path / "a=1,b=2")
    assert bind_positional(report, [path]) == [f"dir='{path}'"]
    assert bind_positional(train, ["depth=4"]) == ["depth=4"]   # no positional key: untouched
    with pytest.raises(ConfigError, match="expected one dir"):
        bind_positional(report, ["a", "b"])


def test_missing_dir_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    from runner.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit:
        main(["report"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "rode report <dir>" in err
    assert len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_not_a_directory(tmp_path):
    from runner.errors import ConfigError

    with pytest.raises(ConfigError, match="not a directory"):
        validate_job("report", compose_config("report", [f"dir={tmp_path / 'nope'}"], tmp_path))


def test_empty_dir_is_an_error(tmp_path):
    from runner.errors import ConfigError
    from runner.tasks import report

    cfg = compose_config("report", [f"dir={tmp_path}"], tmp_path / "out")
    with pytest.raises(ConfigError, match="no job directories"):
        report.run(cfg)


# ------------------------------------------------- experiment configs and scripts
CPU_EXPERIMENTS = {"train": "train", "gradcheck": "gradcheck", "memory": "memory",
                   "discretization": "discretization", "linear": "linear",
                   "train_pretrain": "train", "train_depth_transfer": "train", "train_convergence": "train"}


@pytest.mark.parametrize("name, task", CPU_EXPERIMENTS.items())
def test_cpu_experiments_compose_and_validate(tmp_path, name, task):

    cfg = compose_config(task, [f"experiment={name}"], tmp_path)
    validate_job(task, cfg)
    assert cfg.get("device", "cpu") != "cuda"


def test_scripts_parse_and_say_what_they_show():
    root = Path(__file__).resolve().parents[1] / "scripts"
    import subprocess

    for name in ("test_error", "grad_error", "memory", "discretization", "linear", "finetune",
                 "reproduce_all", "depth_transfer", "convergence"):
        script = root / f"{name}.sh"
        lines = script.read_text().splitlines()
        assert lines[0] == "#!/usr/bin/env bash" and lines[1].startswith("# "), name
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, name
