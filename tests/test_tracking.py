"""Model selection (validation split, monitor, best.pt, early stopping), provenance,
deterministic mode, the trackers (read back with each library's own reader) and the
Optuna sweeper."""
import json

import pytest
import torch

from conftest import compose_config
from runner import selection
from runner.engine import train

SMALL = ["progress=false", "device=cpu", "depth=4", "width=16", "batch_size=128"]


def lines(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_validation_split_is_seeded_and_disjoint():
    from torch.utils.data import TensorDataset

    from runner.databundle import DataBundle
    data = DataBundle(TensorDataset(torch.arange(100.0)), TensorDataset(torch.zeros(3)), (1,), 2)
    a, b = selection.split_validation(data, 0.1), selection.split_validation(data, 0.1)
    assert len(a.val) == 10 and len(a.train) == 90 and len(a.test) == 3
    assert list(a.val.indices) == list(b.val.indices)
    assert not set(a.val.indices) & set(a.train.indices)


def test_best_epoch_on_validation_and_best_pt(tmp_path):
    cfg = compose_config("train", [*SMALL, "epochs=3"], tmp_path)
    summary = train(cfg)
    epochs = [r for r in lines(tmp_path) if "test_acc" in r]
    assert all({"val_acc", "val_loss"} <= r.keys() for r in epochs)
    best = max(epochs, key=lambda r: r["val_acc"])      # first of the best: strict improvement
    assert summary["monitor"] == "val_acc" and summary["best_epoch"] == best["epoch"]
    assert summary["selected_test_acc"] == best["test_acc"]
    saved = torch.load(tmp_path / "best.pt", weights_only=True)
    assert saved["epoch"] == best["epoch"] and saved["metrics"]["val_acc"] == best["val_acc"]
    prov = summary["provenance"]
    assert {"rode_version", "git_commit", "torch", "torchvision", "hydra", "python", "host",
            "device_name", "command"} <= prov.keys()
    assert prov["torch"] == torch.__version__


def test_early_stopping(tmp_path):
    # lr so small that the loss barely moves: val_loss may still fall, train_loss too;
    # monitor the validation accuracy of a model that cannot learn (lr tiny).
    cfg = compose_config("train", [*SMALL, "epochs=6", "lr=1e-9", "schedule=constant",
                                   "early_stopping.patience=1"], tmp_path)
    summary = train(cfg)
    assert summary["stopped_early"] and summary["epochs_run"] == 2
    assert lines(tmp_path)[-1]["event"] == "early_stopping"


def test_monitor_needs_a_validation_split(rode_cli, tmp_path):
    r = rode_cli("train", "dataset.val_fraction=0", f"hydra.run.dir={tmp_path / 'r'}")
    assert r.code == 2 and "needs a validation split" in r.err and len(r.err.splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_deterministic_mode(tmp_path):
    cfg = compose_config("train", [*SMALL, "epochs=1", "deterministic=true"], tmp_path)
    try:
        train(cfg)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


def test_missing_logger_package_is_refused(rode_cli, tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    r = rode_cli("train", "logger=[tensorboard,wandb]", f"hydra.run.dir={tmp_path / 'r'}")
    assert r.code == 2 and len(r.err.splitlines()) == 1
    assert "pip install 'rode[tracking]'" in r.err and "wandb" in r.err
    assert not (tmp_path / "r").exists()


def test_tensorboard_reads_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = compose_config("train", [*SMALL, "epochs=2", "logger=tensorboard",
                                   "hooks.grad_error.every=10"], tmp_path)
    summary = train(cfg)
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"histograms": 0}).Reload()
    tags = acc.Tags()
    assert [e.value for e in acc.Scalars("val_acc")] == pytest.approx(
        [r["val_acc"] for r in lines(tmp_path) if "val_acc" in r])
    assert "grad_error/layer_rel_error" in tags["histograms"]
    assert "grad_error/layer_rel_error/layer_0" in tags["scalars"]
    assert summary["best_epoch"] in (1, 2)


def test_mlflow_reads_back(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    cfg = compose_config("train", [*SMALL, "epochs=2", "logger=mlflow",
                                   "hooks.grad_error.every=10"], tmp_path)
    summary = train(cfg)
    client = MlflowClient(tracking_uri=f"file:{tmp_path / 'mlruns'}")
    exp = client.get_experiment_by_name("rode")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.params["depth"] == "4" and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "test_acc")
    assert [m.value for m in history] == pytest.approx(
        [r["test_acc"] for r in lines(tmp_path) if "test_acc" in r])
    assert run.data.metrics["summary.selected_test_acc"] == pytest.approx(summary["selected_test_acc"])
    assert "grad_error.layer_rel_error.layer_3" in run.data.metrics


def wandb_records(path):
    """The records of a W&B offline run file, parsed with W&B's own protobuf messages
    (the file is W&B's LevelDB-style log: a 7-byte header, 32 KiB blocks, each record
    a 7-byte header (crc, length, type: full, first, middle, last) and its bytes)."""
    import struct

    from wandb.proto import wandb_internal_pb2
    raw, pos, buf, out = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        buf = data if kind in (1, 2) else buf + data
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            out.append(rec)
    return out


@pytest.mark.slow   # W&B starts its service process: ~20 s
def test_wandb_offline_reads_back_and_resume_keeps_the_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_config("train", [*SMALL, "epochs=2", "logger=wandb"], tmp_path)
    train(cfg)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    run_id = ckpt["tracking"]["wandb_id"]
    (path,) = (tmp_path / "wandb").glob(f"offline-run-*/run-{run_id}.wandb")
    records = wandb_records(path)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.run_id == run_id and "depth" in {i.key for i in run.config.update}
    history = [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [h["val_acc"] for h in history if "val_acc" in h] == pytest.approx(
        [r["val_acc"] for r in lines(tmp_path) if "val_acc" in r])
    # a resumed run continues the same W&B run
    from runner import tracking
    cfg2 = compose_config("train", [*SMALL, "epochs=2", "logger=wandb"], tmp_path / "again")
    trackers = tracking.start(cfg2, tmp_path / "again", {}, ckpt["tracking"])
    assert trackers.state() == {"wandb_id": run_id}
    trackers.close()


@pytest.mark.slow
def test_optuna_study_returns_the_objective(rode_cli, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "study"
    r = rode_cli("-m", "train", "hparams_search=optuna", "hydra.sweeper.n_trials=2", "epochs=1",
                 "depth=choice(4,8)", f"hydra.sweep.dir={sweep}")
    assert r.code == 0, r.err
    results = (sweep / "optimization_results.yaml").read_text()
    values = [json.loads((d / "summary.json").read_text())["best_value"]
              for d in sweep.iterdir() if (d / "summary.json").is_file()]
    assert len(values) == 2 and f"best_value: {max(values)}" in results
    report = rode_cli("report", str(sweep))
    assert report.code == 0 and "Hyperparameter study" in (sweep / "report.md").read_text()


def test_sweeper_syntax_is_validated(rode_cli, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = f"hydra.sweep.dir={tmp_path / 's'}"
    r = rode_cli("-m", "train", "hparams_search=optuna", "lr=interval(-1,0.1)", sweep)
    assert r.code == 2 and r.err.startswith("rode train: error: lr=") and len(r.err.splitlines()) == 1
    r = rode_cli("-m", "train", "hparams_search=optuna", "+hydra.sweeper.params.nope=choice(1,2)", sweep)
    assert r.code == 2 and "unknown key 'nope'" in r.err
    r = rode_cli("-m", "train", "hparams_search=optuna", "method=choice(euler,bogus)", sweep)
    assert r.code == 2 and "bogus" in r.err
    for space in ["depth=interval(4,8)", "hydra.sweeper.params.depth=interval(4,8)"]:
        r = rode_cli("-m", "train", "hparams_search=optuna", space, sweep)
        assert r.code == 2 and len(r.err.splitlines()) == 1
        assert "must be an integer" in r.err and "'depth=int(interval(4, 8))'" in r.err
    assert not (tmp_path / "s").exists()
