"""rode report on runs with measurement hooks: per-layer figures and their CSVs, whose
numbers are the records of metrics.jsonl (read through the schema the hooks declare)."""
import json

import pytest
from hydra.core.global_hydra import GlobalHydra

from runner.hooks import HOOKS
from runner.io import read_csv

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A real two-run sweep (Euler, Heun) with every hook on every 4 steps."""
    from runner.cli import main

    root = tmp_path_factory.mktemp("hooks") / "sweep"
    hooks = [f"hooks.{h}.every=4" for h in HOOKS]
    try:
        main(["-m", "train", "method=euler,heun", "depth=4", "epochs=1", "width=8",
              "dataset=synthetic", "dataset.num_samples=160", "progress=false", "device=cpu",
              *hooks, f"hydra.sweep.dir={root}"])
    finally:
        GlobalHydra.instance().clear()
    return root


def records(job, name):
    lines = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r.get("hook") == name]


def test_report_of_one_run_draws_each_hook_and_its_csv_holds_the_records(sweep, rode_cli,
                                                                          tmp_path):
    job = next(p for p in sweep.iterdir() if "method=heun" in p.name)
    out = tmp_path / "report"
    r = rode_cli("report", str(job), f"out_dir={out}")
    assert r.code == 0, r.err[-2000:]
    report = (out / "report.md").read_text()
    assert "## Measurement hooks" in report
    for name, hook in HOOKS.items():
        schema = hook.record
        mine = records(job, name)
        assert len(mine) >= 2   # at step 0 and after training at least
        assert (out / f"hook_{name}.png").read_bytes()[:8] == PNG
        assert f"](hook_{name}.png)" in report
        rows = read_csv(out / f"hook_{name}.csv")
        assert len(rows) == sum(len(r[schema.per_layer]) for r in mine)
        for rec in mine:
            at = [row for row in rows if int(row["step"]) == rec["step"]]
            assert [int(row["layer"]) for row in at] == list(range(len(rec[schema.per_layer])))
            assert [float(row[schema.per_layer]) for row in at] == pytest.approx(
                rec[schema.per_layer], rel=1e-12)
            assert [float(row[schema.scalar]) for row in at] == pytest.approx(
                [rec[schema.scalar]] * len(at), rel=1e-12)
    # Gradient error per layer: one value per residual layer of the depth-4 Heun stack.
    assert {len(r["layer_rel_error"]) for r in records(job, "grad_error")} == {4}


@pytest.mark.slow   # 13 figures: a minute on a loaded 2-core machine
def test_report_of_a_sweep_compares_its_runs(sweep, rode_cli, tmp_path):
    out = tmp_path / "report"
    r = rode_cli("report", str(sweep), f"out_dir={out}")
    assert r.code == 0, r.err[-2000:]
    report = (out / "report.md").read_text()
    jobs = {("euler" if "method=euler" in p.name else "heun"): p for p in sweep.iterdir()
            if p.is_dir() and not p.name.startswith(".")}
    for name, hook in HOOKS.items():
        schema = hook.record
        assert (out / f"hook_{name}_compare.png").read_bytes()[:8] == PNG
        assert f"](hook_{name}_compare.png)" in report
        rows = read_csv(out / f"hook_{name}_compare.csv")
        for method, job in jobs.items():
            mine = records(job, name)
            last_common = max({r["step"] for r in mine}
                              & {r["step"] for r in records(jobs["euler" if method == "heun"
                                                                 else "heun"], name)})
            rec = next(r for r in mine if r["step"] == last_common)
            at = [row for row in rows if row["run"].startswith(method)]
            assert {int(row["step"]) for row in at} == {last_common}
            assert [float(row[schema.per_layer]) for row in at] == pytest.approx(
                rec[schema.per_layer], rel=1e-12)
        # and each run's own figure
        assert len(list(out.glob(f"hook_{name}_*.csv"))) == 3   # two runs + the comparison


def test_hooks_declare_the_fields_they_log():
    """The schema the report reads is what the hooks write (fields of the measure functions)."""
    for name, hook in HOOKS.items():
        assert hook.record is not None, name
        assert hook.record.per_layer and hook.record.scalar
