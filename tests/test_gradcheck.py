"""rode gradcheck: the adjoint's gradient error falls with depth at the integrator's order."""
import csv
import json

import pytest

from conftest import compose_config, validate_job
from runner.engine import train
from runner.errors import ConfigError
from runner.tasks import gradcheck

# The paper-notes setting: float64, 8-wide tanh MLP residual functions, N = 8 -> 64.
SETTING = ["model.activation=tanh", "width=8", "batch_size=256", "dtype=float64", "device=cpu"]




def gradcheck_run(tmp_path, overrides):
    name = "_".join(o.split("=")[1] for o in overrides)
    given = {o.split("=")[0] for o in overrides}
    setting = [o for o in SETTING if o.split("=")[0] not in given]
    cfg = compose_config("gradcheck", setting + overrides, tmp_path / name)
    validate_job("gradcheck", cfg)
    summary = gradcheck.run(cfg)
    with open(tmp_path / name / "grad_error.csv") as f:
        rows = list(csv.DictReader(f))
    written = json.loads((tmp_path / name / "summary.json").read_text())
    assert written["rel_error"] == summary["rel_error"] and written["status"] == "completed"
    return summary, rows


def test_error_falls_with_depth_at_the_order_the_weights_allow(tmp_path):
    fall = {}
    for init in ["tied", "iid"]:
        for method in ["euler", "heun"]:
            errors = []
            for depth in [8, 64]:
                summary, rows = gradcheck_run(tmp_path, [f"depth={depth}", f"method={method}",
                                                         f"init={init}"])
                assert (summary["depth"], summary["method"], summary["init"]) == (depth, method, init)
                # One row per residual function with its own weights; tied: one shared.
                assert [int(r["layer"]) for r in rows] == ([0] if init == "tied" else list(range(depth)))
                assert all(0 < float(r["rel_error"]) < 0.1 and float(r["cosine"]) > 0.99 for r in rows)
                errors.append(summary["rel_error"])
            fall[init, method] = errors[0] / errors[1]   # depth x8
    # Euler: at least first order, whatever the weights.
    assert fall["tied", "euler"] > 8 / 2 and fall["iid", "euler"] > 8 / 2
    # Heun: at least second order when the weights are smooth in depth (tied)...
    assert fall["tied", "heun"] > 64 / 2 and fall["tied", "heun"] > 10 * fall["tied", "euler"]
    # ... and its advantage over Euler is gone with i.i.d. weights.
    assert fall["iid", "heun"] < 2 * fall["iid", "euler"]


def test_checkpoint_gives_the_architecture_and_weights(tmp_path, capsys):
    cfg = compose_config("train", ["dataset=synthetic", "dataset.num_samples=200", "epochs=1",
                                   "depth=5", "width=12", "method=heun", "init=iid",
                                   "progress=false", "device=cpu"], tmp_path / "trained")
    trained = train(cfg)
    capsys.readouterr()
    out = tmp_path / "check"
    # depth=3 is ignored: the checkpoint holds a depth-5 model.
    cfg = compose_config("gradcheck", [f"checkpoint={tmp_path / 'trained'}", "depth=3",
                                       "batch_size=64", "device=cpu"], out)
    validate_job("gradcheck", cfg)
    gradcheck.run(cfg)
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "rel_error" in printed[0]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["depth"], summary["width"], summary["method"], summary["dataset"]) == \
        (5, 12, "heun", "synthetic")
    assert summary["step"] == trained["steps"] and summary["checkpoint"].endswith("checkpoint.pt")
    with open(out / "grad_error.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["layer", "rel_error", "cosine"]
        assert len(list(reader)) == 5
    assert 0 < summary["rel_error"] < 1


def test_low_precision_is_measured_against_float64_backprop(tmp_path):
    """bfloat16: backprop's own rounding is the floor, the exact schemes' adjoint adds
    little to it; momentum's rebuild (divided by gamma each step) blows up, the
    self-check sees it, and the anchored pass it switches to is back at the floor."""
    rows = {}
    for method in ["rev_heun", "momentum"]:
        rows[method], _ = gradcheck_run(tmp_path, [f"method={method}", "depth=128", "init=iid",
                                                   "dtype=bfloat16", "adjoint.max_roundtrip=0.1"])
    rev, mom = rows["rev_heun"], rows["momentum"]
    for s in (rev, mom):
        assert s["dtype"] == "bfloat16" and s["reference"].startswith("backprop, float64")
        assert 1e-4 < s["backprop_stack_rel_error"] < 0.5
    assert rev["stack_rel_error"] < 2 * rev["backprop_stack_rel_error"]
    assert rev["roundtrip_error"] < 0.1 and not rev["escalated"]
    assert mom["roundtrip_error"] > 0.1 and mom["escalated"]
    assert mom["stack_rel_error"] > 2 * mom["backprop_stack_rel_error"]
    assert mom["escalated_anchor_every"] == 12   # ceil(sqrt(128 steps))
    assert mom["escalated_stack_rel_error"] < 2 * mom["backprop_stack_rel_error"]


def test_amp_autocasts_float32_weights(tmp_path):
    s, _ = gradcheck_run(tmp_path, ["method=heun", "depth=16", "dtype=float32", "amp=true"])
    assert s["amp"] and s["amp_dtype"] == "bfloat16" and s["dtype"] == "float32"
    assert 1e-4 < s["backprop_stack_rel_error"] < 0.5
    assert s["stack_rel_error"] < 2 * s["backprop_stack_rel_error"]


@pytest.mark.parametrize("override, message", [
    ("checkpoint=/no/such/run", "checkpoint"), ("dtype=float8", "dtype"), ("amp=true", "amp"),
    ("method=heun depth=1", "depth"), ("batch_size=0", "batch_size"), ("init=random", "init")])
def test_bad_input_is_a_config_error(tmp_path, override, message):
    cfg = compose_config("gradcheck", override.split(), tmp_path)
    with pytest.raises(ConfigError, match=message):
        validate_job("gradcheck", cfg)
