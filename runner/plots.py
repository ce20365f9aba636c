"""The figures of `rode report` and of the tasks that draw their own (matplotlib, Agg).

Each function takes plain rows (dicts, as read from the CSV files) and a PNG path.
Depth is always on a log2 axis; errors on a log axis with fitted slopes in the legend.

One visual vocabulary for every figure: a colour and a marker per method or contender
(:func:`color_of`, :func:`marker_of`), a line style per gradient mode (:func:`style_of`:
backprop solid, adjoint dashed, the shared vjp dotted) or per a figure's second factor,
grey guides of the expected slopes (:func:`reference_slopes`), wrapped titles and legends
outside the axes. Every figure is checked on save (:func:`problems`): text past the edge,
legend entries drawn alike, an axis without a label are logged, or raised with STRICT.
"""
from __future__ import annotations

import logging
import math
import os
import textwrap
import zlib
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")   # files only, never a window (and no display on clusters)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from PIL import Image  # noqa: E402

from .io import atomic_open, fit_slope  # noqa: E402

log = logging.getLogger("rode")

DPI = 100
PANEL = (4.6, 3.4)

# ------------------------------------------------------------ the vocabulary
# One colour per method and per contender, the same in every figure.
COLORS = {
    "euler": "tab:blue", "heun": "tab:orange", "rev_heun": "tab:green", "momentum": "tab:red",
    "backprop": "black", "adjoint": "tab:purple", "adjoint_shared": "tab:brown",
    "checkpoint": "tab:pink", "torchdiffeq": "tab:olive", "memcnn": "tab:cyan",
    "plain": "tab:gray",
}
# One marker per method and per contender, so that curves on top of each other stay visible.
MARKERS = {
    "euler": "o", "heun": "s", "rev_heun": "^", "momentum": "D",
    "backprop": "o", "adjoint": "s", "adjoint_shared": "^", "checkpoint": "D",
    "torchdiffeq": "v", "memcnn": "x", "plain": "+",
}
# One line style per gradient mode: backprop solid, adjoint dashed, the shared vjp dotted.
LINESTYLES = {"backprop": "-", "adjoint": "--", "shared": ":", "adjoint_shared": ":",
              "checkpoint": "-."}
# The second factor of a figure that is not a gradient mode (weights in depth).
SECOND = {"constant": ("-", "o"), "tied": ("-", "o"), "smooth": ("--", "s"),
          "rough": ("-.", "^"), "iid": (":", "v"), "zero": ("-", "o")}
_FALLBACK = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
             "tab:pink", "tab:olive", "tab:cyan", "tab:gray"]
GUIDE = {"color": "0.55", "lw": 0.8, "zorder": 0.5}
GUIDE_STYLES = {-1.0: (0, (6, 3)), -2.0: (0, (2, 2)), -0.5: (0, (8, 2, 2, 2))}

# Raise on an unreadable figure instead of logging it (tests and RODE_STRICT_FIGURES=1).
STRICT = os.environ.get("RODE_STRICT_FIGURES", "") not in ("", "0")


class FigureProblem(RuntimeError):
    """A figure that a reader could not read (text cut off, look-alike legend entries...)."""


def color_of(name: str) -> str:
    """The colour of a method or contender, fixed across figures (unknown names: stable too)."""
    if name in COLORS:
        return COLORS[name]
    return _FALLBACK[zlib.crc32(str(name).encode()) % len(_FALLBACK)]


def marker_of(name: str) -> str:
    return MARKERS.get(name, "o")


def style_of(grad: str) -> str:
    """The line style of a gradient mode: backprop solid, adjoint dashed, shared vjp dotted."""
    return LINESTYLES.get(grad, "-")


def _style(label: str, default_grad: str | None = None) -> dict:
    """Colour and marker by the first method or contender the label names, line style by its
    gradient mode (or ``default_grad`` when it names none)."""
    words = label.replace(",", " ").replace("/", " ").replace("(", " ").split()
    style = {}
    for w in words:
        if "color" not in style and w in COLORS and w not in LINESTYLES:
            style["color"], style["marker"] = color_of(w), marker_of(w)
        if "linestyle" not in style and w in LINESTYLES:
            style["linestyle"] = style_of(w)
    if "linestyle" not in style and default_grad:
        style["linestyle"] = style_of(default_grad)
    return style


