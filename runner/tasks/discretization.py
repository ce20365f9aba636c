"""rode discretization: how far a ResNet is from the Neural ODE it discretizes, as depth grows.

For a residual function f(x, θ) and weights θ_n, the ResNet of depth N is the
Euler (or Heun) scheme with step 1/N of dx/dt = f(x, θ(t)) when θ_n = θ(n/N).
This task measures ||x_N - x(1)|| / ||x(1)|| for growing N and fits the slope of
log(error) against log(N), for weights that are

- ``constant``: θ(t) = θ_0 (for the linear case x(1) = expm(A) x_0 exactly);
- ``smooth``:   a fixed path made of a few sinusoids, sampled at n/N;
- ``rough``:    a fixed Brownian path (on a grid of ``ref_steps`` cells), sampled at n/N;
- ``iid``:      fresh independent weights per layer, against the ODE whose weights
                interpolate them linearly in t (a different ODE for each N).

Residual functions (``cases``): ``linear`` f(x, A) = A x and ``tanh`` f(x, (W, b)) =
tanh(W x + b). Every case without a closed form is measured against a fine RK4
reference solution. The ResNets are real :class:`ResidualStack` s in float64.

Heun with N functions takes N-1 steps (the paper's convention) and would stop at
t = 1 - 1/N, so here Heun gets N+1 functions θ(0), θ(1/N), ..., θ(1) and step 1/N:
N steps that end at t = 1, as Euler's N steps do.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..config import as_list, show_progress
from ..integrators import INTEGRATORS
from ..io import fit_slope, plain, write_csv, write_json
from ..plots import plot_discretization
from ..reporting import Job, figure_suffixes, num, table, table_jobs
from ..stack import ResidualStack, depth_step
from ..threads import apply as apply_threads

DTYPE = torch.float64
WEIGHTS = ("constant", "smooth", "rough", "iid")
# What the theory predicts for the slope of log(error) vs log(N), for the summary.
EXPECTED = {"constant": "-order", "smooth": "-order",
            "rough": ">= -1: Heun no better than Euler",
            "iid": "about -1/2 when f is nonlinear in θ"}


# ----------------------------------------------------------- residual functions
class Case:
    """A residual function f(x, θ) with θ a flat vector per trial: x (T, B, d), θ (T, P)."""

    name = ""

    def __init__(self, dim: int):
        self.dim = dim

    def num_params(self) -> int:
        raise NotImplementedError

    def std(self, scale: float) -> torch.Tensor:
        """Per-parameter standard deviation of a random θ (entries of W: scale/sqrt(d))."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Linear(Case):
    """f(x, A) = A x: with constant A the ODE's solution is x(1) = expm(A) x_0."""

    name = "linear"

    def num_params(self):
        return self.dim * self.dim

    def std(self, scale):
        return torch.full((self.num_params(),), scale / math.sqrt(self.dim), dtype=DTYPE)

    def matrix(self, theta):
        return theta.view(*theta.shape[:-1], self.dim, self.dim)

    def __call__(self, x, theta):
        return x @ self.matrix(theta).transpose(-1, -2)

    def exact(self, x0, theta):
        """x(1) for constant θ."""
        return x0 @ torch.linalg.matrix_exp(self.matrix(theta)).transpose(-1, -2)


class Tanh(Case):
    """f(x, (W, b)) = tanh(W x + b): a nonlinear residual function (no closed form)."""

    name = "tanh"

    def num_params(self):
        return self.dim * self.dim + self.dim

    def std(self, scale):
        d = self.dim
        return torch.cat([torch.full((d * d,), scale / math.sqrt(d), dtype=DTYPE),
                          torch.full((d,), scale, dtype=DTYPE)])

    def __call__(self, x, theta):
        d = self.dim
        w = theta[..., : d * d].view(*theta.shape[:-1], d, d)
        b = theta[..., d * d:]
        return torch.tanh(x @ w.transpose(-1, -2) + b.unsqueeze(-2))


CASES: dict[str, type[Case]] = {"linear": Linear, "tanh": Tanh}


class Layer(nn.Module):
    """One residual function of the ResNet: x -> f(x, θ_n), θ_n fixed."""

    def __init__(self, case: Case, theta: torch.Tensor):
        super().__init__()
        self.case = case
        self.register_buffer("theta", theta)

    def forward(self, x):
        return self.case(x, self.theta)


