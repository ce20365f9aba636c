"""Renamed keys: the old spelling works with a note; a checkpoint written under the old
names still resumes."""
import json

import torch

from runner import checkpoint
from runner.cli import renamed_keys
from runner.config import upgrade_config

TINY = ["dataset=synthetic", "dataset.num_samples=64", "dataset.val_fraction=0", "monitor=train_loss",
        "depth=2", "width=4", "epochs=1", "batch_size=32", "progress=false", "device=cpu",
        "threads=1"]


def test_old_key_names_work_with_a_note():
    notes = []
    assert renamed_keys("train", ["checkpoint.every_steps=5", "model.weights=x.pth",
                                  "model.depths=[2,2,2,2]", "hooks.recon.batch=8"], notes) == \
        ["save.every_steps=5", "model.pretrained=x.pth", "model.blocks=[2,2,2,2]",
         "hooks.recon.batch_size=8"]
    assert len(notes) == 4 and "checkpoint.every_steps= is now save.every_steps=" in notes[0]
    # where `checkpoint` is an input path it stays one
    assert renamed_keys("finetune", ["checkpoint=run"], notes) == ["checkpoint=run"]
    assert renamed_keys("gradcheck", ["checkpoint=run"], notes) == ["checkpoint=run"]
    assert len(notes) == 4


def test_upgrade_config_moves_old_keys():
    old = {"checkpoint": {"every_steps": 3, "every_minutes": None}, "depth": 4,
           "hooks": {"grad_error": {"every": 0, "batch": 64}},
           "model": {"name": "resnet", "weights": None, "depths": [2, 2, 2, 2]}}
    assert upgrade_config(old) == {"save": {"every_steps": 3, "every_minutes": None}, "depth": 4,
                                   "hooks": {"grad_error": {"every": 0, "batch_size": 64}},
                                   "model": {"name": "resnet", "pretrained": None,
                                             "blocks": [2, 2, 2, 2]}}
    # the stored dict is not changed
    assert "checkpoint" in old and "weights" in old["model"] and "batch" in old["hooks"]["grad_error"]


def test_a_checkpoint_with_the_old_key_names_resumes(rode_cli, tmp_path):
    run = tmp_path / "run"
    assert rode_cli("train", *TINY, "save.every_steps=1", f"hydra.run.dir={run}").code == 0
    # As an older rode wrote it: checkpoint.every_* for what is now save.every_*.
    path = run / "checkpoint.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    state["config"]["checkpoint"] = state["config"].pop("save")
    checkpoint.save({k: v for k, v in state.items() if k != checkpoint.CHECKSUM}, path)
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    r = rode_cli("train", f"resume={run}", "checkpoint.every_steps=2", "threads=1")
    assert r.code == 0 and "test accuracy" in r.out, r.err
    assert "checkpoint.every_steps= is now save.every_steps=" in r.err
    assert "save" in checkpoint.load(path)["config"]                     # read under the new name