def wrap(text: str, width_inches: float, fontsize: float = 10) -> str:
    """Text wrapped to fit a width (about 0.55 em per character)."""
    chars = max(12, int(width_inches * 72 / (0.55 * fontsize)))
    return "\n".join(textwrap.fill(part, chars) for part in str(text).split("\n"))


def _panels(n: int, title: str | None = None, width: float | None = None):
    size = (width or PANEL[0] * n, PANEL[1])
    fig, axes = plt.subplots(1, n, figsize=size, squeeze=False, layout="constrained")
    if title:
        fig.suptitle(wrap(title, size[0], 10), fontsize=10)
    return fig, list(axes[0])


def _legend(ax, title: str | None = None, outside: bool = True, **kw):
    """A legend right of the axes (outside: it never covers data), or inside when asked."""
    if not ax.get_legend_handles_labels()[0]:
        return None
    opts = {"fontsize": 7, "title": title, "title_fontsize": 7}
    if outside:
        opts.update(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    return ax.legend(**{**opts, **kw})


def _fig_legend(fig, axes, title: str | None = None):
    """One legend for all panels (the same lines in each), right of the figure."""
    seen = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="outside right center", fontsize=7,
                   title=title, title_fontsize=7)


def reference_slopes(ax, xs, ys, slopes=(-1.0, -2.0)) -> None:
    """Thin grey guides of the expected orders (error ∝ N^slope) on a log-log panel, drawn
    from above the highest curve at the smallest depth so that they do not hide data."""
    pts = [(float(x), float(y)) for x, y in zip(xs, ys, strict=True)
           if x > 0 and y > 0 and math.isfinite(y)]
    if not pts:
        return
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    if x1 <= x0:
        return
    y0 = 2.0 * max(y for x, y in pts if x == x0)
    xg = np.geomspace(x0, x1, 32)
    for s in slopes:
        ax.plot(xg, y0 * (xg / x0) ** s, color=GUIDE["color"], lw=GUIDE["lw"],
                zorder=GUIDE["zorder"], linestyle=GUIDE_STYLES.get(float(s), "-"),
                scalex=False, scaley=False, label=f"slope {_minus(s)} (guide)")


def _minus(s: float) -> str:
    text = {-0.5: "-1/2", 0.5: "+1/2"}.get(float(s), f"{s:+g}" if s > 0 else f"{s:g}")
    return text.replace("-", "\u2212")


def _depth_axis(ax, depths) -> None:
    ax.set_xscale("log", base=2)
    ticks = sorted(set(int(d) for d in depths))
    if 0 < len(ticks) <= 12:
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks], fontsize=7 if len(ticks) > 7 else None)
    ax.set_xlabel("depth N")
    ax.grid(True, which="major", alpha=0.3)


# --------------------------------------------------------- readability check
def _texts(fig):
    """Every text the figure draws: titles, labels, tick labels in view, legends, notes."""
    texts = list(fig.texts)
    if getattr(fig, "_suptitle", None) is not None:
        texts.append(fig._suptitle)
    for legend in fig.legends:
        texts += [*legend.get_texts(), legend.get_title()]
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        texts += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label,
                  *ax.texts]
        for axis in (ax.xaxis, ax.yaxis):
            for tick in axis._update_ticks():   # the ticks drawn (those in view)
                texts += [tick.label1, tick.label2]
            texts.append(axis.get_offset_text())
        legend = ax.get_legend()
        if legend is not None:
            texts += [*legend.get_texts(), legend.get_title()]
    return [t for t in texts if t is not None and t.get_visible() and t.get_text().strip()]


def _handle_key(handle) -> tuple:
    if isinstance(handle, Line2D):
        dashes = getattr(handle, "_unscaled_dash_pattern", None)   # custom dashes differ too
        return (to_hex(handle.get_color(), keep_alpha=True),
                f"{handle.get_linestyle()}{dashes if dashes and dashes[1] else ''}",
                str(handle.get_marker()))
    try:
        face = to_hex(handle.get_facecolor()[0] if hasattr(handle.get_facecolor(), "__len__")
                      and len(np.shape(handle.get_facecolor())) > 1 else handle.get_facecolor(),
                      keep_alpha=True)
    except (AttributeError, ValueError, IndexError):
        face = type(handle).__name__
    return (face, type(handle).__name__, "")


