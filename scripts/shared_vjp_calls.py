"""Where the shared vjp's time goes: autograd engine calls per backward pass, and
what one call costs next to one evaluation (docs/benchmarks.md, "The shared vjp's
autograd calls").

    OMP_NUM_THREADS=1 python scripts/shared_vjp_calls.py [--depth 1000] [--repeats 300]

Part 1 counts the vjp calls (each one autograd engine call) of one backward pass of
the adjoint, exact and shared vjp, on `rode bench`'s deep problem (Heun, width 64,
batch 64, tanh MLPs, i.i.d. weights). Part 2 times one 64x64 MLP evaluation
without and with a graph, one residual step x + h f(x) evaluated with a graph and
its vjp taken in one engine call, eight such steps chained in one graph with one
engine call for all eight (the exact vjp's segment; per step), and an engine call
on a one-multiply graph (the call's own overhead). Medians of 5 rounds of
``--repeats`` calls, microseconds of wall time.
"""
import argparse
import statistics
import time

import torch

from runner import gradmodes, integrators
from runner.contenders import CONTENDERS
from runner.models import MLPBlock
from runner.tasks.bench import make_problem


def count_calls(depth: int) -> dict[str, int]:
    spec = dict(dtype="float32", device="cpu", seed=0, width=64, hidden=None,
                activation="tanh", init="iid", depth=depth, batch=64)
    functions, params, x0, target = make_problem(spec)
    counts = {}
    calls = [0]
    inner = integrators.vjp

    def counted(*args):
        calls[0] += 1
        return inner(*args)

    integrators.vjp = gradmodes._vjp = counted
    try:
        for name in ("adjoint", "adjoint_shared"):
            model = CONTENDERS[name].build(functions, "heun", compile=False)
            out = model(x0)
            loss = (out - target).pow(2).sum()
            calls[0] = 0
            loss.backward()
            counts[name] = calls[0]
    finally:
        integrators.vjp = gradmodes._vjp = inner
    return counts


def per_call(repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    f = MLPBlock(64, 64, "tanh")
    params = list(f.parameters())
    x, g = torch.randn(64, 64), torch.randn(64, 64)
    vjp = integrators.vjp

    def trivial():
        xi = x.detach().requires_grad_(True)
        with torch.enable_grad():
            y = xi * 2.0
        return vjp(y, [xi], g)

    def no_graph():
        with torch.no_grad():
            return f(x)

    def graph():
        xi = x.detach().requires_grad_(True)
        with torch.enable_grad():
            return f(xi)

    def eval_vjp():
        xi = x.detach().requires_grad_(True)
        with torch.enable_grad():
            k = xi + 0.01 * f(xi)
        return vjp(k, [xi, *params], g)

    def chained8():
        xi = x.detach().requires_grad_(True)
        k = xi
        with torch.enable_grad():
            for _ in range(8):
                k = k + 0.01 * f(k)
        return vjp(k, [xi, *params], g)

    cases = {"engine call, one-multiply graph": (trivial, 1),
             "evaluation, no graph": (no_graph, 1),
             "evaluation with a graph": (graph, 1),
             "one step x + h f(x) and its vjp (one call)": (eval_vjp, 1),
             "8 chained steps and one call, per step": (chained8, 8)}
    out = {}
    for name, (fn, per) in cases.items():
        rounds = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            rounds.append((time.perf_counter() - start) / repeats / per * 1e6)
        out[name] = statistics.median(rounds)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name, n in count_calls(args.depth).items():
        print(f"{name:16s} engine calls per backward pass (Heun, depth {args.depth}): {n}")
    for name, us in per_call(args.repeats).items():
        print(f"{name:50s} {us:8.1f} us")


if __name__ == "__main__":
    main()
