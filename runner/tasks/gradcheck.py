"""rode gradcheck: the adjoint's gradient against exact backprop, per residual layer.

On a fixed probe batch (the first ``batch_size`` training examples), computes the
gradient of the loss with ordinary backprop and with the discrete adjoint, on
the same weights (those ``rode train`` starts from with the same seed, or a
trained model's with ``checkpoint=``), and writes

- ``grad_error.csv``: ``layer, rel_error, cosine``, one row per residual
  function with its own parameters (a tied stack has one row, layer 0);
- ``summary.json``: the totals (``rel_error``, ``cosine`` over all
  parameters; ``stack_rel_error``, ``stack_cosine`` over the residual
  functions) and the setting.

The reference is always backprop in float64 on the same weights and batch. With
``dtype=float32|bfloat16|float16`` (or ``amp=true``: autocast over float32
weights, as ``rode train amp=true`` does) the model runs in that precision and
the summary also holds the rounding floor: ``backprop_rel_error`` and
``backprop_stack_rel_error``, backprop's own error in the same precision, and
``vs_backprop_same_precision_stack_rel_error``, the adjoint against that. The
adjoint's self-check runs on the same pass (it changes no gradient):
``roundtrip_error`` is ||x̃_0 - x_0|| / ||x_0|| of the rebuilt input. With
``adjoint.max_roundtrip`` set and passed, ``escalated`` is true and a second
adjoint pass (anchored, as training would continue) gives
``escalated_stack_rel_error`` at ``escalated_anchor_every``.
"""
from __future__ import annotations

import copy
import math
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from omegaconf import OmegaConf, open_dict

from .. import checkpoint as ckpt
from ..config import check_depths, check_image_data
from ..data import build_dataset, make_loader
from ..engine import seed_everything
from ..errors import ConfigError
from ..gradmodes import get_grad_mode
from ..io import fit_slope, plain, read_csv, write_csv, write_json
from ..measure import DTYPES, autocast_of, compare_gradients, gradients, residual_stacks, untouched
from ..models import build_model
from ..preflight import check_device, resolve_device
from ..reporting import Job, depth_of, factors, num, series_label, table
from ..threads import apply as apply_threads

# What a checkpoint's config decides: the model it holds.
ARCHITECTURE = ("model", "dataset", "depth", "width", "method", "init", "adjoint", "alpha")


def validate(cfg) -> None:
    """The device, and a checkpoint= that must rebuild its own model."""
    check_device(cfg)
    if cfg.checkpoint is not None:
        saved = ckpt.load(cfg.checkpoint)
        ckpt.check_rebuilds(saved, saved["config"], f"checkpoint={cfg.checkpoint}")
        architecture(cfg)


def contradictions(cfg, keys) -> None:
    """With checkpoint=, the checkpoint's config gives the architecture: a key of it
    set on the command line (``keys``, dotted) to another value is refused, rather
    than measuring one network and labelling it as another."""
    if cfg.get("checkpoint") is None:
        return
    saved = ckpt.load(cfg.checkpoint)["config"]
    for key in keys:
        if key.split(".")[0] not in ARCHITECTURE:
            continue
        mine, theirs = OmegaConf.select(cfg, key, default=None), _select(saved, key)
        mine = plain(mine)
        if isinstance(mine, dict) and isinstance(theirs, dict):   # a group: its option
            mine, theirs = mine.get("name"), theirs.get("name")
        if theirs is not _MISSING and mine != theirs:
            raise ConfigError(f"{key}={mine} contradicts checkpoint={cfg.checkpoint}: its model "
                              f"has {key}={theirs}; leave {key} out (the checkpoint gives "
                              f"the architecture: {', '.join(ARCHITECTURE)})")


_MISSING = object()


def _select(d: dict, key: str):
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return _MISSING
        d = d[part]
    return d


def architecture(cfg):
    """(config that builds the model, checkpoint or None)."""
    # out_dir is Hydra's, unknown before the job runs (and not the model's)
    arch = OmegaConf.create(plain(cfg, exclude=["out_dir"]))
    checkpoint = None
    if cfg.checkpoint is not None:
        checkpoint = ckpt.load(cfg.checkpoint)
        saved = checkpoint["config"]
        for key in ARCHITECTURE:
            if key in saved:
                arch[key] = saved[key]
        with open_dict(arch):
            arch.alpha = saved.get("alpha", 1.0)   # the checkpoint's scaling (1: before the key)
        check_depths(arch.depth, [arch.method], "depth")
        check_image_data(arch)
    with open_dict(arch):
        arch.grad = "backprop"   # build_model needs one; the probe uses both
    return arch, checkpoint