def problems(fig) -> list[str]:
    """What makes this figure unreadable: text past the figure's edge, two entries of one
    legend drawn alike (colour, line style, marker), an axis without a label. [] if none."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    W, H = fig.bbox.width, fig.bbox.height
    found = []
    for t in _texts(fig):
        box = t.get_window_extent(renderer)
        if box.x0 < -1 or box.y0 < -1 or box.x1 > W + 1 or box.y1 > H + 1:
            found.append(f"text {t.get_text()[:40]!r} extends past the figure's edge "
                         f"({box.x0:.0f}..{box.x1:.0f} x {box.y0:.0f}..{box.y1:.0f} "
                         f"in {W:.0f} x {H:.0f} px)")
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    for legend in legends:
        seen = {}
        for handle, text in zip(legend.legend_handles, legend.get_texts(), strict=False):
            key = _handle_key(handle)
            if key in seen:
                found.append(f"legend entries {seen[key]!r} and {text.get_text()!r} "
                             f"are drawn alike {key}")
            seen.setdefault(key, text.get_text())
    for k, ax in enumerate(fig.axes):
        if not ax.get_visible() or not ax.axison:
            continue
        name = ax.get_title() or f"axes {k}"
        if hasattr(ax, "_colorbar"):
            if not (ax.get_xlabel() or ax.get_ylabel()):
                found.append(f"colour bar of {name!r} has no label")
            continue
        for axis, label in (("x", ax.get_xlabel()), ("y", ax.get_ylabel())):
            if not label.strip():
                found.append(f"{axis} axis of {name!r} has no label")
    return found


def check_readable(fig) -> None:
    """Raise FigureProblem naming what is wrong, if anything is."""
    found = problems(fig)
    if found:
        raise FigureProblem("unreadable figure: " + "; ".join(found))


def _save(fig, path: Path) -> Path:
    found = problems(fig)   # draws the figure (constrained layout runs here)
    if found:
        if STRICT:
            plt.close(fig)
            raise FigureProblem(f"{Path(path).name}: " + "; ".join(found))
        log.warning("figure %s: %s", Path(path).name, "; ".join(found))
    # A 256-colour palette: line plots lose nothing visible and the file is ~4x smaller.
    image = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())).convert("RGB")
    image = image.quantize(256, method=Image.Quantize.MEDIANCUT)
    plt.close(fig)
    with atomic_open(path, "wb") as f:   # a failed write names the figure
        image.save(f, format=Image.registered_extensions().get(Path(path).suffix.lower(), "PNG"),
                   optimize=True)
    return Path(path)


# ----------------------------------------------------------- discretization
def plot_discretization(rows: list[dict], path: Path) -> Path:
    """rows: case, weights, method, depth, error. One panel per residual function; colour by
    method, line style and marker by the weights; grey guides of the slopes -1, -2, -1/2."""
    cases = list(dict.fromkeys(r.get("case", "") for r in rows))
    fig, axes = _panels(len(cases), "ResNet vs Neural ODE: ||x_N - x(1)|| / ||x(1)||",
                        width=PANEL[0] * 1.45 * len(cases))
    for ax, case in zip(axes, cases, strict=True):
        groups = defaultdict(list)
        for r in rows:
            if r.get("case", "") == case:
                groups[(r["weights"], r["method"])].append((int(r["depth"]), float(r["error"])))
        for (weights, method), pts in groups.items():
            pts.sort()
            d, e = zip(*pts, strict=True)
            line, marker = SECOND.get(weights, ("-", "o"))
            ax.plot(d, e, marker=marker, ms=3, color=color_of(method), linestyle=line,
                    label=f"{weights} {method} ({fit_slope(d, e):+.2f})")
        reference_slopes(ax, [p[0] for g in groups.values() for p in g],
                         [p[1] for g in groups.values() for p in g], (-1.0, -2.0, -0.5))
        _depth_axis(ax, [r["depth"] for r in rows])
        ax.set_yscale("log")
        ax.set_ylabel("relative error")
        ax.set_title(f"f = {case}" if case else "ResNet vs ODE", fontsize=9)
        _legend(ax, title="weights method (slope)")
    return _save(fig, path)


# ------------------------------------------------------------------- linear
def plot_linear_weights(snapshots: dict, path: Path, max_entries: int = 4) -> Path:
    """snapshots: {"depth": N, "steps": [s...], "weights": array (S, N, d, d)}.
    A_n[i, j] against t = n/N, one panel per optimisation step."""
    w = np.asarray(snapshots["weights"])
    steps, depth = snapshots["steps"], int(snapshots["depth"])
    fig, axes = _panels(len(steps), f"linear ResNet, N = {depth}: weights A_n against depth",
                        width=3.3 * len(steps) + 0.8)
    t = np.arange(depth) / depth
    d = w.shape[-1]
    entries = [(i, j) for i in range(d) for j in range(d)][:max_entries]
    lo, hi = float(w.min()), float(w.max())
    pad = 0.05 * (hi - lo or 1.0)
    for ax, s, ws in zip(axes, steps, w, strict=True):
        for k, (i, j) in enumerate(entries):
            ax.plot(t, ws[:, i, j], lw=1.2, color=_FALLBACK[k % len(_FALLBACK)],
                    label=f"A[{i},{j}]")
        ax.set_title(f"step {s}", fontsize=9)
        ax.set_xlabel("n / N")
        ax.set_ylabel("weight")
        ax.set_ylim(lo - pad, hi + pad)
        ax.grid(True, alpha=0.3)
    _legend(axes[-1])
    return _save(fig, path)


def plot_linear_increments(rows: list[dict], path: Path) -> Path:
    """rows: depth, step, loss, max_increment, scaled_increment (N · max_n ||A_{n+1} - A_n||)."""
    fig, axes = _panels(3, "linear ResNet: smoothness of the weights along training",
                        width=PANEL[0] * 3 + 0.8)
    by_depth = defaultdict(list)
    for r in rows:
        by_depth[int(r["depth"])].append(r)
    cmap = plt.get_cmap("viridis")
    for k, (depth, rs) in enumerate(sorted(by_depth.items())):
        rs.sort(key=lambda r: int(r["step"]))
        steps = [int(r["step"]) for r in rs]
        color = cmap(0.9 * k / max(1, len(by_depth) - 1))
        axes[0].plot(steps, [float(r["loss"]) for r in rs], color=color, label=f"N={depth}")
        axes[1].plot(steps, [float(r["max_increment"]) for r in rs], color=color)
        axes[2].plot(steps, [float(r["scaled_increment"]) for r in rs], color=color)
    names = ["loss", "max_n ||A_{n+1} - A_n||", "N · max_n ||A_{n+1} - A_n||"]
    for ax, name in zip(axes, names, strict=True):
        ax.set_xlabel("optimisation step")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
    axes[0].set_yscale("log")
    _fig_legend(fig, axes[:1], title="depth")
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
    fig, axes = _panels(len(panels), "test error vs depth (median over seeds, band: min-max)",
                        width=PANEL[0] * len(panels) + 1.4)
    for ax, (panel, lines) in zip(axes, panels.items(), strict=True):
        depths = []
        for label, pts in lines.items():
            pts = sorted(pts)
            d, med, lo, hi = (np.array([p[k] for p in pts], dtype=float) for k in range(4))
            depths += list(d)
            line, = ax.plot(d, 100 * med, ms=4, label=label,
                            **{"marker": "o", **_style(label)})
            if any(p[4] > 1 for p in pts):
                ax.fill_between(d, 100 * lo, 100 * hi, color=line.get_color(), alpha=0.12)
        _depth_axis(ax, depths)
        ax.set_ylabel("test error (%)")
        ax.set_title(wrap(panel, PANEL[0], 9), fontsize=9)
    _fig_legend(fig, axes)
    return _save(fig, path)


def _grad_error_guides(panel: str) -> tuple[float, ...]:
    """The slopes a gradient-error panel expects: -1 (Euler) and -2 (Heun), with -1/2 for
    i.i.d. weights; at a step h = N^-alpha the adjoint's N reverse steps, each off by
    O(h^2) (Euler) or O(h^3) (Heun), give 1 - 2 alpha and 1 - 3 alpha."""
    alpha = next((float(w.split("=", 1)[1]) for w in panel.replace(",", " ").split()
                  if w.startswith("alpha=")), 1.0)
    slopes = (1 - 2 * alpha, 1 - 3 * alpha) + ((-0.5,) if "iid" in panel else ())
    return tuple(dict.fromkeys(round(s, 2) + 0.0 for s in slopes))


def plot_grad_error(series: dict[str, list[tuple]], path: Path) -> Path:
    """series: label -> [(depth, error, lowest, highest)] (spread over layers), log-log.
    A label 'line | panel' puts the line in the panel of that name. Lines are the adjoint's
    error (dashed) unless the label names another gradient ('backprop': solid); grey guides
    show the slopes -1 and -2 (and -1/2 in a panel of i.i.d. weights; 1 - 2 alpha and
    1 - 3 alpha in a panel 'alpha=...')."""
    panels = _by_panel(series)
    fig, axes = _panels(len(panels), "adjoint vs backprop: relative gradient error "
                                     "(band: lowest to highest layer)",
                        width=PANEL[0] * 1.45 * len(panels))
    for ax, (panel, lines) in zip(axes, panels.items(), strict=True):
        depths, errors = [], []
        for label, pts in lines.items():
            pts = sorted(pts)
            d, e, lo, hi = (np.array([p[k] for p in pts], dtype=float) for k in range(4))
            depths += list(d)
            errors += [(x, y) for x, y in zip(d, e, strict=True) if "backprop" not in label]
            line, = ax.plot(d, e, ms=4, label=f"{label} (slope {fit_slope(d, e):+.2f})",
                            **{"marker": "o", **_style(label, default_grad="adjoint")})
            ax.fill_between(d, lo, hi, color=line.get_color(), alpha=0.12)
        slopes = _grad_error_guides(panel)
        reference_slopes(ax, [p[0] for p in errors], [p[1] for p in errors], slopes)
        _depth_axis(ax, depths)
        ax.set_yscale("log")
        ax.set_ylabel("||g_adj - g_bp|| / ||g_bp||")
        ax.set_title(wrap(panel or "gradient error", PANEL[0], 9), fontsize=9)
        _legend(ax, title="series (fitted slope)")
    if len(axes) > 1:   # same y range everywhere, so that panels compare at a glance
        lo = min(ax.get_ylim()[0] for ax in axes)
        hi = max(ax.get_ylim()[1] for ax in axes)
        for ax in axes:
            ax.set_ylim(lo, hi)
    return _save(fig, path)


def _per_depth_panels(rows, key_fields, panels, title, path, style=_style) -> Path:
    """rows grouped into lines by key_fields; one panel per (column, y label, factor, y scale)."""
    fig, axes = _panels(len(panels), title, width=PANEL[0] * len(panels) + 1.6)
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
            ax.plot(d, ys, ms=4, label=label, **{"marker": "o", **style(label)})
    for ax, (_, ylabel, _, yscale) in zip(axes, panels, strict=True):
        _depth_axis(ax, [r["depth"] for r in rows])
        ax.set_ylabel(ylabel)
        if not ax.lines:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.set_yscale(yscale)
        if yscale == "linear":
            ax.set_ylim(bottom=0)
    _fig_legend(fig, axes)
    return _save(fig, path)


def plot_memory(rows: list[dict], path: Path) -> Path:
    """rows: depth, grad, method, saved_bytes, peak_bytes, seconds_per_step."""
    mib = 1 / 2**20
    return _per_depth_panels(rows, ["method", "grad"], [
        ("saved_bytes", "saved for backward (MiB)", mib, "log"),
        ("peak_bytes", "peak memory of a step (MiB)", mib, "log"),
        ("seconds_per_step", "seconds per step", 1.0, "log")],
        "memory vs depth (log-log: slope 1 = linear in depth, 0 = flat)", path)


def plot_bench(rows: list[dict], path: Path) -> Path:
    """rows: depth, contender, method, width, batch, seconds_per_step, peak_bytes, grad_rel_error.
    Colour and marker by contender, line style by integrator (Euler solid, Heun dashed)."""
    def style(label):
        contender, _, method = label.partition(" ")
        return {"color": color_of(contender), "marker": marker_of(contender),
                "fillstyle": "none" if contender in ("adjoint", "adjoint_shared") else "full",
                "linestyle": {"heun": "--", "rev_heun": "-.", "momentum": ":"}.get(method, "-")}

    return _per_depth_panels(rows, ["contender", "method"], [
        ("seconds_per_step", "seconds per training step", 1.0, "log"),
        ("peak_bytes", "peak memory (MiB)", 1 / 2**20, "log"),
        ("grad_rel_error", "gradient error vs backprop", 1.0, "log")],
        "benchmark: one training step vs depth", path, style)


# ------------------------------------------------------------ hook records
def _distinct_styles(labels: list[str], default_grad: str | None = None) -> dict[str, dict]:
    """The vocabulary's style per label; where two labels would look alike (a sweep over a
    key the vocabulary does not know), a colour and marker of their own for each."""
    styles = {lab: {"marker": "o", "linestyle": "-", **_style(lab, default_grad)} for lab in labels}
    keys = [(s.get("color"), s["linestyle"], s["marker"]) for s in styles.values()]
    if len(set(keys)) < len(keys) or any(k[0] is None for k in keys):
        marks = ["o", "s", "^", "D", "v", "x", "+", "P"]
        styles = {lab: {"color": _FALLBACK[k % len(_FALLBACK)], "marker": marks[k % len(marks)],
                        "linestyle": ["-", "--", ":", "-."][(k // len(_FALLBACK)) % 4]}
                  for k, lab in enumerate(labels)}
    return styles


def plot_hook_run(steps: list[int], layers: list[list[float]], scalar: list[float], schema,
                  title: str, path: Path) -> Path:
    """One run's records of one hook: per-layer values as a layer × step heatmap (log colour
    when the schema says so) and the schema's scalar over training."""
    from matplotlib.colors import LogNorm, Normalize

    fig, (ax, ax2) = _panels(2, title, width=2 * PANEL[0] + 1.2)
    n = max((len(v) for v in layers), default=0)
    grid = np.full((n, len(steps)), np.nan)
    for k, values in enumerate(layers):
        grid[:len(values), k] = values
    positive = grid[np.isfinite(grid) & (grid > 0)]
    if schema.log and positive.size:
        norm = LogNorm(vmin=positive.min(), vmax=max(positive.max(), positive.min() * 1.0001))
        grid = np.where(grid > 0, grid, np.nan)   # log colour: zero is "not drawn"
    else:
        finite = grid[np.isfinite(grid)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        norm = Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1)
    mesh = ax.pcolormesh(np.arange(len(steps) + 1) - 0.5, np.arange(n + 1) - 0.5, grid,
                         norm=norm, cmap="viridis", shading="flat")
    colorbar = fig.colorbar(mesh, ax=ax)
    colorbar.set_label(wrap(schema.per_layer_label, 2.6, 8), fontsize=8)
    shown = sorted(set(np.linspace(0, len(steps) - 1, min(len(steps), 8)).round().astype(int)))
    ax.set_xticks(shown)
    ax.set_xticklabels([str(steps[k]) for k in shown], fontsize=7)
    ax.set_xlabel("training step")
    ax.set_ylabel("layer n")
    ax.set_title(schema.per_layer, fontsize=9)
    ax2.plot(steps, scalar, marker="o", ms=3, color=color_of("adjoint"))
    ax2.set_xlabel("training step")
    ax2.set_ylabel(wrap(schema.scalar_label, 2.6, 9), fontsize=9)
    ax2.set_title(schema.scalar, fontsize=9)
    if schema.log and all(v > 0 for v in scalar if math.isfinite(v)) and scalar:
        ax2.set_yscale("log")
    ax2.grid(True, alpha=0.3)
    return _save(fig, path)


