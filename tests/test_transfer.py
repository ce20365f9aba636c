"""rode report on an lr x depth sweep of `rode train`: the transfer figure, the best lr per
depth and the slope fit (runner.transfer), on a tiny real sweep and on exact numbers."""
import math
import re

import pytest

from runner.transfer import analyse, best_lr, fit_line, points, predicted_slope

PNG = b"\x89PNG\r\n\x1a\n"


def test_report_draws_transfer_figure_and_fits_slope_on_a_real_sweep(tmp_path, capsys):
    from runner.cli import main

    sweep = tmp_path / "sweep"
    # lr 30 with alpha=0 diverges: it must count as a diverged point, not be dropped.
    main(["-m", "train", "depth=2,4", "lr=1e-3,3e-2,30", "alpha=0.0", "epochs=1",
          "width=8", "dataset=synthetic", "dataset.num_samples=160", "grad=backprop",
          "schedule=constant", "monitor=train_loss", "progress=false", "device=cpu",
          f"hydra.sweep.dir={sweep}"])
    main(["report", str(sweep)])
    report = (sweep / "report.md").read_text()
    assert (sweep / "transfer.png").read_bytes()[:8] == PNG
    assert "](transfer.png)" in report
    part = report.split("## Learning-rate transfer across depth")[1].split("\n## ")[0]
    from runner.tasks.report import find_jobs

    ps = points(find_jobs(sweep))
    assert len(ps) == 6 and {p.depth for p in ps} == {2, 4}
    result = analyse(ps)
    for panel, depths in result.best.items():
        for depth, found in depths.items():
            lrs = [lr for _, lr, _ in found]
            assert f"| {panel[0]}, alpha={panel[2]:g} | {depth} | 1 | {lrs[0]:.3g} |" in part
        slope, _, _, n, _ = result.slopes[panel]
        expected = (math.log(depths[4][0][1]) - math.log(depths[2][0][1])) / math.log(2)
        assert slope == pytest.approx(expected)
        assert re.search(rf"\| adam, alpha={panel[2]:g} \| {slope:.3g} ± – \| "
                         rf"{predicted_slope(panel):.3g} \| 2 \|", part), part


def test_best_lr_is_the_parabola_vertex_and_edges_are_flagged():
    # loss = exp((log lr - log 0.01)^2): the vertex is exactly 0.01, between grid points.
    grid = [1e-4, 3e-3, 3e-2, 1]
    curve = [(lr, math.exp((math.log(lr) - math.log(0.01)) ** 2)) for lr in grid]
    lr, edge = best_lr(curve)
    assert lr == pytest.approx(0.01) and not edge
    assert best_lr([(1e-3, 1.0), (1e-2, 2.0), (1e-1, math.inf)]) == (1e-3, True)
    assert best_lr([(1e-3, math.inf), (1e-2, math.inf)]) is None


def test_slope_fit_recovers_a_power_law_with_its_uncertainty():
    xs = [math.log(n) for n in (4, 16, 64, 256)]
    s, se, a = fit_line(xs, [math.log(0.1) - 0.5 * x for x in xs])
    assert s == pytest.approx(-0.5) and se == pytest.approx(0, abs=1e-12)
    noisy = [math.log(0.1) - 0.5 * x + e for x, e in zip(xs, (0.1, -0.1, -0.1, 0.1), strict=True)]
    s, se, _ = fit_line(xs, noisy)
    assert s == pytest.approx(-0.5) and 0.01 < se < 0.2


@pytest.mark.parametrize("panel, slope", [
    (("adam", "standard", 1.0), 0.0), (("adam", "standard", 0.5), -0.5),
    (("adam", "standard", 0.0), -1.0), (("sgd", "standard", 1.0), 1.0),
    (("sgd", "standard", 0.5), 0.0), (("sgd", "standard", 0.0), -1.0),
    (("adam", "completep", 0.5), 0.0), (("sgd", "completep", 0.0), 0.0),
    (("adam", "depth_mup", 1.0), 0.5), (("sgd", "depth_mup", 0.5), 0.0)])
def test_predictions_are_the_papers_rules(panel, slope):
    assert predicted_slope(panel) == pytest.approx(slope)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_completep_predicts_a_flat_best_lr_printed_as_zero(optimizer, alpha):
    """CompleteP's rule cancels the rule of thumb exactly: the report prints 0, not -5.55e-17."""
    from runner.reporting import fmt

    assert fmt(predicted_slope((optimizer, "completep", alpha)), 3) == "0"


