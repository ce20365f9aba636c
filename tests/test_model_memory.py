"""The model memory of a training step (measure.model_memory): in every train summary,
measured without changing the run, used by the accuracy/memory study and its report."""
import json

import pytest
import torch
from torch import nn

from conftest import compose_config, validate_job
from runner import measure
from runner.tasks import train
from runner.tasks.train import pareto_optimal

FAST = ["dataset=synthetic", "dataset.num_samples=400", "epochs=1", "width=16", "progress=false",
        "device=cpu", "threads=1"]


def _summary(tmp_path, *overrides):
    """A train run's summary.json, the task run on its composed and checked config (the
    command line's path to a summary: test_a_real_study_reports_its_pareto_front)."""
    run = tmp_path / "_".join(o.replace("=", "") for o in overrides)
    cfg = compose_config("train", [*FAST, *overrides], run)
    validate_job("train", cfg)
    train.run(cfg)
    return json.loads((run / "summary.json").read_text()), run


def test_adjoint_saved_bytes_stay_flat_in_depth_and_backprops_grow(tmp_path):
    saved = {(grad, depth): _summary(tmp_path, f"grad={grad}", f"depth={depth}")[0]
             for grad in ("adjoint", "backprop") for depth in (4, 32)}
    for s in saved.values():   # the parts add up to the step's model memory
        assert s["model_memory_bytes"] == sum(s[k] for k in measure.MODEL_MEMORY_KEYS[:-1])
        assert s["param_bytes"] == s["grad_bytes"] > 0
        assert s["optimizer_state_bytes"] == 2 * s["param_bytes"]   # Adam: two moments
    bytes_ = {k: s["saved_activation_bytes"] for k, s in saved.items()}
    assert bytes_[("adjoint", 32)] <= bytes_[("adjoint", 4)]
    assert bytes_[("backprop", 32)] > 4 * bytes_[("backprop", 4)]   # 8x the steps
    assert bytes_[("adjoint", 32)] < bytes_[("backprop", 32)] / 8


def test_the_measurement_leaves_the_run_bit_identical(tmp_path, monkeypatch):
    args = ("depth=8",)
    measured, run_a = _summary(tmp_path / "a", *args)
    assert measured["saved_activation_bytes"] > 0
    monkeypatch.setattr(measure, "model_memory", lambda *a, **k: {})
    plain, run_b = _summary(tmp_path / "b", *args)
    assert "model_memory_bytes" not in plain

    def lines(run):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines(run_a) == lines(run_b)
    for key in ("test_acc", "test_loss", "train_loss", "best_metrics"):
        a, b = measured[key], plain[key]
        if isinstance(a, dict):
            a, b = ({k: v for k, v in d.items() if k != "seconds"} for d in (a, b))
        assert a == b
    sa = torch.load(run_a / "checkpoint.pt", weights_only=False)["model"]
    sb = torch.load(run_b / "checkpoint.pt", weights_only=False)["model"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_model_memory_touches_nothing():
    """BatchNorm statistics, dropout's random draws, .grad, modes, optimizer state:
    all as they were; the figures are the tensors' real sizes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Tanh(),
                          nn.Linear(8, 3))
    opt = torch.optim.Adam(model.parameters())
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    moments = [v.clone() for s in opt.state.values() for v in s.values()]
    rng = torch.get_rng_state()
    m = measure.model_memory(model, x, y, optimizer=opt)
    assert torch.equal(torch.get_rng_state(), rng) and not model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in
               zip(moments, [v for s in opt.state.values() for v in s.values()], strict=True))
    n = sum(p.numel() for p in model.parameters())
    assert m["param_bytes"] == m["grad_bytes"] == 4 * n
    assert m["optimizer_state_bytes"] == 2 * 4 * n
    # measured in training mode: BatchNorm and dropout save what a training step saves
    assert m["saved_activation_bytes"] >= 16 * (4 + 8 + 8 + 8) * 4


def test_pareto_optimal():
    points = [(0.9, 100), (0.8, 50), (0.85, 200), (0.9, 150), (0.7, 50), (float("nan"), 1)]
    assert pareto_optimal(points) == [True, True, False, False, False, False]


def test_a_real_study_reports_its_pareto_front(rode_cli, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "study"
    r = rode_cli("-m", "train", "hparams_search=optuna_pareto", "hydra.sweeper.n_trials=2",
                 "depth=choice(2,8)", "lr=choice(0.003)", *FAST, f"hydra.sweep.dir={sweep}")
    assert r.code == 0, r.err
    summaries = [json.loads((d / "summary.json").read_text())
                 for d in sweep.iterdir() if (d / "summary.json").is_file()]
    assert len(summaries) == 2
    points = [(s["best_metrics"]["val_acc"], s["model_memory_bytes"]) for s in summaries]
    front = sum(pareto_optimal(points))
    report = rode_cli("report", str(sweep))
    assert report.code == 0, report.err
    text = (sweep / "report.md").read_text()
    assert f"Pareto-optimal trials ({front} of 2)" in text and "![accuracy vs memory](pareto.png)" in text
    table = text.split("Pareto-optimal trials")[1].split("![accuracy")[0]
    assert sum(line.startswith("| ") and "---" not in line for line in table.splitlines()) == front + 1
    assert (sweep / "pareto.png").stat().st_size > 5000
