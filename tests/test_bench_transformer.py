"""rode bench model=transformer (every contender, through the real CLI), bench's model.*
keys and their old names, and bench.csv's batch_size column (older files: batch)."""
import csv
import json

import pytest

from conftest import compose_config
from runner.cli import renamed_keys

# Every contender of the transformer benchmark, on every method that has an exact adjoint.
TINY = ["model=transformer", "model.heads=2", "width=8", "tokens=4", "batch_size=3",
        "warmup=0", "repeats=1", "memory=false", "progress=false", "threads=1"]
CONTENDERS = ["plain", "backprop", "adjoint", "adjoint_shared", "checkpoint"]
METHODS = ["euler", "rev_heun", "momentum", "coupled"]


def rows_of(run):
    with open(run / "bench.csv") as f:
        return list(csv.DictReader(f))


def test_bench_transformer_runs_every_contender_with_exact_gradients(rode_cli, tmp_path):
    run = tmp_path / "run"
    r = rode_cli("bench", *TINY, "depths=[2]", f"methods=[{','.join(METHODS)}]",
                 f"contenders=[{','.join(CONTENDERS)}]", "dtype=float64", f"hydra.run.dir={run}")
    assert r.code == 0, r.err[-2000:]
    rows = rows_of(run)
    seen = {(x["method"], int(x["depth"]), x["contender"]) for x in rows}
    plain_only_euler = {(m, d, c) for m in METHODS for d in (2,) for c in CONTENDERS
                        if c != "plain" or m == "euler"}
    assert seen == plain_only_euler
    for x in rows:
        assert x["model"] == "transformer" and x["tokens"] == "4" and x["batch_size"] == "3"
        assert float(x["seconds_per_step"]) > 0
        error = float(x["grad_rel_error"])
        exact = x["contender"] in ("plain", "backprop", "checkpoint") or x["method"] != "euler"
        if exact:   # the reversible schemes' adjoint included: rounding level in float64
            assert error < 1e-10, x
        else:       # Euler's adjoint rebuilds x_n approximately
            assert 1e-6 < error < 0.5, x
    summary = json.loads((run / "summary.json").read_text())
    assert summary["config"]["model"]["name"] == "transformer"
    # rev_heun has no plain loop: its time is compared with the plain Euler loop's
    plain = {int(x["depth"]): float(x["seconds_per_step"]) for x in rows
             if x["contender"] == "plain"}
    rev = {int(x["depth"]): float(x["seconds_per_step"]) for x in rows
           if x["contender"] == "adjoint" and x["method"] == "rev_heun"}
    assert summary["ratios"]["rev_heun"]["time_vs_plain"]["adjoint"]["2"] == \
        pytest.approx(rev[2] / plain[2])


def test_bench_builds_the_blocks_and_step_of_rode_train():
    """The same residual functions and step 1/depth as build_transformer (sequential:
    two functions per layer, each a full step)."""
    import torch

    from runner.tasks.bench import build, make_problem
    from runner.transformer import build_transformer

    spec = {"method": "euler", "depth": 3, "width": 8, "batch": 2, "init": "smooth",
            "dtype": "float64", "device": "cpu", "seed": 0, "threads": 1, "compile": False,
            "model": "transformer", "tokens": 4, "heads": 2, "mlp_ratio": 2.0,
            "dropout": 0.0, "block": "sequential"}
    functions, params, x0, _ = make_problem(spec)
    assert x0.shape == (2, 4, 8) and len(functions) == 6
    torch.manual_seed(0)
    net = build_transformer([8], 5, depth=3, width=8, init="smooth", method="euler",
                            grad="backprop", block="sequential", heads=2, mlp_ratio=2.0)
    stack = net.stack.double()
    assert [type(f) for f in stack.functions] == [type(f) for f in functions]
    for name in ["plain", "backprop", "checkpoint", "adjoint"]:
        model = build(name, functions, spec)
        assert getattr(model, "h", None) in (None, stack.step_size), name
    for f, g in zip(stack.functions, functions, strict=True):
        g.load_state_dict(f.state_dict())
    expected = stack(x0)
    for name in ["plain", "backprop", "checkpoint", "adjoint"]:
        assert torch.allclose(build(name, functions, spec)(x0), expected, atol=1e-12), name


@pytest.mark.slow
def test_sequential_blocks_through_the_cli(rode_cli, tmp_path):
    """block=sequential: attention and MLP as two functions per layer (2*depth of them);
    every contender computes the same network, so exact ones agree with backprop."""
    run = tmp_path / "run"
    r = rode_cli("bench", *TINY, "model.block=sequential", "depths=[3]", "methods=[euler,coupled]",
                 "contenders=[plain,backprop,checkpoint,adjoint]", "dtype=float64",
                 f"hydra.run.dir={run}")
    assert r.code == 0, r.err[-2000:]
    rows = rows_of(run)
    assert {x["steps"] for x in rows if x["method"] == "euler"} == {"6"}
    for x in rows:
        if x["contender"] != "adjoint" or x["method"] == "coupled":
            assert float(x["grad_rel_error"]) < 1e-10, x


