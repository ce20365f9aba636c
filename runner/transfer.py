"""Hyperparameter transfer across depth: the analysis of an lr x depth sweep of `rode train`.

A transfer sweep is a set of train jobs over several learning rates and several
depths (``scripts/depth_transfer.sh``), possibly for several residual scalings
(``alpha``), optimizers and parametrizations: one *panel* per (optimizer,
parametrization, alpha). For each panel this module

- takes each job's loss after its fixed number of steps (the last epoch's mean
  training loss; a job whose loss became inf/nan is *diverged*: infinite loss),
- finds, per (depth, seed), the best lr: the grid point of least loss, refined by
  a parabola through it and its two neighbours in (log lr, log loss), kept inside
  that bracket; a minimum at the grid's edge stays there and is flagged,
- reports per depth the median best lr over seeds with its lowest and highest,
- fits log(best lr) = a + s log N over every (depth, seed) point by least squares,
  with the slope's standard error, next to the rule-of-thumb prediction: best lr
  ~ N^(alpha-1) with Adam and ~ N^(2 alpha-1) with SGD for the standard
  parametrization; a depth-aware parametrization (:func:`runner.optim.depth_factors`)
  already multiplies the hidden lr by N^e, so its base lr is predicted to scale
  like N^(prediction - e).

Everything here is plain Python over :class:`runner.reporting.Job` (the figure
is :func:`plot_transfer`, matplotlib only when drawn).
"""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from .io import flatten
from .reporting import Job, fmt, num, table

DIVERGED = "loss became"   # the engine's message for a non-finite loss
CLASSES = {"digits": 10, "mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100,
           "imagenet": 1000}


def chance_loss(config: dict) -> float:
    """log(number of classes): the cross-entropy of a uniform guess (inf if unknown)."""
    data = config.get("dataset") or {}
    k = data.get("num_classes") or CLASSES.get(data.get("name"))
    return math.log(k) if k else math.inf


@dataclass(frozen=True)
class Point:
    panel: tuple            # (optimizer, parametrization, alpha)
    depth: int
    seed: int
    lr: float
    loss: float             # inf: diverged
    val_acc: float          # nan: diverged or not recorded
    chance: float = math.inf   # the loss of a uniform guess: a curve never below it did not train


def panel_name(panel: tuple) -> str:
    optimizer, parametrization, alpha = panel
    extra = "" if parametrization == "standard" else f", {parametrization}"
    return f"{optimizer}, alpha={alpha:g}{extra}"


def points(jobs: list[Job]) -> list[Point]:
    """One point per train job that completed or diverged (other failures are left out)."""
    out = []
    for j in jobs:
        c = j.config
        if not all(k in c for k in ("depth", "lr")):
            continue
        if j.status == "completed" and "train_loss" in j.summary:
            loss = num(j.summary["train_loss"])
            best = j.summary.get("best_metrics") or {}
            acc = num(j.summary.get("selected_val_acc", best.get("val_acc")))
        elif j.status == "failed" and DIVERGED in (j.error or j.summary.get("error", "")):
            loss, acc = math.inf, math.nan
        else:
            continue
        if not math.isfinite(loss):
            loss = math.inf
        panel = (str(c.get("optimizer", "adam")), str(c.get("parametrization") or "standard"),
                 float(c.get("alpha", 1.0) if c.get("alpha") is not None else 1.0))
        out.append(Point(panel, int(c["depth"]), int(c.get("seed", 0)), float(c["lr"]), loss, acc,
                         chance_loss(c)))
    return out


# What may differ between the jobs of a transfer sweep: the grid, the seeds, the panels.
SWEPT = frozenset({"lr", "depth", "seed", "alpha", "optimizer", "parametrization", "out_dir"})


def varied_keys(jobs: list[Job]) -> set[str]:
    """The config keys (flattened) whose values differ between the jobs. Unlike
    :func:`runner.reporting.factors`, a key that only some jobs have does not count: the
    runs of one sweep made before and after a key was renamed (``hooks.*.batch`` became
    ``hooks.*.batch_size``) still belong together."""
    seen: dict[str, set] = defaultdict(set)
    for j in jobs:
        for k, v in flatten(j.config or {}).items():
            seen[k].add(repr(v))
    return {k for k, v in seen.items() if len(v) > 1}


