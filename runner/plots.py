"""The figures of `rode report` and of the tasks that draw their own (matplotlib, Agg).

Each function takes plain rows (dicts, as read from the CSV files) and a PNG path.
Depth is always on a log2 axis; errors on a log axis with fitted slopes in the legend.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")   # files only, never a window (and no display on clusters)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from .io import fit_slope  # noqa: E402

DPI = 100
PANEL = (4.6, 3.4)
COLORS = {"euler": "tab:blue", "heun": "tab:orange"}
LINESTYLES = {"backprop": "-", "adjoint": "--"}


def _panels(n: int, title: str | None = None):
    fig, axes = plt.subplots(1, n, figsize=(PANEL[0] * n, PANEL[1]), squeeze=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig, list(axes[0])


def _depth_axis(ax, depths) -> None:
    ax.set_xscale("log", base=2)
    ticks = sorted(set(int(d) for d in depths))
    if 0 < len(ticks) <= 12:
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
    ax.set_xlabel("depth N")
    ax.grid(True, which="major", alpha=0.3)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.canvas.draw()
    # A 256-colour palette: line plots lose nothing visible and the file is ~4x smaller.
    image = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())).convert("RGB")
    image.quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    plt.close(fig)
    return Path(path)


def _style(label: str) -> dict:
    """Colour by integrator, line style by gradient mode, when the label names them."""
    words = label.replace(",", " ").replace("/", " ").split()
    style = {}
    for w in words:
        if w in COLORS:
            style["color"] = COLORS[w]
        if w in LINESTYLES:
            style["linestyle"] = LINESTYLES[w]
    return style


# ----------------------------------------------------------- discretization
def plot_discretization(rows: list[dict], path: Path) -> Path:
    """rows: case, weights, method, depth, error. One panel per residual function."""
    cases = list(dict.fromkeys(r.get("case", "") for r in rows))
    fig, axes = _panels(len(cases), "ResNet vs Neural ODE: ||x_N - x(1)|| / ||x(1)||")
    colors = {"constant": "tab:green", "smooth": "tab:blue", "rough": "tab:red", "iid": "tab:gray"}
    for ax, case in zip(axes, cases, strict=True):
        groups = defaultdict(list)
        for r in rows:
            if r.get("case", "") == case:
                groups[(r["weights"], r["method"])].append((int(r["depth"]), float(r["error"])))
        for (weights, method), pts in groups.items():
            pts.sort()
            d, e = zip(*pts, strict=True)
            ax.plot(d, e, marker="o", ms=3, color=colors.get(weights),
                    linestyle="-" if method == "euler" else "--",
                    label=f"{weights} {method} ({fit_slope(d, e):+.2f})")
        _depth_axis(ax, [r["depth"] for r in rows])
        ax.set_yscale("log")
        ax.set_ylabel("relative error")
        ax.set_title(f"f = {case}" if case else "", fontsize=9)
        ax.legend(fontsize=7, title="weights method (slope)", title_fontsize=7,
                  loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.set_size_inches(PANEL[0] * 1.45 * len(cases), PANEL[1])
    return _save(fig, path)


# ------------------------------------------------------------------- linear
def plot_linear_weights(snapshots: dict, path: Path, max_entries: int = 4) -> Path:
    """snapshots: {"depth": N, "steps": [s...], "weights": array (S, N, d, d)}.
    A_n[i, j] against t = n/N, one panel per optimisation step."""
    w = np.asarray(snapshots["weights"])
    steps, depth = snapshots["steps"], int(snapshots["depth"])
    fig, axes = _panels(len(steps), f"linear ResNet, N = {depth}: weights A_n against depth")
    fig.set_size_inches(3.3 * len(steps), PANEL[1])
    t = np.arange(depth) / depth
    d = w.shape[-1]
    entries = [(i, j) for i in range(d) for j in range(d)][:max_entries]
    lo, hi = float(w.min()), float(w.max())
    pad = 0.05 * (hi - lo or 1.0)
    for ax, s, ws in zip(axes, steps, w, strict=True):
        for i, j in entries:
            ax.plot(t, ws[:, i, j], lw=1.2, label=f"A[{i},{j}]")
        ax.set_title(f"step {s}", fontsize=9)
        ax.set_xlabel("n / N")
        ax.set_ylim(lo - pad, hi + pad)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("weight")
    axes[-1].legend(fontsize=7)
    return _save(fig, path)


def plot_linear_increments(rows: list[dict], path: Path) -> Path:
    """rows: depth, step, loss, max_increment, scaled_increment (N · max_n ||A_{n+1} - A_n||)."""
    fig, axes = _panels(3, "linear ResNet: smoothness of the weights along training")
    by_depth = defaultdict(list)
    for r in rows:
        by_depth[int(r["depth"])].append(r)
    cmap = plt.get_cmap("viridis")
    for k, (depth, rs) in enumerate(sorted(by_depth.items())):
        rs.sort(key=lambda r: int(r["step"]))
        steps = [int(r["step"]) for r in rs]
        color = cmap(k / max(1, len(by_depth) - 1))
        axes[0].plot(steps, [float(r["loss"]) for r in rs], color=color, label=f"N={depth}")
        axes[1].plot(steps, [float(r["max_increment"]) for r in rs], color=color)
        axes[2].plot(steps, [float(r["scaled_increment"]) for r in rs], color=color)
    names = ["loss", "max_n ||A_{n+1} - A_n||", "N · max_n ||A_{n+1} - A_n||"]
    for ax, name in zip(axes, names, strict=True):
        ax.set_xlabel("optimisation step")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    return _save(fig, path)


# ----------------------------------------------------------- train sweeps
def _by_panel(series: dict) -> dict:
    """'euler adjoint | init=iid' -> panel 'init=iid', line 'euler adjoint'."""
    panels = defaultdict(dict)
    for label, pts in series.items():
        line, _, panel = label.partition(" | ")
        panels[panel][line] = pts
    return dict(sorted(panels.items()))


def plot_test_error(series: dict[str, list[tuple]], path: Path) -> Path:
    """series: label -> [(depth, median, lowest, highest, seeds)], spread over seeds as a band.
    A label 'line | panel' puts the line in the panel of that name (other sweep axes)."""
    panels = _by_panel(series)
    fig, axes = _panels(len(panels), "test error vs depth (median over seeds, band: min-max)")
    for ax, (panel, lines) in zip(axes, panels.items(), strict=True):
        depths = []
        for label, pts in lines.items():
            pts = sorted(pts)
            d, med, lo, hi = (np.array([p[k] for p in pts], dtype=float) for k in range(4))
            depths += list(d)
            line, = ax.plot(d, 100 * med, marker="o", ms=3, label=label, **_style(label))
            if any(p[4] > 1 for p in pts):
                ax.fill_between(d, 100 * lo, 100 * hi, color=line.get_color(), alpha=0.12)
        _depth_axis(ax, depths)
        ax.set_ylabel("test error (%)")
        ax.set_title(panel, fontsize=9)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_grad_error(series: dict[str, list[tuple]], path: Path) -> Path:
    """series: label -> [(depth, error, lowest, highest)] (spread over layers), log-log.
    A label 'line | panel' puts the line in the panel of that name."""
    panels = _by_panel(series)
    fig, axes = _panels(len(panels), "adjoint vs backprop: relative gradient error "
                                     "(band: lowest to highest layer)")
    for ax, (panel, lines) in zip(axes, panels.items(), strict=True):
        depths = []
        for label, pts in lines.items():
            pts = sorted(pts)
            d, e, lo, hi = (np.array([p[k] for p in pts], dtype=float) for k in range(4))
            depths += list(d)
            line, = ax.plot(d, e, marker="o", ms=3,
                            label=f"{label} (slope {fit_slope(d, e):+.2f})", **_style(label))
            ax.fill_between(d, lo, hi, color=line.get_color(), alpha=0.12)
        _depth_axis(ax, depths)
        ax.set_yscale("log")
        ax.set_ylabel("||g_adj - g_bp|| / ||g_bp||")
        ax.set_title(panel, fontsize=9)
        ax.legend(fontsize=7)
    if len(axes) > 1:   # same y range everywhere, so that panels compare at a glance
        lo = min(ax.get_ylim()[0] for ax in axes)
        hi = max(ax.get_ylim()[1] for ax in axes)
        for ax in axes:
            ax.set_ylim(lo, hi)
    return _save(fig, path)


def _per_depth_panels(rows, key_fields, panels, title, path, style=_style) -> Path:
    """rows grouped into lines by key_fields; one panel per (column, y label, factor, y scale)."""
    fig, axes = _panels(len(panels), title)
    groups = defaultdict(list)
    for r in rows:
        groups[" ".join(str(r.get(k, "")) for k in key_fields)].append(r)
    for label, rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: int(r["depth"]))
        d = [int(r["depth"]) for r in rs]
        for ax, (col, _, factor, _) in zip(axes, panels, strict=True):
            ys = [_num(r.get(col)) * factor for r in rs]
            if all(math.isnan(y) for y in ys):
                continue
            ax.plot(d, ys, marker="o", ms=3, label=label, **style(label))
    for ax, (_, ylabel, _, yscale) in zip(axes, panels, strict=True):
        _depth_axis(ax, [r["depth"] for r in rows])
        ax.set_ylabel(ylabel)
        if not ax.lines:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.set_yscale(yscale)
        if yscale == "linear":
            ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def plot_memory(rows: list[dict], path: Path) -> Path:
    """rows: depth, grad, method, saved_bytes, peak_bytes, seconds_per_step."""
    mib = 1 / 2**20
    return _per_depth_panels(rows, ["method", "grad"], [
        ("saved_bytes", "activations saved for backward (MiB)", mib, "log"),
        ("peak_bytes", "peak memory of a step (MiB)", mib, "log"),
        ("seconds_per_step", "seconds per step", 1.0, "log")],
        "memory vs depth (log-log: slope 1 = linear in depth, 0 = flat)", path)


def plot_bench(rows: list[dict], path: Path) -> Path:
    """rows: depth, contender, method, width, batch, seconds_per_step, peak_bytes, grad_rel_error."""
    contenders = list(dict.fromkeys(str(r.get("contender")) for r in rows))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def style(label):   # colour by contender, line style by integrator
        contender, _, method = label.partition(" ")
        return {"color": cycle[contenders.index(contender) % len(cycle)],
                "linestyle": "--" if method == "heun" else "-"}

    return _per_depth_panels(rows, ["contender", "method"], [
        ("seconds_per_step", "seconds per training step", 1.0, "log"),
        ("peak_bytes", "peak memory (MiB)", 1 / 2**20, "log"),
        ("grad_rel_error", "gradient error vs backprop", 1.0, "log")],
        "benchmark: one training step vs depth", path, style)


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


# ------------------------------------------------------------------- transfer
def plot_transfer(curves: dict, path: Path, name=str) -> Path:
    """Loss against lr (log-log), one curve per depth, one panel per (optimizer,
    parametrization, alpha): ``curves[panel][depth] = [(lr, loss, diverged, seeds)]``
    (loss: the median over seeds; inf when most seeds diverged, drawn as a cross at
    the panel's top)."""
    panels = sorted(curves)
    alphas = sorted({p[2] for p in panels}, reverse=True)
    rows = sorted({p[:2] for p in panels})
    fig, axes = plt.subplots(len(rows), len(alphas), squeeze=False,
                             figsize=(PANEL[0] * len(alphas), PANEL[1] * len(rows)))
    depths = sorted({d for c in curves.values() for d in c})
    cmap = plt.get_cmap("viridis")
    colour = {d: cmap(i / max(1, len(depths) - 1)) for i, d in enumerate(depths)}
    for r, row in enumerate(rows):
        for c, alpha in enumerate(alphas):
            ax = axes[r][c]
            panel = (*row, alpha)
            if panel not in curves:
                ax.set_visible(False)
                continue
            finite = [v for d in curves[panel].values() for _, v, _, _ in d if math.isfinite(v)]
            top = max(finite) * 1.5 if finite else 10.0
            for depth, curve in sorted(curves[panel].items()):
                xs = [lr for lr, _, _, _ in curve]
                ys = [v if math.isfinite(v) else np.nan for _, v, _, _ in curve]
                ax.plot(xs, ys, marker="o", ms=3, color=colour[depth], label=f"N={depth}")
                gone = [lr for lr, v, _, _ in curve if not math.isfinite(v)]
                if gone:
                    ax.plot(gone, [top] * len(gone), "x", color=colour[depth], ms=6)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("lr")
            ax.set_ylabel("training loss")
            ax.set_title(name(panel), fontsize=9)
            ax.grid(True, which="major", alpha=0.3)
            ax.legend(fontsize=7)
    return _save(fig, path)


# ---------------------------------------------------------------- convergence
def plot_convergence(series: dict[str, list[tuple]], path: Path) -> Path:
    """Weights and outputs distance between depth N and 2N against N (log-log), one
    line per series (``series[label] = [(N, weights, outputs)]``), slopes in the legend."""
    fig, axes = _panels(2)
    for ax, k, title in ((axes[0], 1, "trained weights, N vs 2N"),
                         (axes[1], 2, "outputs, N vs 2N")):
        ns = set()
        for label, points in sorted(series.items()):
            xs = [p[0] for p in points]
            ys = [p[k] for p in points]
            ns.update(xs)
            ax.plot(xs, ys, marker="o", label=f"{label} (slope {fit_slope(xs, ys):.2f})")
        _depth_axis(ax, ns)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("relative distance")
        ax.legend(fontsize=6)
    return _save(fig, path)


def plot_pareto(points: list[dict], path: Path, memory_label: str = "model memory of a step") -> Path:
    """An accuracy/memory study: one point per trial, memory (bytes, log x) against
    validation accuracy; colour: grad mode (and vjp), marker: method; Pareto-optimal
    trials circled and joined as the front. points: dicts with ``memory``, ``acc``,
    ``grad``, ``method``, ``pareto``."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    grads = sorted({p["grad"] for p in points})
    methods = sorted({p["method"] for p in points})
    colours = {g: f"C{i}" for i, g in enumerate(grads)}
    markers = {m: "osD^v<>pP*X"[i % 11] for i, m in enumerate(methods)}
    for g in grads:
        for m in methods:
            pts = [p for p in points if p["grad"] == g and p["method"] == m]
            if pts:
                ax.scatter([p["memory"] for p in pts], [100 * p["acc"] for p in pts],
                           c=colours[g], marker=markers[m], s=30, label=f"{g}, {m}")
    front = sorted((p for p in points if p["pareto"]), key=lambda p: p["memory"])
    if front:
        ax.plot([p["memory"] for p in front], [100 * p["acc"] for p in front], "k--", lw=0.8,
                drawstyle="steps-post", label="Pareto front")
        ax.scatter([p["memory"] for p in front], [100 * p["acc"] for p in front], s=140,
                   facecolors="none", edgecolors="k", linewidths=1.0)
    ax.set_xscale("log")
    ax.set_xlabel(f"{memory_label} (bytes, log scale)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("accuracy vs memory (circled: Pareto-optimal)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)
