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

from ..config import as_list, show_progress
from ..errors import RunFailed
from ..io import fit_slope, plain, write_csv, write_json
from ..plots import plot_linear_increments, plot_linear_weights
from ..reporting import Job, figure_suffixes, fmt, table, table_jobs
from ..stack import ResidualStack
from ..threads import apply as apply_threads

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
def run(cfg) -> dict:
    apply_threads(cfg)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    depths = sorted(set(int(d) for d in as_list(cfg, "depths")))
    target = target_matrix(cfg.dim, cfg.target_scale, torch.Generator().manual_seed(cfg.seed))
    snapshot_steps = {int(s) for s in cfg.snapshots if s <= cfg.steps}

    rows, weights = [], {}
    bar = tqdm(total=len(depths) * cfg.steps, desc="linear", disable=not show_progress(cfg),
               dynamic_ncols=True)
    try:
        for depth in depths:
            # init=iid: a fresh draw per depth (a shared prefix would make the depths alike).
            r, steps, w = train_depth(cfg, depth, target, snapshot_steps,
                                      1_000_003 * (cfg.seed + 1) + depth, bar)
            rows += r
            weights[depth] = (steps, w)
    except RunFailed as e:
        write_json({"status": "failed", "error": str(e),
                    "config": plain(cfg, exclude=["out_dir"])}, out_dir / "summary.json")
        raise
    finally:
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
    shallower = per_depth[:-1]
    summary = {
        "status": "completed", "depths": depths, "target": target.tolist(),
        "per_depth": per_depth,
        "slope_max_increment": fit_slope([p["depth"] for p in per_depth],
                                         [p["max_increment"] for p in per_depth]),
        "slope_limit_gap": fit_slope([p["depth"] for p in shallower],
                                     [p["limit_gap"] for p in shallower]),
        "config": plain(cfg, exclude=["out_dir"]),
    }

    write_csv(rows, out_dir / "linear_metrics.csv",
              ["depth", "step", "loss", "max_increment", "scaled_increment", "max_weight"],
              float_format=".6g")
    np.savez_compressed(out_dir / "linear_weights.npz", target=target.numpy(), **{
        f"{key}_{depth}": value for depth, (steps, w) in weights.items()
        for key, value in (("steps", np.array(steps)), ("weights", w))})
    write_json(summary, out_dir / "summary.json")
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


# ------------------------------------------------------------------ report
def report_section(jobs: list[Job], out: Path, figures: list[str]) -> str:
    found = table_jobs(jobs, "linear_metrics.csv")
    if not found:
        return ""
    text = ["## Linear ResNets: weights along depth during training (`rode linear`)", ""]
    for (job, rows), suffix in zip(found, figure_suffixes([j for j, _ in found]), strict=True):
        inc_name, w_name = f"linear_increments{suffix}.png", f"linear_weights{suffix}.png"
        plot_linear_increments(rows, out / inc_name)
        figures.append(inc_name)
        body = []
        for p in job.summary.get("per_depth", []):
            body.append([p["depth"], p["initial_loss"], p["final_loss"], p["max_increment"],
                         p["max_scaled_increment"], p.get("limit_gap")])
        cfg = job.config
        text += [f"Job `{job.name}` (init={cfg.get('init')}, {cfg.get('steps')} steps, "
                 f"lr={cfg.get('lr')}):", "",
                 table(["N", "loss start", "loss end", "max over n, t of ‖A_{n+1} − A_n‖",
                        "N × that", "gap to next N"], body), "",
                 f"Slopes vs N: max increment {fmt(job.summary.get('slope_max_increment'), 3)}, "
                 f"gap to the next depth {fmt(job.summary.get('slope_limit_gap'), 3)} "
                 f"(smooth in depth: -1 and -1).", "",
                 f"![increments along training]({inc_name})"]
        npz = job.path / "linear_weights.npz"
        if npz.is_file():
            data = np.load(npz)
            depths = sorted(int(key.split("_")[1]) for key in data.files
                            if key.startswith("weights_"))
            if depths:
                n = depths[-1]
                plot_linear_weights({"depth": n, "steps": list(data[f"steps_{n}"]),
                                     "weights": data[f"weights_{n}"]}, out / w_name)
                figures.append(w_name)
                text += ["", f"![weights against depth]({w_name})"]
        text.append("")
    return "\n".join(text)


def report_result(job: Job) -> str:
    per_depth = job.summary.get("per_depth")
    return f"{len(per_depth)} depths" if per_depth is not None else ""