def transfer_points(jobs: list[Job]) -> list[Point] | None:
    """The jobs' points if they are a transfer sweep, else None: train jobs over at least
    3 learning rates and 2 depths that differ in nothing else but the seed and the panel
    (optimizer, parametrization, alpha). A study that also varies the grad mode, the
    method or the width is not one (its losses at one lr and depth would mix models)."""
    ps = points(jobs)
    if (len({p.lr for p in ps}) >= 3 and len({p.depth for p in ps}) >= 2
            and varied_keys([j for j in jobs if "lr" in (j.config or {})]) <= SWEPT):
        return ps
    return None


def is_transfer_sweep(jobs: list[Job]) -> bool:
    """Whether the jobs are a transfer sweep (:func:`transfer_points`)."""
    return transfer_points(jobs) is not None


def best_lr(curve: list[tuple[float, float]]) -> tuple[float, bool] | None:
    """(best lr, at the grid's edge) of one (lr, loss) curve; None when every lr diverged.
    The grid point of least loss, refined by a parabola in (log lr, log loss) through it
    and its neighbours (its vertex kept within the neighbours)."""
    curve = sorted(curve)
    finite = [i for i, (_, loss) in enumerate(curve) if math.isfinite(loss)]
    if not finite:
        return None
    k = min(finite, key=lambda i: curve[i][1])
    if k == 0 or k == len(curve) - 1:
        return curve[k][0], True
    (x0, y0), (x1, y1), (x2, y2) = [(math.log(lr), _log(loss)) for lr, loss in curve[k - 1:k + 2]]
    if not math.isfinite(y0) or not math.isfinite(y2):
        return curve[k][0], False
    denom = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denom
    b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / denom
    if a <= 0:
        return curve[k][0], False
    vertex = min(max(-b / (2 * a), x0), x2)
    return math.exp(vertex), False