def slow(*case):
    return pytest.param(*case, marks=pytest.mark.slow)


@pytest.mark.parametrize("overrides, words", [
    (["model=transformer", "model.heads=3"], ["model.heads=3", "width=64"]),
    (["model=conv"], ["model", "mlp, transformer"]),
    (["model=transformer", "depths=[3]", "methods=[coupled]"], ["depths=3", "method=coupled"]),
    slow(["model=transformer", "model.block=nope"], ["model.block", "parallel, sequential"]),
    slow(["model=transformer", "tokens=0"], ["tokens"]),
    slow(["model=transformer", "model.dropout=1.5"], ["model.dropout"]),
    slow(["model=transformer", "model.mlp_ratio=0"], ["model.mlp_ratio"]),
    slow(["model=transformer", "activation=relu"], ["model.activation"]),
    slow(["model.activation=sigmoid"], ["model.activation", "relu, tanh, gelu"]),
])
def test_bad_model_values_are_one_line(rode_cli, tmp_path, overrides, words):
    r = rode_cli("bench", *overrides, f"hydra.run.dir={tmp_path / 'run'}")
    lines = r.err.strip().splitlines()
    assert r.code == 2 and len(lines) == 1, r.err
    for word in words:
        assert word in lines[0], lines[0]
    assert not (tmp_path / "run").exists()


def test_hidden_and_activation_are_old_names_of_model_keys(rode_cli, tmp_path):
    notes = []
    assert renamed_keys("bench", ["hidden=8", "activation=relu"], notes) == \
        ["model.hidden=8", "model.activation=relu"]
    assert "hidden= is now model.hidden=" in notes[0]
    run = tmp_path / "run"
    r = rode_cli("bench", "hidden=5", "activation=relu", "depths=[2]", "methods=[euler]",
                 "contenders=[backprop]", "width=4", "batch_size=3", "warmup=0", "repeats=1",
                 "memory=false", "progress=false", "threads=1", f"hydra.run.dir={run}")
    assert r.code == 0, r.err[-2000:]
    assert "activation= is now model.activation=" in r.err
    config = json.loads((run / "summary.json").read_text())["config"]
    assert config["model"] == {"name": "mlp", "hidden": 5, "activation": "relu"}
    assert "hidden" not in config and "activation" not in config
    # bench's own default: tanh (train's model.activation is relu); the CSV's batch_size
    assert rows_of(run)[0]["batch_size"] == "3"
    assert compose_config("bench", [], tmp_path).model.activation == "tanh"
    assert compose_config("train", [], tmp_path).model.activation == "relu"


def test_report_reads_bench_csv_with_the_old_batch_column(tmp_path):
    """bench.csv files written before batch_size (column `batch`) still report their batch."""
    from runner.io import write_csv
    from runner.reporting import Job
    from runner.tasks.bench import COLUMNS, report_section

    jobs = []
    for name, column in [("new", "batch_size"), ("old", "batch")]:
        rows = [{"depth": 4, "contender": c, "method": "euler", "width": 8, column: 7,
                 "seconds_per_step": 0.01, "peak_bytes": 1e6, "grad_rel_error": 0.0}
                for c in ("backprop", "adjoint")]
        columns = [column if c == "batch_size" else c for c in COLUMNS]
        (tmp_path / name).mkdir()
        write_csv(rows, tmp_path / name / "bench.csv", columns)
        jobs.append(Job(tmp_path / name, name, "bench", "completed"))
    (tmp_path / "figs").mkdir()
    section = report_section(jobs, tmp_path / "figs", [])
    assert "batch_size" in section
    rows = [line for line in section.splitlines() if line.startswith(("| backprop", "| adjoint"))]
    assert len(rows) == 4 and all("| 7 |" in line for line in rows), section


@pytest.mark.slow
def test_dropout_masks_are_the_same_in_the_stack_contenders(rode_cli, tmp_path):
    """model.dropout > 0: backprop, checkpoint and the exact adjoint draw the same masks
    (the stack replays its seeded random state), so their gradients agree; the plain
    loop draws its own: its error is nan, with a note."""
    run = tmp_path / "run"
    r = rode_cli("bench", *TINY, "model.dropout=0.3", "depths=[2]", "methods=[euler,rev_heun]",
                 "contenders=[plain,backprop,checkpoint,adjoint]", "dtype=float64",
                 f"hydra.run.dir={run}")
    assert r.code == 0, r.err[-2000:]
    errors = {(x["method"], x["contender"]): float(x["grad_rel_error"]) for x in rows_of(run)}
    assert errors.pop(("euler", "plain")) != errors[("euler", "backprop")]   # nan
    assert errors.pop(("euler", "adjoint")) > 1e-6
    assert all(e < 1e-10 for e in errors.values()), errors
    notes = json.loads((run / "summary.json").read_text())["notes"]
    assert any("dropout" in n and "plain" in n for n in notes)