def plot_hook_compare(runs: dict[str, dict], schema, title: str, path: Path) -> Path:
    """runs: label -> {"step": s, "layers": [...] at step s, "steps": [...], "scalar": [...]}.
    The per-layer values of each run at one step against n / N (runs of different depths
    compare on one axis), and each run's scalar over training."""
    fig, (ax, ax2) = _panels(2, title, width=2 * PANEL[0] + 1.8)
    styles = _distinct_styles(list(runs))
    for label, r in runs.items():
        values = np.asarray(r["layers"], dtype=float)
        t = np.arange(len(values)) / max(1, len(values))
        ax.plot(t, values, ms=3, label=f"{label} (step {r['step']})", **styles[label])
        ax2.plot(r["steps"], r["scalar"], ms=3, **styles[label])
    ax.set_xlabel("layer n / N")
    ax.set_ylabel(wrap(schema.per_layer_label, 3.6, 9), fontsize=9)
    ax2.set_xlabel("training step")
    ax2.set_ylabel(wrap(schema.scalar_label, 3.6, 9), fontsize=9)
    for a, field in ((ax, schema.per_layer), (ax2, schema.scalar)):
        data = np.concatenate([np.asarray(line.get_ydata(), dtype=float) for line in a.lines])
        if schema.log and data.size and np.all(data[np.isfinite(data)] > 0):
            a.set_yscale("log")
        a.set_title(field, fontsize=9)
        a.grid(True, alpha=0.3)
    _fig_legend(fig, [ax])
    return _save(fig, path)


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


