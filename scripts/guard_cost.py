"""What the adjoint's guard and the kept structure walk cost at depth 1000.

    OMP_NUM_THREADS=1 python scripts/guard_cost.py [--depth 1000] [--rounds 15]

The bench's deep regime (width 64, batch 64, Heun, i.i.d. weights, float32, one
thread: ``rode bench experiment=bench_deep``). Interleaved, one round after another,
each round timing:

- ``walk``: a full walk of the stack's structure (``Structure`` + ``Layout``),
  what every pass paid before the walk was kept;
- ``kept``: checking that the kept walk still holds (``Structure.unchanged``),
  what a pass pays now (once in a backprop pass, twice in an adjoint pass: the
  guard checks it again before the rebuild);
- ``guard``: the rest of the guard in one adjoint pass: the versions of every
  parameter and buffer read three times and the random state twice;
- ``backprop`` and ``adjoint``: one training step (forward + backward) of the
  stack with each grad mode, as the bench times it.

Prints the median of each (and min, max) in ms, and the guard's cost as a share
of the adjoint step.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from runner import ResidualStack
from runner import guard as guard_mod
from runner.models import MLPBlock
from runner.walk import Structure


def timed(f) -> float:
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        f()
        return time.perf_counter() - start
    finally:
        gc.enable()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    functions = [MLPBlock(64, 64, "relu") for _ in range(args.depth)]
    x = torch.randn(64, 64)
    target = torch.randn(64, 64)
    stacks = {g: ResidualStack(functions, "heun", g) for g in ["backprop", "adjoint"]}
    stack = stacks["adjoint"]
    structure, _ = stack.walked()

    def walk():
        Structure(stack)
        stack._layout()

    def guard():
        record = guard_mod.Record(stack, structure)
        state = guard_mod.rng_state(x)
        guard_mod.rng_consumed(state, x)
        record.done()
        list(map(guard_mod._VERSION, record.tensors))

    def step(s):
        def run():
            out = s(x)
            ((out - target).pow(2).sum() / 128).backward()
        return run

    parts = {"walk": walk, "kept": structure.unchanged, "guard": guard,
             "backprop": step(stacks["backprop"]), "adjoint": step(stacks["adjoint"])}
    times: dict[str, list[float]] = {k: [] for k in parts}
    for f in parts.values():   # warm-up
        f()
    for r in range(args.rounds):
        names = list(parts)
        names = names[r % len(names):] + names[:r % len(names)]   # rotate the order
        for name in names:
            times[name].append(timed(parts[name]) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"depth {args.depth}, {len(structure.modules)} modules, "
          f"{len(structure.parameters)} parameters, {args.rounds} interleaved rounds")
    for k, v in times.items():
        print(f"{k:9s} median {med[k]:9.2f} ms   min {min(v):9.2f}   max {max(v):9.2f}")
    cost = 2 * med["kept"] + med["guard"]
    print(f"guard per adjoint pass (2 x kept + guard): {cost:.2f} ms = "
          f"{100 * cost / med['adjoint']:.2f}% of the adjoint step")
    print(f"kept walk saves per pass: {med['walk'] - med['kept']:.2f} ms = "
          f"{100 * (med['walk'] - med['kept']) / med['backprop']:.2f}% of the backprop step")


if __name__ == "__main__":
    main()
