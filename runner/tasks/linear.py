"""rode linear: implicit regularisation of linear ResNets (claim 2 of the paper).

Train the linear ResNet x -> (I + A_{N-1}/N) ... (I + A_0/N) x toward a target
matrix B by full-batch gradient descent on L = ½ ||P - B||_F², for several depths
N, from a smooth start (all A_n = 0) or, for contrast, from i.i.d. weights. Along
optimisation it logs max_n ||A_{n+1} - A_n|| and N times it: the theory says the
weights stay smooth in depth, so N · max_n ||A_{n+1} - A_n|| stays bounded
uniformly in N and in time. It also measures how far each depth's trained
weights are from the next (deeper) one's at the same t = n/N: that distance
falls like 1/N when the trained ResNets converge to a limit Neural ODE.

The network is a real :class:`ResidualStack` of bias-free ``nn.Linear`` layers
in float64 (``method``/``grad`` choose the integrator and the gradient mode).
The step on A_n is ``lr · N · dL/dA_n``: dL/dA_n is O(1/N), so this is the
depth-independent scaling (the authors' lr 100 at N = 100 is lr = 1 here).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..config import (MAX_DEPTH, as_list, check_bool, check_choice, check_float, check_int,
                      check_int_list, show_progress)
from ..engine import write_json
from ..errors import ConfigError, RunFailed
from ..gradmodes import GRAD_MODES
from ..integrators import INTEGRATORS
from ..stack import ResidualStack

DTYPE = torch.float64
INITS = ("zero", "iid")


def target_matrix(dim: int, scale: float, g: torch.Generator) -> torch.Tensor:
    """B = I + scale · G with G standard Gaussian, redrawn until det(B) > 0: the
    products of matrices I + A/N close to I have positive determinant."""
    while True:
        b = torch.eye(dim, dtype=DTYPE) + scale * torch.randn(dim, dim, generator=g, dtype=DTYPE)
        if torch.linalg.det(b) > 0:
            return b


def build(cfg, depth: int, g: torch.Generator) -> ResidualStack:
    layers = []
    for _ in range(depth):
        layer = nn.Linear(cfg.dim, cfg.dim, bias=False).to(DTYPE)
        with torch.no_grad():
            if cfg.init == "zero":
                layer.weight.zero_()
            else:   # i.i.d. per layer: NOT smooth in depth
                layer.weight.copy_(cfg.init_scale * torch.randn(
                    cfg.dim, cfg.dim, generator=g, dtype=DTYPE) / cfg.dim ** 0.5)
        layers.append(layer)
    return ResidualStack(layers, cfg.method, cfg.grad)


def weights_of(stack: ResidualStack) -> torch.Tensor:
    """(N, d, d): A_n for every layer."""
    return torch.stack([f.weight.detach() for f in stack.functions])


def max_increment(w: torch.Tensor) -> float:
    if len(w) < 2:
        return 0.0
    return torch.linalg.matrix_norm(w[1:] - w[:-1]).max().item()


def train_depth(cfg, depth: int, target: torch.Tensor, snapshot_steps: set[int],
                seed: int, bar: tqdm) -> tuple[list[dict], list[int], np.ndarray]:
    """Gradient descent at one depth -> (metric rows, snapshot steps, weights (S, N, d, d))."""
    g = torch.Generator().manual_seed(seed)
    stack = build(cfg, depth, g)
    eye = torch.eye(cfg.dim, dtype=DTYPE)
    optimizer = torch.optim.SGD(stack.parameters(), lr=cfg.lr * depth)
    rows, snap_steps, snaps = [], [], []
    for step in range(cfg.steps + 1):
        # Rows of the input are the basis vectors, so the output's rows are those of P^T.
        loss = 0.5 * ((stack(eye) - target.T) ** 2).sum()
        if not torch.isfinite(loss):
            raise RunFailed(f"loss became {loss.item()} at depth {depth}, step {step}; "
                            f"try a smaller lr (lr={cfg.lr})")
        if step % cfg.log_every == 0 or step == cfg.steps:
            w = weights_of(stack)
            inc = max_increment(w)
            rows.append({"depth": depth, "step": step, "loss": loss.item(),
                         "max_increment": inc, "scaled_increment": depth * inc,
                         "max_weight": torch.linalg.matrix_norm(w).max().item()})
        if step in snapshot_steps or step == cfg.steps:
            snap_steps.append(step)
            snaps.append(weights_of(stack).numpy().copy())
        if step == cfg.steps:
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.update()
    return rows, snap_steps, np.stack(snaps)


def limit_gap(w: np.ndarray, w_ref: np.ndarray) -> float:
    """max_n ||A^(N)_n - A^(M)(n/N)||: distance to a deeper run's weights, read at
    the same t = n/N (linear interpolation between its layers when M/N is not an integer)."""
    n, m = len(w), len(w_ref)
    pos = np.arange(n) * m / n
    lo = np.clip(np.floor(pos).astype(int), 0, m - 1)
    hi = np.clip(lo + 1, 0, m - 1)
    frac = (pos - lo)[:, None, None]
    ref = (1 - frac) * w_ref[lo] + frac * w_ref[hi]
    return float(np.linalg.norm(w - ref, axis=(1, 2)).max())


# -------------------------------------------------------------------- task
def validate(cfg) -> None:
    method = check_choice(cfg, "method", INTEGRATORS)
    check_choice(cfg, "grad", GRAD_MODES)
    check_choice(cfg, "init", INITS)
    low = INTEGRATORS[method].min_functions
    check_int_list(cfg, "depths", low, MAX_DEPTH, f" (method={method})")
    check_int(cfg, "dim", 1, 64)
    check_int(cfg, "steps", 1)
    check_int(cfg, "log_every", 1)
    check_int(cfg, "seed", 0)
    check_float(cfg, "lr", positive=True)
    check_float(cfg, "target_scale", 0.0)
    check_float(cfg, "init_scale", 0.0)
    snaps = cfg.snapshots
    if isinstance(snaps, (str, int)) or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in snaps):
        raise ConfigError(f"snapshots={snaps!r} must be a list of optimisation steps >= 0, "
                          f"e.g. snapshots=[0,10,100]")
    check_bool(cfg, "progress")


def run(cfg) -> dict:
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    depths = sorted(set(int(d) for d in as_list(cfg, "depths")))
    target = target_matrix(cfg.dim, cfg.target_scale, torch.Generator().manual_seed(cfg.seed))
    snapshot_steps = {int(s) for s in cfg.snapshots if s <= cfg.steps}

    rows, weights = [], {}
    bar = tqdm(total=len(depths) * cfg.steps, desc="linear", disable=not show_progress(cfg),
               dynamic_ncols=True)
    for depth in depths:
        # init=iid: a fresh draw per depth (a shared prefix would make the depths alike).
        r, steps, w = train_depth(cfg, depth, target, snapshot_steps,
                                  1_000_003 * (cfg.seed + 1) + depth, bar)
        rows += r
        weights[depth] = (steps, w)
    bar.close()

    deepest = depths[-1]
    per_depth = []
    for k, depth in enumerate(depths):
        r = [x for x in rows if x["depth"] == depth]
        deeper = depths[min(k + 1, len(depths) - 1)]
        per_depth.append({
            "depth": depth, "final_loss": r[-1]["loss"], "initial_loss": r[0]["loss"],
            "max_increment": max(x["max_increment"] for x in r),
            "max_scaled_increment": max(x["scaled_increment"] for x in r),
            # Cauchy test of convergence to a limit ODE: distance to the next depth.
            "limit_gap": limit_gap(weights[depth][1][-1], weights[deeper][1][-1])
            if deeper != depth else None,
        })
    from .discretization import fit_slope, write_csv
    shallower = per_depth[:-1]
    summary = {
        "status": "completed", "depths": depths, "target": target.tolist(),
        "per_depth": per_depth,
        "slope_max_increment": fit_slope([p["depth"] for p in per_depth],
                                         [p["max_increment"] for p in per_depth]),
        "slope_limit_gap": fit_slope([p["depth"] for p in shallower],
                                     [p["limit_gap"] for p in shallower]),
        "config": _plain(cfg),
    }
    summary["config"].pop("out_dir", None)

    write_csv(out_dir / "linear_metrics.csv", rows,
              ["depth", "step", "loss", "max_increment", "scaled_increment", "max_weight"])
    np.savez_compressed(out_dir / "linear_weights.npz", target=target.numpy(), **{
        f"{key}_{depth}": value for depth, (steps, w) in weights.items()
        for key, value in (("steps", np.array(steps)), ("weights", w))})
    write_json(summary, out_dir / "summary.json")
    from ..plots import plot_linear_increments, plot_linear_weights
    plot_linear_increments(rows, out_dir / "linear_increments.png")
    steps, w = weights[deepest]
    plot_linear_weights({"depth": deepest, "steps": steps, "weights": w},
                        out_dir / "linear_weights.png")

    print(f"rode linear: {cfg.steps} steps of gradient descent (init={cfg.init}) -> {out_dir}")
    print(f"  {'N':>5} {'loss start':>10} {'loss end':>10} {'max|ΔA|':>9} {'N·max|ΔA|':>10} "
          f"{'gap to next N':>13}")
    for p in per_depth:
        gap = "" if p["limit_gap"] is None else f"{p['limit_gap']:.3g}"
        print(f"  {p['depth']:>5} {p['initial_loss']:>10.4g} {p['final_loss']:>10.3g} "
              f"{p['max_increment']:>9.3g} {p['max_scaled_increment']:>10.3g} {gap:>13}")
    print(f"  log-log slope vs N: max|ΔA| {summary['slope_max_increment']:+.2f}, "
          f"gap to the next depth {summary['slope_limit_gap']:+.2f} (smooth in depth: -1, -1)")
    return summary


def _plain(cfg) -> dict:
    from omegaconf import OmegaConf
    return OmegaConf.to_container(cfg, resolve=True)