def _log(loss: float) -> float:
    return math.log(loss) if 0 < loss < math.inf else (math.inf if loss == math.inf else -math.inf)


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares y = a + s x: (s, its standard error, a); the error is nan with
    fewer than 3 points or no spread in x."""
    n = len(xs)
    if n < 2:
        return math.nan, math.nan, math.nan
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return math.nan, math.nan, math.nan
    s = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    a = my - s * mx
    if n < 3:
        return s, math.nan, a
    residual = sum((y - a - s * x) ** 2 for x, y in zip(xs, ys, strict=True))
    return s, math.sqrt(residual / (n - 2) / sxx), a


def predicted_slope(panel: tuple) -> float:
    """The rule of thumb for the base lr's slope in log N: (alpha-1) with Adam,
    (2 alpha-1) with SGD, less the exponent the parametrization already applies to
    the hidden lr."""
    from .optim import depth_factors  # torch: only when a report is drawn

    optimizer, parametrization, alpha = panel
    rule = alpha - 1 if optimizer == "adam" else 2 * alpha - 1
    applied = math.log(depth_factors(parametrization, optimizer, 2, alpha)["lr"]) / math.log(2)
    # log2(2**e) is e only up to rounding: the report must print 0, not -5.55e-17
    return round(rule - applied, 9) + 0.0


@dataclass
class Analysis:
    curves: dict        # panel -> depth -> [(lr, median loss over seeds, diverged seeds, seeds)]
    best: dict          # panel -> depth -> [(seed, best lr, edge)]
    slopes: dict        # panel -> (slope, stderr, intercept, points used, edge points)
    untrained: dict     # panel -> depth -> seeds whose every lr stayed at or above chance


def analyse(ps: list[Point]) -> Analysis:
    by = defaultdict(list)
    chance = {}
    for p in ps:
        by[(p.panel, p.depth, p.seed)].append((p.lr, p.loss))
        chance[(p.panel, p.depth, p.seed)] = p.chance
    best: dict = defaultdict(lambda: defaultdict(list))
    untrained: dict = defaultdict(lambda: defaultdict(int))
    for (panel, depth, seed), curve in sorted(by.items()):
        if min(loss for _, loss in curve) >= chance[(panel, depth, seed)]:
            untrained[panel][depth] += 1   # no lr trained: a best lr would be noise
            continue
        found = best_lr(curve)
        if found is not None:
            best[panel][depth].append((seed, *found))
    curves: dict = defaultdict(dict)
    grouped = defaultdict(list)
    for p in ps:
        grouped[(p.panel, p.depth, p.lr)].append(p.loss)
    for (panel, depth, lr), losses in sorted(grouped.items()):
        finite = [v for v in losses if math.isfinite(v)]
        med = statistics.median(finite) if len(finite) * 2 > len(losses) else math.inf
        curves[panel].setdefault(depth, []).append((lr, med, len(losses) - len(finite), len(losses)))
    slopes = {}
    for panel, depths in best.items():
        xs = [math.log(d) for d, found in depths.items() for _ in found]
        ys = [math.log(lr) for found in depths.values() for _, lr, _ in found]
        edges = sum(edge for found in depths.values() for _, _, edge in found)
        slopes[panel] = (*fit_line(xs, ys), len(xs), edges)
    return Analysis(dict(curves), {k: dict(v) for k, v in best.items()}, slopes,
                    {k: dict(v) for k, v in untrained.items()})


def section(jobs: list[Job], out: Path, figures: list[str]) -> str:
    """The report's transfer section (figure transfer.png, tables), or '' when the
    jobs are not a transfer sweep."""
    ps = transfer_points(jobs)
    if ps is None:
        return ""
    result = analyse(ps)
    from .plots import plot_transfer  # matplotlib: only when a report is drawn
    plot_transfer(result.curves, out / "transfer.png", panel_name)
    figures.append("transfer.png")
    rows = []
    for panel in sorted(result.best):
        for depth, found in sorted(result.best[panel].items()):
            lrs = [lr for _, lr, _ in found]
            acc = [p.val_acc for p in ps if p.panel == panel and p.depth == depth
                   and math.isfinite(p.loss)]
            curve = result.curves[panel][depth]
            least = min((loss for _, loss, _, _ in curve), default=math.nan)
            rows.append([panel_name(panel), depth, len(found), fmt(statistics.median(lrs), 3),
                         f"{fmt(min(lrs), 3)}–{fmt(max(lrs), 3)}",
                         sum(edge for _, _, edge in found), fmt(least, 3),
                         fmt(max((a for a in acc if math.isfinite(a)), default=math.nan), 3)])
    never = [[panel_name(panel), depth] for panel, depths in result.curves.items()
             for depth in depths if depth not in result.best.get(panel, {})
             and depth not in result.untrained.get(panel, {})]
    stuck = [[panel_name(panel), depth, n] for panel, depths in result.untrained.items()
             for depth, n in sorted(depths.items())]
    slope_rows = []
    for panel, (s, se, _, n, edges) in sorted(result.slopes.items()):
        slope_rows.append([panel_name(panel), f"{fmt(s, 3)} ± {fmt(se, 2)}",
                           fmt(predicted_slope(panel), 3), n, edges])
    lrs = sorted({p.lr for p in ps})
    text = [
        "## Learning-rate transfer across depth (`rode train`, lr x depth sweep)", "",
        f"Loss: mean training loss of the last epoch; lr grid {', '.join(fmt(v, 3) for v in lrs)}; "
        "diverged: the loss became inf/nan. Best lr per (depth, seed): the grid point of least "
        "loss, refined by a parabola in (log lr, log loss) through its neighbours; "
        "`edge`: seeds whose minimum is at the grid's end (the true best lr may lie beyond).", "",
        table(["panel", "depth", "seeds", "best lr (median)", "min–max over seeds", "edge",
               "least loss", "best val acc"], rows), "",
        "Slope of log(best lr) against log N (least squares over every (depth, seed), "
        "± its standard error), next to the rule of thumb: best lr ~ N^(alpha-1) with Adam, "
        "N^(2 alpha-1) with SGD (less the exponent a depth-aware parametrization applies).", "",
        table(["panel", "measured slope", "predicted", "points", "edge points"], slope_rows), "",
        "![loss against lr, one curve per depth](transfer.png)"]
    if stuck:
        text[2:2] = ["No lr of the grid trained (least loss at or above log(classes), a uniform "
                     "guess; left out of the best lr and the fit) at: "
                     + "; ".join(f"{p} depth {d} ({n} seeds)" for p, d, n in sorted(stuck)), ""]
    if never:
        text[2:2] = ["Every lr diverged at: " + "; ".join(f"{p} depth {d}" for p, d in never), ""]
    return "\n".join(text)


# --- The depth-transfer search (scripts/depth_transfer_search.sh) --------------------
# Per scaling alpha: an Optuna search over lr at a shallow depth, one run at a deep depth
# with the lr it found (the transfer), and the same search run at the deep depth (what the
# transfer is checked against). OUT/alpha_<a>/{shallow,deep} are the searches' sweep
# dirs, OUT/alpha_<a>/transfer the deep run.

RESULTS = "optimization_results.yaml"


def study_best(study: Path | str) -> tuple[dict, float]:
    """(best_params, best_value) of a finished single-objective search
    (``rode -m train hparams_search=optuna``), read from its sweep dir's
    optimization_results.yaml. Raises ConfigError naming what is missing."""
    import yaml

    from .errors import ConfigError

    study = Path(study)
    path = study / RESULTS
    if not path.is_file():
        what = "no such directory" if not study.is_dir() else f"no {RESULTS} in it"
        raise ConfigError(f"{study}: {what} (the sweep dir of a finished "
                          "`rode -m train hparams_search=optuna` search)")
    data = yaml.safe_load(path.read_text()) or {}
    if "best_params" not in data:
        kind = "a two-objective study (best_trials: no single best)" if "best_trials" in data \
            else "no best_params"
        raise ConfigError(f"{path}: {kind}")
    return dict(data["best_params"]), float(data["best_value"])


def study_param(study: Path | str, key: str):
    """One searched value of the best trial, e.g. its lr; ConfigError if it was not searched."""
    from .errors import ConfigError

    params, _ = study_best(study)
    if key not in params:
        raise ConfigError(f"{Path(study) / RESULTS}: {key} was not searched "
                          f"(searched: {', '.join(sorted(params)) or 'nothing'})")
    return params[key]


def _run(summary_dir: Path) -> dict:
    """A run's loss (the objective: train_loss at its best epoch), test acc and depth."""
    import json

    s = json.loads((summary_dir / "summary.json").read_text())
    best = s.get("best_metrics") or {}
    loss = num(best.get("train_loss", s.get("train_loss"))) if s.get("status") == "completed" \
        else math.inf
    return {"lr": float(s["config"]["lr"]), "depth": int(s["config"]["depth"]), "loss": loss,
            "acc": num(s.get("selected_test_acc", s.get("test_acc"))), "status": s.get("status")}


