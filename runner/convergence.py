"""Where trained weights converge as depth grows: trained ResNets of depth N and 2N
started from the same continuous initial path, compared at the same t.

With ``init=smooth`` and one seed, the stacks of every depth start from samples
θ(n/N) of one path θ(t) (``runner.inits.init_smooth`` draws its two end points
first, whatever N), with the same embedding, head and batch order. After training,
layer n of depth N and layer 2n of depth 2N sit at the same t = n/N. This module
measures, for each such pair in a sweep of `rode train` over depth,

- ``weights``: max_n ||θ^N_n - θ^2N_2n|| / max_n ||θ^2N_2n|| (the residual functions'
  parameters, flattened per layer),
- ``outputs``: ||F_N(x) - F_2N(x)|| / ||F_2N(x)|| (logits on the first 256 test
  examples),

and fits their slope against N (log-log): about -1 is the O(1/N) convergence to a
continuous limit expected with smooth initialization and alpha = 1 (Marion, Wu,
Sander & Biau, ICLR 2024); with i.i.d. initialization or alpha < 1 no such limit
is predicted. The report's section appears for a train sweep with at least three
depths in a doubling chain (N, 2N, 4N) whose runs kept ``checkpoint.pt``.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from .reporting import Job, depth_of, fmt, table

KEYS = ("init", "alpha", "method", "optimizer", "lr", "parametrization", "width", "epochs")
PROBE = 256


def _group(job: Job) -> tuple:
    c = job.config
    return tuple(str(c.get(k, 1.0 if k == "alpha" else None)) for k in KEYS) + (c.get("seed", 0),)


def _label(key: tuple) -> str:
    init, alpha, method = key[0], key[1], key[2]
    return f"init={init}, alpha={float(alpha):g}, {method}, seed={key[-1]}"


def pairs(jobs: list[Job]) -> dict:
    """group -> [(N, job at N, job at 2N)] for completed train jobs with a checkpoint."""
    by = defaultdict(dict)
    for j in jobs:
        d = depth_of(j)
        if j.status == "completed" and d and (j.path / "checkpoint.pt").is_file():
            by[_group(j)][d] = j
    out = {}
    for key, depths in by.items():
        found = [(n, depths[n], depths[2 * n]) for n in sorted(depths) if 2 * n in depths]
        if len(found) >= 2:
            out[key] = found
    return out


def _load(job: Job):
    import torch
    from omegaconf import OmegaConf

    from .data import build_dataset
    from .models import build_model

    ckpt = torch.load(job.path / "checkpoint.pt", map_location="cpu", weights_only=False)
    cfg = OmegaConf.create(ckpt["config"])
    data = build_dataset(cfg.dataset)
    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg, data.input_shape, data.num_classes)
    model.load_state_dict(ckpt["model"])
    model.eval()
    x = torch.stack([data.test[i][0] for i in range(min(PROBE, len(data.test)))])
    return model, x


def distances(small: Job, large: Job) -> tuple[float, float]:
    """(weights, outputs) relative distances between depth N and 2N (see the module)."""
    import torch

    from .stack import ResidualStack

    (a, x), (b, _) = _load(small), _load(large)
    sa = [m for m in a.modules() if isinstance(m, ResidualStack)][0]
    sb = [m for m in b.modules() if isinstance(m, ResidualStack)][0]

    def flat(f):
        return torch.cat([p.detach().reshape(-1) for p in f.parameters()])

    fa, fb = list(sa.functions), list(sb.functions)
    gaps = [float((flat(fa[n]) - flat(fb[2 * n])).norm()) for n in range(len(fa))]
    scale = max(float(flat(f).norm()) for f in fb)
    with torch.no_grad():
        ya, yb = a(x), b(x)
    return max(gaps) / scale, float((ya - yb).norm() / yb.norm())


def slope(ns: list[int], values: list[float]) -> float:
    pts = [(math.log(n), math.log(v)) for n, v in zip(ns, values, strict=True) if v > 0]
    if len(pts) < 2:
        return math.nan
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else math.nan


def section(jobs: list[Job], out: Path, figures: list[str]) -> str:
    found = pairs(jobs)
    if not found:
        return ""
    series, rows, slopes = {}, [], []
    for key, chain in sorted(found.items()):
        points = [(n, *distances(small, large)) for n, small, large in chain]
        series[_label(key)] = points
        for n, w, o in points:
            rows.append([_label(key), f"{n} vs {2 * n}", fmt(w, 3), fmt(o, 3)])
        ns = [p[0] for p in points]
        slopes.append([_label(key), fmt(slope(ns, [p[1] for p in points]), 3),
                       fmt(slope(ns, [p[2] for p in points]), 3), f"{ns[0]}–{ns[-1]}"])
    from .plots import plot_convergence  # matplotlib: only when a report is drawn
    plot_convergence(series, out / "convergence.png")
    figures.append("convergence.png")
    return "\n".join([
        "## Where trained weights converge (`rode train`, depths N and 2N)", "",
        "Relative distance between the trained networks of depth N and 2N started from the "
        "same initial path: weights max_n ||θ^N_n − θ^2N_2n|| / max ||θ^2N||; outputs "
        f"||F_N − F_2N|| / ||F_2N|| on the first {PROBE} test examples.", "",
        table(["series", "depths", "weights", "outputs"], rows), "",
        "Fitted log-log slope against N (about −1: O(1/N), a continuous limit):", "",
        table(["series", "weights slope", "outputs slope", "N"], slopes), "",
        "![distance between depth N and 2N](convergence.png)"])