# ------------------------------------------------------------------- transfer
BLOWN_UP = 100.0   # a cross-entropy above this: the network blew up (log 10 = 2.3 is chance)


def plot_transfer(curves: dict, path: Path, name=str) -> Path:
    """Loss against lr (log-log), one curve per depth, one panel per (optimizer,
    parametrization, alpha): ``curves[panel][depth] = [(lr, loss, diverged, seeds)]``
    (loss: the median over seeds; inf when most seeds diverged, drawn as a cross at
    the panel's top; a finite loss above ``BLOWN_UP`` as a triangle there, so that one
    blown-up network does not squash the trained curves into the panel's floor)."""
    panels = sorted(curves)
    alphas = sorted({p[2] for p in panels}, reverse=True)
    rows = sorted({p[:2] for p in panels})
    fig, axes = plt.subplots(len(rows), len(alphas), squeeze=False,
                             figsize=(PANEL[0] * len(alphas), PANEL[1] * len(rows)),
                             layout="constrained")   # labels inside the figure, not on the next row
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
            finite = [v for d in curves[panel].values() for _, v, _, _ in d
                      if math.isfinite(v) and v <= BLOWN_UP]
            top = max(finite) * 1.5 if finite else 10.0
            for depth, curve in sorted(curves[panel].items()):
                xs = [lr for lr, _, _, _ in curve]
                ys = [v if v <= BLOWN_UP else np.nan for _, v, _, _ in curve]
                ax.plot(xs, ys, marker="o", ms=3, color=colour[depth], label=f"N={depth}")
                gone = [lr for lr, v, _, _ in curve if not math.isfinite(v)]
                if gone:
                    ax.plot(gone, [top] * len(gone), "x", color=colour[depth], ms=6)
                huge = [lr for lr, v, _, _ in curve if BLOWN_UP < v < math.inf]
                if huge:
                    ax.plot(huge, [top] * len(huge), "^", color=colour[depth], ms=5)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("lr")
            ax.set_ylabel("training loss")
            ax.set_title(name(panel), fontsize=9)
            ax.grid(True, which="major", alpha=0.3)
            ax.legend(fontsize=7)
    return _save(fig, path)