def _best_trial(study: Path) -> dict:
    """The search's best trial (the lr optimization_results.yaml names) as a run record."""
    lr = float(study_param(study, "lr"))
    for d in sorted(study.iterdir()):
        if (d / "summary.json").is_file():
            run = _run(d)
            if math.isclose(run["lr"], lr, rel_tol=1e-12):
                return run
    from .errors import ConfigError
    raise ConfigError(f"{study}: no trial with the best lr {lr:g}")


def search_rows(out: Path | str) -> list[list]:
    """One row per alpha of a depth-transfer search: shallow search's lr, deep search's lr,
    and the deep loss / test accuracy reached with each."""
    out = Path(out)
    rows = []
    for a in sorted(out.glob("alpha_*"), key=lambda p: -float(p.name.split("_", 1)[1])):
        shallow, deep = _best_trial(a / "shallow"), _best_trial(a / "deep")
        moved = _run(a / "transfer")
        gap = (moved["loss"] - deep["loss"]) / deep["loss"] if math.isfinite(moved["loss"]) \
            else math.inf
        rows.append([a.name.split("_", 1)[1], f"{fmt(shallow['lr'], 3)} (N={shallow['depth']})",
                     f"{fmt(deep['lr'], 3)} (N={deep['depth']})",
                     fmt(deep["lr"] / shallow["lr"], 3),
                     fmt(moved["loss"], 3), fmt(deep["loss"], 3), f"{100 * gap:+.0f} %",
                     f"{100 * moved['acc']:.1f}", f"{100 * deep['acc']:.1f}",
                     fmt(shallow["loss"], 3)])
    return rows


SEARCH_HEADER = ["alpha", "shallow search: best lr", "deep search: best lr", "ratio deep/shallow",
                 "deep loss, transferred lr", "deep loss, deep search's lr", "loss gap",
                 "test acc % transferred", "test acc % deep search", "shallow loss"]


def search_table(out: Path | str) -> str:
    """The markdown table of a depth-transfer search's outcome (see :func:`search_rows`)."""
    from .errors import ConfigError

    rows = search_rows(out)
    if not rows:
        raise ConfigError(f"{out}: no alpha_<a> folders (the OUT of "
                          "scripts/depth_transfer_search.sh)")
    return table(SEARCH_HEADER, rows)


def main(argv: list[str] | None = None) -> int:
    """python -m runner.transfer best <study dir> <key> | search-table <out dir>"""
    import argparse
    import sys

    from .errors import ConfigError

    parser = argparse.ArgumentParser(prog="python -m runner.transfer")
    sub = parser.add_subparsers(dest="command", required=True)
    best = sub.add_parser("best", help="print one searched value of a search's best trial")
    best.add_argument("study")
    best.add_argument("key")
    tab = sub.add_parser("search-table", help="the outcome of scripts/depth_transfer_search.sh")
    tab.add_argument("out")
    args = parser.parse_args(argv)
    try:
        if args.command == "best":
            print(study_param(args.study, args.key))
        else:
            print(search_table(args.out))
    except ConfigError as e:
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
