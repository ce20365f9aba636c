"""rode linear: from a smooth start, trained linear ResNets keep weights smooth in depth."""
import csv
import json

import numpy as np
import pytest

from conftest import compose_config, validate_job


def test_smooth_start_keeps_increments_order_one_over_n(tmp_path):
    from runner.cli import main

    main(["linear", "depths=[4,8,16,32]", "steps=60", "log_every=3", "snapshots=[0,5]",
          "progress=false", f"hydra.run.dir={tmp_path}"])   # the `rode` dispatcher, in-process
    summary = json.loads((tmp_path / "summary.json").read_text())
    per = {p["depth"]: p for p in summary["per_depth"]}
    assert sorted(per) == [4, 8, 16, 32]
    for p in per.values():
        assert p["final_loss"] < 1e-3 * p["initial_loss"]
    # max_n ||A_{n+1} - A_n|| halves when N doubles: N times it stays put.
    scaled = [per[n]["max_scaled_increment"] for n in (4, 8, 16, 32)]
    assert max(scaled) < 1.3 * min(scaled) and min(scaled) > 0
    assert summary["slope_max_increment"] == pytest.approx(-1, abs=0.15)
    assert summary["slope_limit_gap"] == pytest.approx(-1, abs=0.3)

    with open(tmp_path / "linear_metrics.csv") as f:
        rows = list(csv.DictReader(f))
    steps32 = [int(r["step"]) for r in rows if r["depth"] == "32"]
    assert steps32 == list(range(0, 61, 3))
    # ... uniformly in optimisation time, not just at the end.
    for n in (4, 32):
        along = [float(r["scaled_increment"]) for r in rows if r["depth"] == str(n)]
        assert max(along) <= per[n]["max_scaled_increment"] + 1e-12
    weights = np.load(tmp_path / "linear_weights.npz")
    assert list(weights["steps_32"]) == [0, 5, 60]
    assert weights["weights_32"].shape == (3, 32, 2, 2)
    assert np.all(weights["weights_32"][0] == 0)
    for name in ("linear_weights.png", "linear_increments.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_iid_start_is_not_smooth(tmp_path):
    from runner.tasks import linear

    cfg = compose_config("linear", ["init=iid", "depths=[4,16]", "steps=20", "snapshots=[]",
                                    "progress=false"], tmp_path)
    validate_job("linear", cfg)
    summary = linear.run(cfg)
    per = {p["depth"]: p for p in summary["per_depth"]}
    # Increments stay O(1): N times them grows with N.
    assert per[16]["max_scaled_increment"] > 2.5 * per[4]["max_scaled_increment"]


@pytest.mark.parametrize("bad, word", [("init=random", "init"), ("depths=[0,4]", "depths"),
                                       ("method=heun", "depths"), ("lr=-1", "lr"),
                                       ("snapshots=[-1]", "snapshots")])
def test_bad_values_name_the_key(tmp_path, bad, word):
    from runner.errors import ConfigError

    overrides = [bad, "depths=[1,4]"] if bad == "method=heun" else [bad]
    cfg = compose_config("linear", overrides, tmp_path)
    with pytest.raises(ConfigError, match=word):
        validate_job("linear", cfg)


def test_a_diverging_run_says_so_in_its_summary(tmp_path):
    from runner.errors import RunFailed
    from runner.tasks import linear

    cfg = compose_config("linear", ["depths=[4]", "steps=200", "lr=1000", "snapshots=[]",
                                    "progress=false"], tmp_path)
    with pytest.raises(RunFailed, match="loss became"):
        linear.run(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "loss became" in summary["error"]