TINY = ["epochs=1", "width=8", "dataset=synthetic", "dataset.num_samples=160", "grad=backprop",
        "schedule=constant", "monitor=train_loss", "progress=false", "device=cpu", "threads=1"]
SEARCH = ["hparams_search=optuna", "hydra.sweeper.n_trials=3", "objective=train_loss",
          "hydra.sweeper.direction=minimize", "method=euler", "adjoint.vjp=exact",
          "lr=tag(log,interval(1e-3,1e-1))"]


def test_depth_transfer_search_reads_back_the_best_lr_of_a_real_search(rode_cli, tmp_path, capsys):
    """The read-back scripts/depth_transfer_search.sh relies on, on a tiny real search: the
    lr taken from optimization_results.yaml is the lr of the trial with the least
    training loss (the objective), printed exactly as the next `rode train` takes it."""
    import json

    from runner.transfer import main, study_param

    study = tmp_path / "shallow"
    r = rode_cli("-m", "train", *SEARCH, "hydra.sweeper.n_trials=2", *TINY, "depth=2",
                 f"hydra.sweep.dir={study}")
    assert r.code == 0, r.err
    trials = [json.loads(p.read_text()) for p in study.glob("*/summary.json")]
    assert len(trials) == 2 and trials[0]["config"]["lr"] != trials[1]["config"]["lr"]
    least = min(trials, key=lambda s: s["best_metrics"]["train_loss"])
    lr = study_param(study, "lr")
    assert lr == least["config"]["lr"]
    assert main(["best", str(study), "lr"]) == 0
    assert float(capsys.readouterr().out) == lr


@pytest.mark.slow
def test_depth_transfer_search_table_compares_the_transferred_lr_with_the_deep_search(
        rode_cli, tmp_path, capsys):
    """The script's three steps for one alpha, tiny: search at depth 2, the found lr at
    depth 4, search at depth 4; the table row holds both lrs and the deep losses."""
    import json

    from runner.transfer import main, search_rows, study_param

    out = tmp_path / "out" / "alpha_1.0"
    for name, depth in (("shallow", 2), ("deep", 4)):
        r = rode_cli("-m", "train", *SEARCH, *TINY, f"depth={depth}", f"hydra.sweep.dir={out / name}")
        assert r.code == 0, r.err
    lr = study_param(out / "shallow", "lr")
    r = rode_cli("train", *TINY, "depth=4", f"lr={lr}", f"hydra.run.dir={out / 'transfer'}")
    assert r.code == 0, r.err
    moved = json.loads((out / "transfer" / "summary.json").read_text())
    deep = [json.loads(p.read_text()) for p in (out / "deep").glob("*/summary.json")]
    best_deep = min(deep, key=lambda s: s["best_metrics"]["train_loss"])
    [row] = search_rows(tmp_path / "out")
    deep_lr = study_param(out / "deep", "lr")
    assert row[:3] == ["1.0", f"{lr:.3g} (N=2)", f"{deep_lr:.3g} (N=4)"]
    assert row[4] == f"{moved['best_metrics']['train_loss']:.3g}"
    assert row[5] == f"{best_deep['best_metrics']['train_loss']:.3g}"
    assert main(["search-table", str(tmp_path / "out")]) == 0
    assert "| 1.0 | " in capsys.readouterr().out


def test_depth_transfer_search_read_back_refuses_what_is_not_a_finished_search(tmp_path, capsys):
    from runner.transfer import main

    (tmp_path / "pareto").mkdir()
    (tmp_path / "pareto" / "optimization_results.yaml").write_text(
        "name: optuna\nsolutions:\nbest_trials:\n- params: {lr: 0.01}\n")
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "optimization_results.yaml").write_text(
        "name: optuna\nbest_params:\n  lr: 0.01\nbest_value: 0.5\n")
    for argv, says in [(["best", str(tmp_path / "missing"), "lr"], "no such directory"),
                       (["best", str(tmp_path), "lr"], "no optimization_results.yaml in it"),
                       (["best", str(tmp_path / "pareto"), "lr"], "two-objective study"),
                       (["best", str(tmp_path / "one"), "depth"], "depth was not searched (searched: lr)"),
                       (["search-table", str(tmp_path)], "no alpha_<a> folders")]:
        assert main(argv) == 2
        err = capsys.readouterr()
        assert err.out == "" and says in err.err and len(err.err.strip().splitlines()) == 1
    assert main(["best", str(tmp_path / "one"), "lr"]) == 0
    assert capsys.readouterr().out == "0.01\n"


