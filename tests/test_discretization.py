"""rode discretization: errors fall at the integrator's order only when the weights are smooth in depth."""
import csv
import json
from itertools import pairwise

import pytest

from conftest import compose_config, validate_job

DEPTHS = "depths=[8,16,32,64,128]"


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_exact_linear_case_has_the_integrators_orders(tmp_path, rode_cli):
    out = rode_cli("discretization", "cases=[linear]", "weights=[constant]", DEPTHS, "ref_steps=512",
                   "progress=false", f"hydra.run.dir={tmp_path}")
    assert out.code == 0, out.err
    assert "slope" in out.out
    rows = read_csv(tmp_path / "discretization.csv")
    assert {(r["method"], int(r["depth"])) for r in rows} == {
        (m, d) for m in ("euler", "heun") for d in (8, 16, 32, 64, 128)}
    for method in ("euler", "heun"):
        errors = [float(r["error"]) for r in rows if r["method"] == method]
        assert all(a > b > 0 for a, b in pairwise(errors))   # depths in increasing order
    slopes = {s["method"]: float(s["slope"]) for s in read_csv(tmp_path / "slopes.csv")}
    assert abs(slopes["euler"] + 1) < 0.15, slopes
    assert abs(slopes["heun"] + 2) < 0.3, slopes
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and len(summary["slopes"]) == 2
    assert (tmp_path / "discretization.png").stat().st_size > 0


def test_heun_loses_its_order_when_weights_are_not_smooth(tmp_path):
    from runner.tasks import discretization

    cfg = compose_config("discretization", [
        "cases=[tanh]", "weights=[smooth,rough,iid]", "depths=[8,16,32,64]", "ref_steps=512",
        "trials=2", "batch_size=8", "progress=false"], tmp_path)
    validate_job("discretization", cfg)
    summary = discretization.run(cfg)
    slope = {(s["weights"], s["method"]): s["slope"] for s in summary["slopes"]}
    assert slope["smooth", "heun"] < -1.7 and slope["smooth", "euler"] < -0.85
    # Rough or i.i.d. weights: Heun is no longer second order.
    assert slope["rough", "heun"] > -1.4
    assert slope["iid", "heun"] > -1.0 and slope["iid", "euler"] > -1.0
    rows = read_csv(tmp_path / "discretization.csv")
    assert len(rows) == 3 * 2 * 4


def test_reference_solver_matches_the_exact_solution():
    import torch

    from runner.tasks.discretization import Constant, Linear, rk4

    case = Linear(3)
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(2, 9, generator=g, dtype=torch.float64) / 3 ** 0.5
    x0 = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    exact = case.exact(x0, theta)
    assert torch.allclose(rk4(case, Constant(theta), x0, 256), exact, rtol=1e-9, atol=1e-12)


def test_bad_input_is_one_line_exit_2(tmp_path, rode_cli):
    out = rode_cli("discretization", "weights=[smooth,wiggly]", f"hydra.run.dir={tmp_path / 'run'}")
    assert out.code == 2, out.err
    assert "wiggly" in out.err and len(out.err.strip().splitlines()) == 1, out.err
    assert not (tmp_path / "run" / "discretization.csv").exists()


@pytest.mark.parametrize("bad, word", [("methods=[rk4]", "rk4"), ("depths=[0,8]", "depths"),
                                       ("depths=[]", "depths"), ("ref_steps=64", "ref_steps"),
                                       ("cases=[quadratic]", "quadratic")])
def test_bad_values_name_the_key(tmp_path, bad, word):
    from runner.errors import ConfigError

    cfg = compose_config("discretization", [bad], tmp_path)
    with pytest.raises(ConfigError, match=word):
        validate_job("discretization", cfg)