def probe(model, x, y, mode, autocast, keys=None) -> tuple[dict, float | None]:
    """(float64 gradients of the cross-entropy, keyed as :func:`runner.measure.gradients`
    keys them or by ``keys`` (the ids of another model's trainable parameters, in
    order), the largest round-trip error the adjoint's self-check measured or None),
    in train mode, from the random state the model had (two probes see the same
    dropout draws)."""
    trips: list[float] = []
    with untouched(model):
        model.train()
        grads = gradients(model, x, y, mode, autocast=autocast, roundtrips=trips)
    params = [p for p in model.parameters() if p.requires_grad]
    keys = keys or [id(p) for p in params]
    return ({k: grads[id(p)].detach().double() for k, p in zip(keys, params, strict=True)},
            max(trips) if trips else None)


def run(cfg) -> dict:
    apply_threads(cfg)
    start = time.perf_counter()
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arch, checkpoint = architecture(cfg)
    dtype = DTYPES[cfg.dtype]
    amp = bool(cfg.get("amp", False))

    # The same order as `rode train`, so that the same seed gives the same weights.
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    data = build_dataset(arch.dataset)
    model = build_model(arch, data.input_shape, data.num_classes)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    model.to(device=device, dtype=dtype)
    x, y = next(iter(make_loader(data.train, cfg.batch_size, shuffle=False, seed=0)))
    tokens = not x.is_floating_point()   # dataset=text: integer tokens keep their type
    x, y = (x.to(device) if tokens else x.to(device=device, dtype=dtype)), y.to(device)
    autocast, amp_dtype = autocast_of(device, amp)
    exact = dtype == torch.float64 and not amp
    # The reference: backprop in float64 on the same (possibly rounded) weights and batch.
    reference_model = model if exact else copy.deepcopy(model).to(torch.float64)
    keys = [id(p) for p in model.parameters() if p.requires_grad]
    reference, _ = probe(reference_model, x if tokens else x.double(), y, get_grad_mode("backprop"),
                         None, keys)
    del reference_model

    options = dict(arch.get("adjoint") or {})
    adjoint = get_grad_mode("adjoint", **{**options, "roundtrip": True})   # the self-check: free
    grads, roundtrip = probe(model, x, y, adjoint, autocast)
    result = compare_gradients(model, grads, reference)
    layers = result["layers"]
    if exact:
        floor = same = {"rel_error": 0.0, "stack_rel_error": 0.0 if layers else math.nan}
    else:   # backprop in the same precision: its own rounding, and the adjoint's on top
        low = probe(model, x, y, get_grad_mode("backprop"), autocast)[0]
        floor, same = compare_gradients(model, low, reference), compare_gradients(model, grads, low)
    tolerance = adjoint.max_roundtrip
    escalated = tolerance is not None and roundtrip is not None and not roundtrip <= tolerance
    checked = {}
    if escalated:   # the stacks switched to anchors: what the next training step gets
        every = [adjoint.anchors_of(s).step for s in residual_stacks(model) if adjoint.anchors_of(s)]
        again = compare_gradients(model, probe(model, x, y, adjoint, autocast)[0], reference)
        checked = {"escalated_rel_error": again["rel_error"],
                   "escalated_stack_rel_error": again["stack_rel_error"],
                   "escalated_anchor_every": min(every) if every else None}

    write_csv(layers, out_dir / "grad_error.csv", ["layer", "rel_error", "cosine"])
    summary = {
        "status": "completed", "rel_error": result["rel_error"], "cosine": result["cosine"],
        "stack_rel_error": result["stack_rel_error"], "stack_cosine": result["stack_cosine"],
        "max_layer_rel_error": max((r["rel_error"] for r in layers), default=0.0),
        "num_layers": len(layers),
        "reference": "backprop, float64, same weights and batch",
        "backprop_rel_error": floor["rel_error"],
        "backprop_stack_rel_error": floor["stack_rel_error"],
        # The adjoint against backprop in the same precision (the rebuild's own share).
        "vs_backprop_same_precision_stack_rel_error": same["stack_rel_error"],
        "roundtrip_error": roundtrip, "max_roundtrip": tolerance, "escalated": escalated,
        **checked,
        # Residual functions in all the model's stacks (= depth for mlp and conv).
        "depth": sum(s.depth for s in residual_stacks(model)), "method": arch.method, "init": arch.init,
        "model": arch.model.name, "width": int(arch.width), "dataset": arch.dataset.name,
        "batch": len(y), "dtype": cfg.dtype, "amp": amp, "amp_dtype": amp_dtype,
        "seed": int(cfg.seed), "device": str(device),
        "checkpoint": None if checkpoint is None else str(ckpt.locate(cfg.checkpoint)),
        "step": None if checkpoint is None else checkpoint.get("step"),
        "seconds": round(time.perf_counter() - start, 3),
        "config": plain(cfg),
    }
    write_json(summary, out_dir / "summary.json")
    precision = cfg.dtype + (f", amp {amp_dtype}" if amp else "")
    extra = "" if exact else f", backprop's own {floor['rel_error']:.3e}"
    print(f"rode gradcheck: depth {summary['depth']} {arch.method} init={arch.init} ({precision}): "
          f"rel_error {summary['rel_error']:.3e}{extra}, cosine {summary['cosine']:.8f}, "
          f"roundtrip {_fmt(roundtrip)}{' (passed max_roundtrip)' if escalated else ''} "
          f"({len(layers)} layers, largest layer rel_error "
          f"{summary['max_layer_rel_error']:.3e}) -> {out_dir}", flush=True)
    return summary


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3e}"