@pytest.mark.slow
def test_report_measures_where_weights_converge_on_a_real_depth_sweep(tmp_path):
    from runner.cli import main
    from runner.convergence import distances, pairs
    from runner.tasks.report import find_jobs

    sweep = tmp_path / "sweep"
    main(["-m", "train", "depth=2,4,8", "epochs=1", "width=8", "dataset=synthetic",
          "dataset.num_samples=160", "grad=backprop", "progress=false", "device=cpu",
          f"hydra.sweep.dir={sweep}"])
    main(["report", str(sweep)])
    report = (sweep / "report.md").read_text()
    assert (sweep / "convergence.png").read_bytes()[:8] == PNG
    part = report.split("## Where trained weights converge")[1].split("\n## ")[0]
    (chain,) = pairs(find_jobs(sweep)).values()
    assert [n for n, _, _ in chain] == [2, 4]
    for n, small, large in chain:
        w, o = distances(small, large)
        assert 0 < w < 1 and 0 < o < 1
        assert f"| init=smooth, alpha=1, euler, seed=0 | {n} vs {2 * n} | {w:.3g} | {o:.3g} |" in part


def test_transfer_figure_keeps_trained_curves_readable_next_to_a_blown_up_one(tmp_path, monkeypatch):
    """A depth whose loss blew up (1e25: alpha=0 at N = 256) is drawn as markers at the
    panel's top; it must not stretch the axis over the trained curves (0.2 ... 0.5)."""
    import runner.plots as plots

    limits = []
    real_save = plots._save

    def keep_limits(fig, path):
        limits.extend(ax.get_ylim() for ax in fig.axes if ax.get_visible())
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", keep_limits)
    curves = {("adam", "standard", 0.0): {
        4: [(1e-3, 0.5, 0, 1), (1e-2, 0.2, 0, 1), (3e-2, 0.3, 0, 1)],
        256: [(1e-3, 6e25, 0, 1), (1e-2, 6e25, 0, 1), (3e-2, math.inf, 1, 1)]}}
    out = plots.plot_transfer(curves, tmp_path / "transfer.png", str)
    assert out.read_bytes()[:8] == PNG
    (low, high), = limits
    assert low < 0.2 and 0.5 < high < 10


def test_a_study_that_also_varies_the_model_is_not_a_transfer_sweep(tmp_path):
    # An Optuna study over depth, lr, grad and method spans an lr x depth grid, but
    # its losses at one (lr, depth) mix models: the report draws no transfer section.
    from pathlib import Path

    from runner.reporting import Job
    from runner.transfer import is_transfer_sweep, section

    def job(i, depth, lr, **more):
        config = {"depth": depth, "lr": lr, "seed": 0, "out_dir": f"/x/{i}",
                  "dataset": {"name": "digits"}, **more}
        return Job(Path(f"/x/{i}"), str(i), "train", "completed", config=config,
                   summary={"train_loss": 1.0 / (1 + i)})

    grid = [(d, lr) for d in (4, 16) for lr in (1e-3, 1e-2, 1e-1)]
    plain = [job(i, d, lr, grad="adjoint") for i, (d, lr) in enumerate(grid)]
    assert is_transfer_sweep(plain)
    mixed = [job(i, d, lr, grad=("adjoint", "backprop")[i % 2]) for i, (d, lr) in enumerate(grid)]
    assert not is_transfer_sweep(mixed)
    figures: list = []
    assert section(mixed, tmp_path, figures) == "" and figures == []
    # the panels and seeds may differ: two alphas, two seeds
    panels = [job(i, d, lr, grad="adjoint", alpha=a, seed=s) for i, (d, lr, a, s) in
              enumerate((d, lr, a, s) for d, lr in grid for a in (0.5, 1.0) for s in (0, 1))]
    assert is_transfer_sweep(panels)