# ------------------------------------------------------------------- paths
class WeightPath:
    """θ(t) for t in [0, 1], for all trials at once: ``path(ts)`` has shape (len(ts), T, P)."""

    kinks = 0   # > 0: piecewise linear on a grid of that many cells (RK4 steps must align)

    def __call__(self, ts: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Constant(WeightPath):
    def __init__(self, theta):
        self.theta = theta

    def __call__(self, ts):
        return self.theta.expand(len(ts), *self.theta.shape)


class Sinusoids(WeightPath):
    """θ(t) = c_0 + Σ_k (c_k cos 2πkt + s_k sin 2πkt) / k, normalised so that each
    entry has the variance of a fresh draw: smooth (C^∞) in t."""

    def __init__(self, std, trials, modes, g):
        shape = (trials, len(std))
        norm = math.sqrt(1 + sum(1 / k**2 for k in range(1, modes + 1)))
        self.c0 = torch.randn(shape, generator=g, dtype=DTYPE) * std / norm
        self.coef = [(torch.randn(shape, generator=g, dtype=DTYPE) * std / (k * norm),
                      torch.randn(shape, generator=g, dtype=DTYPE) * std / (k * norm), k)
                     for k in range(1, modes + 1)]

    def __call__(self, ts):
        t = ts.view(-1, 1, 1)
        out = self.c0.expand(len(ts), *self.c0.shape).clone()
        for c, s, k in self.coef:
            out += c * torch.cos(2 * math.pi * k * t) + s * torch.sin(2 * math.pi * k * t)
        return out


class PiecewiseLinear(WeightPath):
    """Linear interpolation between knots at t = j/M, j = 0..M (knots: (M+1, T, P))."""

    def __init__(self, knots):
        self.knots = knots
        self.kinks = len(knots) - 1

    def __call__(self, ts):
        m = self.kinks
        pos = ts * m
        idx = pos.floor().long().clamp(0, m - 1)
        w = (pos - idx).view(-1, 1, 1)
        return (1 - w) * self.knots[idx] + w * self.knots[idx + 1]


def brownian(std, trials, cells, g) -> PiecewiseLinear:
    """θ(t) = (c_0 + W(t)) / sqrt(2), W a Brownian motion (Var W(1) = std²):
    Hölder-1/2 in t, so its samples at n/N are NOT smooth in depth."""
    shape = (trials, len(std))
    c0 = torch.randn(shape, generator=g, dtype=DTYPE) * std
    steps = torch.randn((cells, *shape), generator=g, dtype=DTYPE) * std / math.sqrt(cells)
    walk = torch.cat([torch.zeros(1, *shape, dtype=DTYPE), steps.cumsum(0)])
    return PiecewiseLinear((c0 + walk) / math.sqrt(2))


def iid_knots(std, trials, depth, g) -> PiecewiseLinear:
    """Independent weights θ_0..θ_N at t = n/N, and the ODE path interpolating them."""
    knots = torch.randn((depth + 1, trials, len(std)), generator=g, dtype=DTYPE) * std
    return PiecewiseLinear(knots)


# ----------------------------------------------------------------- solvers
def resnet(case: Case, path: WeightPath, method: str, depth: int, x0: torch.Tensor,
           alpha: float = 1.0) -> torch.Tensor:
    """x_N of the ResNet with θ_n = θ(n/N): a ResidualStack with step 1/N that ends at t=1
    (step N^(-alpha) with ``alpha`` < 1: it ends at t = N^(1-alpha), not at the ODE's t=1)."""
    count = depth + INTEGRATORS[method].min_functions - 1   # Heun: N+1 functions for N steps
    thetas = path(torch.arange(count, dtype=DTYPE) / depth)
    stack = ResidualStack([Layer(case, th) for th in thetas], method, "backprop",
                          step_size=depth_step(depth, alpha), alpha=alpha)
    assert stack.num_steps == depth
    with torch.no_grad():
        return stack(x0)


def rk4(case: Case, path: WeightPath, x0: torch.Tensor, steps: int) -> torch.Tensor:
    """The reference solution x(1): classical RK4 with ``steps`` uniform steps."""
    thetas = path(torch.arange(2 * steps + 1, dtype=DTYPE) / (2 * steps))   # ends and midpoints
    h, x = 1.0 / steps, x0
    for s in range(steps):
        th0, thm, th1 = thetas[2 * s], thetas[2 * s + 1], thetas[2 * s + 2]
        k1 = case(x, th0)
        k2 = case(x + (0.5 * h) * k1, thm)
        k3 = case(x + (0.5 * h) * k2, thm)
        k4 = case(x + h * k3, th1)
        x = x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def reference_steps(path: WeightPath, wanted: int) -> int:
    """At least ``wanted`` RK4 steps, a multiple of the path's grid so that no step straddles a kink."""
    if path.kinks:
        return path.kinks * max(1, math.ceil(wanted / path.kinks))
    return wanted


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over trials and initial points of ||x - ref|| / ||ref||."""
    return (torch.linalg.vector_norm(x - ref, dim=-1)
            / torch.linalg.vector_norm(ref, dim=-1)).mean().item()


# -------------------------------------------------------------------- task
def run(cfg) -> dict:
    apply_threads(cfg)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    depths = sorted(set(int(d) for d in as_list(cfg, "depths")))
    g = torch.Generator().manual_seed(int(cfg.seed))
    rows = []
    jobs = [(c, w) for c in as_list(cfg, "cases") for w in as_list(cfg, "weights")]
    bar = tqdm(total=len(jobs) * len(depths), desc="discretization",
               disable=not show_progress(cfg), dynamic_ncols=True)
    for case_name, weights in jobs:
        case = CASES[case_name](int(cfg.dim))
        std = case.std(float(cfg.scale))
        x0 = torch.randn((cfg.trials, cfg.batch_size, cfg.dim), generator=g, dtype=DTYPE)
        path, ref = None, None
        if weights == "constant":
            path = Constant(torch.randn((cfg.trials, len(std)), generator=g, dtype=DTYPE) * std)
            ref = case.exact(x0, path.theta) if isinstance(case, Linear) else None
        elif weights == "smooth":
            path = Sinusoids(std, cfg.trials, int(cfg.modes), g)
        elif weights == "rough":
            path = brownian(std, cfg.trials, int(cfg.ref_steps), g)
        if path is not None and ref is None:
            ref = rk4(case, path, x0, reference_steps(path, int(cfg.ref_steps)))
        for depth in depths:
            if weights == "iid":   # a new network, hence a new ODE, for every depth
                path = iid_knots(std, cfg.trials, depth, g)
                ref = rk4(case, path, x0, reference_steps(path, int(cfg.ref_steps)))
            for method in as_list(cfg, "methods"):
                out = resnet(case, path, method, depth, x0, float(cfg.get("alpha", 1.0)))
                error = rel_error(out, ref)
                rows.append({"case": case_name, "weights": weights, "method": method,
                             "depth": depth, "error": error})
            bar.update()
    bar.close()

    slopes = []
    for case_name, weights in jobs:
        for method in as_list(cfg, "methods"):
            sel = [r for r in rows if (r["case"], r["weights"], r["method"])
                   == (case_name, weights, method)]
            slope = fit_slope([r["depth"] for r in sel], [r["error"] for r in sel])
            order = INTEGRATORS[method].order
            slopes.append({"case": case_name, "weights": weights, "method": method,
                           "slope": slope, "order": order,
                           "expected": EXPECTED[weights].replace("-order", f"-{order}")})

    write_csv(rows, out_dir / "discretization.csv", ["case", "weights", "method", "depth", "error"],
              float_format=".6g")
    write_csv(slopes, out_dir / "slopes.csv",
              ["case", "weights", "method", "slope", "order", "expected"], float_format=".6g")
    summary = {"status": "completed", "depths": depths, "slopes": slopes,
               "config": plain(cfg, exclude=["out_dir"])}
    write_json(summary, out_dir / "summary.json")
    plot_discretization(rows, out_dir / "discretization.png")

    print(f"rode discretization: log-log slope of ||x_N - x(1)|| / ||x(1)|| over "
          f"N = {depths[0]}..{depths[-1]} -> {out_dir}")
    print(f"  {'case':<7} {'weights':<9} {'method':<6} {'slope':>6}  expected")
    for s in slopes:
        print(f"  {s['case']:<7} {s['weights']:<9} {s['method']:<6} {s['slope']:>6.2f}  "
              f"{s['expected']}")
    return summary


# ------------------------------------------------------------------ report
def report_section(jobs: list[Job], out: Path, figures: list[str]) -> str:
    found = table_jobs(jobs, "discretization.csv")
    if not found:
        return ""
    text = ["## Discretization error vs depth (`rode discretization`)", "",
            "||x_N - x(1)|| / ||x(1)||: the ResNet with θ_n = θ(n/N) against the Neural ODE "
            "(exact for the linear case with constant weights, fine RK4 otherwise)."]
    for (job, rows), suffix in zip(found, figure_suffixes([j for j, _ in found]), strict=True):
        name = f"discretization{suffix}.png"
        plot_discretization(rows, out / name)
        figures.append(name)
        groups = defaultdict(list)
        for r in rows:
            groups[(r.get("case", ""), r["weights"], r["method"])].append(
                (int(r["depth"]), num(r["error"])))
        body = []
        for (case, weights, method), pts in groups.items():
            pts.sort()
            body.append([case, weights, method, f"{pts[0][1]:.3g}", f"{pts[-1][1]:.3g}",
                         f"{fit_slope(*zip(*pts, strict=True)):+.2f}"])
        depths = sorted({p for pts in groups.values() for p, _ in pts})
        text += ["", f"Job `{job.name}`: depths {depths[0]}..{depths[-1]}.", "",
                 table(["case", "weights", "method", f"error N={depths[0]}",
                        f"error N={depths[-1]}", "slope"], body), "",
                 f"![discretization error vs depth]({name})"]
    return "\n".join(text)


def report_result(job: Job) -> str:
    slopes = job.summary.get("slopes")
    return f"{len(slopes)} slopes" if slopes is not None else ""