# ---------------------------------------------------------------- convergence
def _convergence_styles(labels: list[str]) -> dict[str, dict]:
    """Line style and marker by the initialization (the vocabulary's second factor: smooth
    dashed, i.i.d. dotted); colour by the method, or by what else tells the series apart
    (alpha, ...) when one method has several."""
    def split(label):
        words = [w.strip() for w in label.split(",")]
        init = next((w.split("=", 1)[1] for w in words if w.startswith("init=")), "")
        return init, ", ".join(w for w in words if not w.startswith("init="))
    rests = sorted({split(lab)[1] for lab in labels}, key=lambda r: ("alpha=1," not in r + ",", r))
    methods = {r: next((w for w in r.replace(",", " ").split() if w in COLORS), None) for r in rests}
    by_method = len(set(methods.values())) == len(rests) and None not in methods.values()
    colour = {r: color_of(methods[r]) if by_method else _FALLBACK[k % len(_FALLBACK)]
              for k, r in enumerate(rests)}
    styles = {}
    for lab in labels:
        init, rest = split(lab)
        line, marker = SECOND.get(init, ("-", "o"))
        styles[lab] = {"color": colour[rest], "linestyle": line, "marker": marker}
    return styles


def plot_convergence(series: dict[str, list[tuple]], path: Path) -> Path:
    """Weights and outputs distance between depth N and 2N against N (log-log), one
    line per series (``series[label] = [(N, weights, outputs)]``), both fitted slopes in
    the legend, a grey guide of the O(1/N) slope."""
    fig, axes = _panels(2, "trained networks of depth N vs 2N from the same initial path: "
                           "relative distance (fitted slopes in the legend)",
                        width=2 * PANEL[0] + 2.6)
    styles = _convergence_styles(list(series))
    for label, points in sorted(series.items()):
        xs = [p[0] for p in points]
        slopes = [fit_slope(xs, [p[k] for p in points]) for k in (1, 2)]
        signed = [f"{s:+.2f}".replace("-", "\u2212") for s in slopes]
        text = f"{label}\nslope: weights {signed[0]}, outputs {signed[1]}"
        for ax, k in ((axes[0], 1), (axes[1], 2)):
            ax.plot(xs, [p[k] for p in points], ms=4, label=text, **styles[label])
    # The guide starts at the series the O(1/N) prediction is about (smooth, alpha = 1).
    predicted = [lab for lab in series if "init=smooth" in lab and "alpha=1," in lab + ","]
    depths = [p[0] for points in series.values() for p in points]
    for ax, k, title in ((axes[0], 1, "trained weights, N vs 2N"),
                         (axes[1], 2, "outputs, N vs 2N")):
        pts = [(p[0], p[k]) for lab in predicted or series for p in series[lab]]
        reference_slopes(ax, [p[0] for p in pts], [p[1] for p in pts], (-1.0,))
        _depth_axis(ax, depths)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("relative distance")
    _fig_legend(fig, axes)
    return _save(fig, path)


