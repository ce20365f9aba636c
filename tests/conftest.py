import json
import logging
import os
import sys
from dataclasses import dataclass
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


@dataclass
class Result:
    """What a `rode` command left: its exit code and everything it printed."""

    code: int
    out: str
    err: str


@pytest.fixture
def rode_cli(tmp_path, monkeypatch, capsys):
    """Run `rode <args>` in this process, as the console script would, and return its Result.

        def test_x(rode_cli, tmp_path):
            r = rode_cli("train", "depth=4", f"hydra.run.dir={tmp_path / 'run'}")
            assert r.code == 0 and "test accuracy" in r.out

    It calls ``runner.cli.main(args)`` with the working directory at ``cwd`` (tmp_path
    unless given, so relative outputs/ land there), captures stdout and stderr
    (capsys; output of child processes is not included), turns SystemExit into the
    exit code (0 when main returns), and afterwards clears Hydra's GlobalHydra and
    undoes what a run leaves in this process: the root logger's handlers (Hydra's job
    logging) and torch's thread count. An exception that the command would print as a
    traceback propagates, so the test fails with it.

    A real process is still needed (and used) for: the installed console script, signals
    (SIGTERM/SIGINT and resume), torchrun, and sweeps through the joblib/submitit launchers.
    """
    from hydra.core.global_hydra import GlobalHydra

    from runner import cli

    def run(*args, cwd=None) -> Result:
        monkeypatch.chdir(tmp_path if cwd is None else cwd)
        capsys.readouterr()   # only this command's output
        root = logging.getLogger()
        handlers, level, threads = root.handlers[:], root.level, torch.get_num_threads()
        code, message = 0, ""
        try:
            cli.main([str(a) for a in args])
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:   # sys.exit("message"): Python prints it and exits with 1
                code, message = 1, f"{e.code}\n"
        finally:
            GlobalHydra.instance().clear()
            for handler in root.handlers:
                if handler not in handlers:
                    handler.close()
            root.handlers[:] = handlers
            root.setLevel(level)
            torch.set_num_threads(threads)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err + message)

    return run


def compose_config(task: str, overrides: list[str], out_dir):
    """The real task config, composed as `rode <task> overrides` would, with out_dir set
    (through the pre-flight's composition: Hydra's defaults once per group selection)."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from runner import composing

    GlobalHydra.instance().clear()
    with initialize_config_module("runner.conf", version_base="1.3"):
        cfg = composing.compose(task, [*overrides, f"out_dir={out_dir}"])
    GlobalHydra.instance().clear()
    return cfg


def tanh_block(width: int = 8):
    """A small float64 residual function f(x) = W2 tanh(W1 x + b1) + b2."""
    from runner.models import MLPBlock

    return MLPBlock(width, width, "tanh").double()


def flat_grads(stack, x):
    """Gradients of a fixed scalar loss w.r.t. the input and every parameter, flattened."""
    x = x.clone().requires_grad_(True)
    out = stack(x)
    loss = (out ** 2).sum() + out.sum()
    grads = torch.autograd.grad(loss, [x, *stack.parameters()])
    return torch.cat([g.flatten() for g in grads])


def validate_job(task: str, cfg) -> None:
    """Every check `rode <task>` runs on a job's config before anything is written: the
    schema and rules, then the task's own checks (as runner.cli does)."""
    from runner import config
    from runner.tasks import environment_check

    config.validate(task, cfg, environment=environment_check(task))


# A run that checkpoints, stops and resumes quickly: 1600 training examples, batch 64,
# 25 steps per epoch, no validation split (every step trains).
RESUMABLE_RUN = ["dataset=synthetic", "dataset.val_fraction=0", "monitor=train_loss", "depth=4",
                 "width=16", "epochs=3", "progress=false", "device=cpu"]


def epoch_records(run_dir):
    """The epoch lines of a run's metrics.jsonl, without their wall-clock times."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in lines if "test_acc" in r]
