import os
import sys
from pathlib import Path

# Tiny models in tests: one thread is faster than two and does not fight other
# processes; subprocesses (the real `rode` command) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RODE = [sys.executable, "-m", "runner"]


@pytest.fixture(autouse=True, scope="session")
def _threads():
    # Tiny models: one thread is faster than two and does not fight other processes.
    torch.set_num_threads(1)


def compose_config(task: str, overrides: list[str], out_dir) -> "DictConfig":
    """The real task config, composed as `rode <task> overrides` would, with out_dir set."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module("runner.conf", version_base="1.3"):
        cfg = compose(config_name=task, overrides=[*overrides, f"out_dir={out_dir}"])
    GlobalHydra.instance().clear()
    return cfg