# ------------------------------------------------------------------ report
def report_section(jobs: list[Job], out: Path, figures: list[str]) -> str:
    """Gradient error of the adjoint vs depth, log-log, with fitted slopes."""
    done = [j for j in jobs if j.status == "completed" and (j.path / "grad_error.csv").is_file()]
    if not done:
        return ""
    extra = factors(done)
    series = defaultdict(list)
    rows = []
    for j in done:
        layers = [num(r.get("rel_error")) for r in read_csv(j.path / "grad_error.csv")]
        layers = [e for e in layers if not math.isnan(e)]
        # The residual layers' error (what the paper plots); all parameters as a fallback.
        total = num(j.summary.get("stack_rel_error", j.summary.get("rel_error")))
        if math.isnan(total) and layers:
            total = statistics.median(layers)
        depth = depth_of(j)
        if depth is None or math.isnan(total):
            continue
        label = series_label(j, ["method"], extra)
        lo, hi = (min(layers), max(layers)) if layers else (total, total)
        series[label].append((depth, total, lo, hi))
        floor = num(j.summary.get("backprop_stack_rel_error"))
        if floor > 0:   # below float64: backprop's own rounding error, dashed
            line, _, panel = label.partition(" | ")
            series[f"{line} backprop (same precision){' | ' + panel if panel else ''}"].append(
                (depth, floor, floor, floor))
        rows.append([label.replace(" | ", ", "), depth, total, lo, hi,
                     num(j.summary.get("rel_error")), num(j.summary.get("cosine")), floor,
                     num(j.summary.get("roundtrip_error"))])
    if not series:
        return ""
    rows.sort(key=lambda r: (r[0], r[1]))
    from ..plots import plot_grad_error  # matplotlib: only when a report is drawn
    plot_grad_error(dict(series), out / "grad_error.png")
    figures.append("grad_error.png")
    slopes = [[label.replace(" | ", ", "),
               f"{fit_slope([p[0] for p in pts], [p[1] for p in pts]):+.2f}", len(pts)]
              for label, pts in sorted(series.items())]
    return "\n".join([
        "## Gradient error vs depth (`rode gradcheck`)", "",
        "||g_adjoint - g_backprop|| / ||g_backprop||: over the residual layers' parameters "
        "(stack), the lowest and highest single layer, and over all parameters.", "",
        table(["series", "depth", "stack", "min layer", "max layer", "all params", "cosine",
               "backprop's own (stack)", "round trip"], rows), "",
        "Below float64 the reference stays backprop in float64 on the same weights; "
        "\"backprop's own\" is backprop's error in the run's precision (0 in float64).", "",
        "Fitted log-log slope of the stack error against depth:", "",
        table(["series", "slope", "depths"], slopes), "",
        "![gradient error vs depth](grad_error.png)"])


def report_result(job: Job) -> str:
    s = job.summary
    return f"grad rel error {s['rel_error']:.3g}" if "rel_error" in s else ""
