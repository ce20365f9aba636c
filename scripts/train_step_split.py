"""Split a `rode train` step: the whole step vs the residual stack's own step.

    OMP_NUM_THREADS=1 python scripts/train_step_split.py train depth=1000 method=heun \
        threads=1 epochs=1 grad=backprop progress=false device=cpu out_dir=/tmp/split

Runs the training command as given, with a hook that, between two training steps,
times the stack alone (forward + backward of model.stack on the embedded batch, same
model, same shapes); that time is left out of the step-to-step time. Prints medians
and their ratio, and the time of the loop's other pieces.
"""
import functools
import statistics
import sys
import time

import torch

from runner import checkpoint, cli, engine, optim, selection
from runner.hooks.base import Hook

TIMES: dict[str, list[float]] = {}


def timed(owner, name: str, key) -> None:
    """Time every call of ``owner.name`` under ``key`` (a function of the call's
    arguments for optimizer steps: whose step it is)."""
    f = getattr(owner, name)

    @functools.wraps(f)
    def wrapper(*a, **k):
        start = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            TIMES.setdefault(key(*a) if callable(key) else key, []).append(
                time.perf_counter() - start)
    setattr(owner, name, wrapper)


def step_key(optimizer, *args) -> str:
    """'adam.step', 'sgd.step': the torch optimizer doing the arithmetic."""
    return f"{type(getattr(optimizer, 'inner', optimizer)).__name__.lower()}.step"


for owner, name in [(engine, "evaluate"), (checkpoint, "save"), (selection, "save_best"),
                    (torch.optim.Optimizer, "zero_grad")]:
    timed(owner, name, name)
# The optimizer's whole step: gathering the gradients, then the torch optimizer's
# step over the flat buffers.
timed(optim.FlatOptimizer, "step", step_key)

marks, stack_times, hook_times = [], [], []


class StackClock(Hook):
    name = "stack_clock"

    def on_step_end(self, run):
        start = time.perf_counter()
        marks.append(start)
        run.optimizer.zero_grad(set_to_none=True)
        x = run.probe_batch(run.cfg.batch_size)[0]
        with torch.no_grad():
            h = run.model.embed(x)
        h.requires_grad_(True)
        s = time.perf_counter()
        run.model.stack(h).sum().backward()
        stack_times.append(time.perf_counter() - s)
        hook_times.append(time.perf_counter() - start)


_train = engine._train
engine._train = lambda cfg, hooks, *a: _train(cfg, [StackClock()], *a)
try:
    cli.main(sys.argv[1:])
except SystemExit:
    pass
steps = [b - a - h for a, b, h in zip(marks, marks[1:], hook_times, strict=False)]
step, stack = statistics.median(steps), statistics.median(stack_times)
print(f"step (median of {len(steps)}) {step:.3f} s   stack alone {stack:.3f} s   "
      f"ratio {step / stack:.3f}")
for key, values in TIMES.items():
    if key == "zero_grad":
        values = values[1::2]   # the loop's own (the hook calls it too)
    print(f"  {key:10s} median {statistics.median(values) * 1e3:7.1f} ms  x{len(values)}")
