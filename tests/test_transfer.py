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