def plot_pareto(points: list[dict], path: Path, memory_label: str = "model memory of a step") -> Path:
    """An accuracy/memory study: one point per trial, memory (MiB, log x) against
    validation accuracy; colour: grad mode (and vjp) in the vocabulary's colours (backprop,
    adjoint, the shared vjp), marker: method; Pareto-optimal trials circled, labelled with
    their depth and joined as the front. points: dicts with ``memory`` (bytes), ``acc``,
    ``grad``, ``method``, ``pareto`` and optionally ``depth``."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    fig, ax = plt.subplots(figsize=(8.2, 4.6), layout="constrained")
    mib = 1 / 2**20
    grads = sorted({p["grad"] for p in points})
    methods = sorted({p["method"] for p in points})

    def colour(grad):   # 'adjoint (shared vjp)' is the shared adjoint's colour
        return color_of("adjoint_shared" if grad.startswith("adjoint") and "shared" in grad
                        else grad.split()[0])
    for g in grads:
        for m in methods:
            pts = [p for p in points if p["grad"] == g and p["method"] == m]
            if pts:
                ax.plot([p["memory"] * mib for p in pts], [100 * p["acc"] for p in pts],
                        color=colour(g), marker=marker_of(m), ms=5.5, linestyle="none",
                        label=f"{g}, {m}")
    front = sorted((p for p in points if p["pareto"]), key=lambda p: p["memory"])
    if front:
        xs, ys = [p["memory"] * mib for p in front], [100 * p["acc"] for p in front]
        ax.plot(xs, ys, color="0.3", linestyle="--", lw=0.8, drawstyle="steps-post",
                label="Pareto front")
        ax.scatter(xs, ys, s=140, facecolors="none", edgecolors="k", linewidths=1.0)
        for p, x, y in zip(front, xs, ys, strict=True):
            if p.get("depth") is not None:
                ax.annotate(f"N={p['depth']}", (x, y), textcoords="offset points",
                            xytext=(8, -10), fontsize=7)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_xlabel(f"{memory_label} (MiB, log scale)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("accuracy vs memory, one point per trial (circled: Pareto-optimal)",
                 fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    _legend(ax, title="grad, method")
    return _save(fig, path)
