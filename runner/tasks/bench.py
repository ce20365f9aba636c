"""rode bench: time, memory and gradient error of one training step as depth grows.

For each integrator and depth, every contender (:mod:`runner.contenders`) runs
the same residual functions on the same batch: N residual functions (``model=mlp``:
MLPs of width ``width``; ``model=transformer``: pre-LayerNorm transformer blocks of
:func:`runner.transformer.transformer_functions`, the builder of ``rode train
model=transformer``, on a batch of (batch_size, tokens, width) token sequences;
tied weights by default), x_0 a random batch, the loss ||x_S - target||² / (2 batch),
then the backward pass to every parameter. Per (method, depth, contender) it records

- ``seconds_per_step``: median over ``repeats`` steps after warm-up; the
  contenders' steps are interleaved round by round, so that a noisy machine
  slows them alike and their ratios stay meaningful;
- ``peak_bytes``: the step's peak memory above what the model and batch already
  hold, ``runner.measure.peak_memory(..., isolated=True)``: on CPU each measurement
  runs in a fresh process and reads the kernel's peak resident set (VmHWM, reset
  after a warm-up step); on CUDA it is ``torch.cuda.max_memory_allocated`` above
  the memory allocated before the step;
- ``grad_rel_error``: ||g - g_backprop|| / ||g_backprop|| over all parameters,
  against backprop on the same functions and batch.

Writes ``bench.csv`` (one row per measurement), ``summary.json`` (status, config,
notes, the ratios the targets are about; the same in ``bench.json``, its older
name) and prints a table.
"""
from __future__ import annotations

import copy
import functools
import gc
import logging
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..config import as_list, show_progress
from ..contenders import CONTENDERS
from ..inits import INITS
from ..integrators import INTEGRATORS
from ..io import format_size, plain, write_csv, write_json
from ..measure import DTYPES, ISOLATED_KINDS, PeakMemoryError, peak_memory
from ..models import MLPBlock
from ..preflight import check_device
from ..reporting import Job, num, table, table_jobs
from ..stack import depth_step
from ..threads import apply as apply_threads
from ..transformer import transformer_functions

log = logging.getLogger("rode")

COLUMNS = ["depth", "contender", "method", "width", "batch_size", "seconds_per_step",
           "peak_bytes", "grad_rel_error",
           # extras, after the fixed columns
           "steps", "seconds_min", "repeats", "memory_kind", "device", "dtype", "init", "threads",
           "seconds_max", "model", "tokens"]
# bench.csv before batch_size: its column was `batch` (read with batch_size_of).
OLD_COLUMNS = {"batch": "batch_size"}
# Below float32 the gradient error is against backprop in float64 on the same weights.
LOW_PRECISION = ("bfloat16", "float16")


# -------------------------------------------------------------------- config
def validate(cfg) -> None:
    """The device (the schema and rules checked the rest)."""
    check_device(cfg)


# ------------------------------------------------------------------ problem
def residual_functions(spec: dict) -> list[nn.Module]:
    """``spec``'s residual functions: MLPs, or transformer blocks built as ``rode train
    model=transformer`` builds them (2 per layer with ``block=sequential``)."""
    width = spec["width"]
    if spec.get("model", "mlp") == "transformer":
        return transformer_functions(depth=spec["depth"], width=width, heads=spec["heads"],
                                     mlp_ratio=spec["mlp_ratio"], dropout=spec["dropout"],
                                     causal=False, block=spec["block"], init=spec["init"])
    hidden = spec["hidden"] or width
    return INITS[spec["init"]](lambda: MLPBlock(width, hidden, spec["activation"]), spec["depth"])


def step_size(spec: dict) -> float:
    """depth**-alpha, depth the layers (a sequential transformer block's two functions
    each take a full step, as in ``build_transformer``)."""
    return depth_step(spec["depth"], spec.get("alpha", 1.0))


def make_problem(spec: dict):
    """The residual functions, batch and target of one (method, depth): the same
    for every contender and in every process, given the same spec."""
    dtype, device = DTYPES[spec["dtype"]], torch.device(spec["device"])
    torch.manual_seed(spec["seed"])
    functions = residual_functions(spec)
    functions = [f.to(device=device, dtype=dtype) for f in functions]   # in place: ties survive
    params = list(nn.ModuleList(functions).parameters())                # distinct ones
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    shape = ((spec["batch"], spec["tokens"], spec["width"])
             if spec.get("model", "mlp") == "transformer" else (spec["batch"], spec["width"]))
    x0 = torch.randn(*shape, generator=g, dtype=dtype).to(device)
    target = torch.randn(*shape, generator=g, dtype=dtype).to(device)
    return functions, params, x0, target


def build(name: str, functions, spec: dict) -> nn.Module:
    """Contender ``name`` over ``functions``, for ``spec``'s method, step and options."""
    return CONTENDERS[name].build(functions, spec["method"], compile=spec["compile"],
                                  alpha=spec.get("alpha", 1.0), step_size=step_size(spec))


def float64_reference(functions, spec: dict, x0, target) -> torch.Tensor:
    """Backprop's gradient in float64 on the same (rounded) weights and batch, in
    the order of ``make_problem``'s params (one deep copy: ties survive)."""
    wide = copy.deepcopy(nn.ModuleList(functions)).to(torch.float64)
    params = list(wide.parameters())
    model = build("backprop", list(wide), {**spec, "compile": False})
    torch.manual_seed(spec["seed"] + 2)   # the same dropout masks as the compared step
    train_step(model, params, x0.double(), target.double())
    return flat_grad(params)


def train_step(model, params, x0, target) -> float:
    """One forward + backward pass; returns its wall time in seconds.

    Before the clock starts, the last step's garbage is collected and the device
    is idle; Python's cyclic collector stays off while the step runs (a collection
    in the middle of a step is noise, not the contender's cost)."""
    for p in params:
        p.grad = None
    cuda = x0.is_cuda
    gc.collect()
    if cuda:
        torch.cuda.synchronize(x0.device)
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        out = model(x0)
        loss = (out - target).pow(2).sum() / (2 * x0.shape[0])
        loss.backward()
        if cuda:
            torch.cuda.synchronize(x0.device)
        return time.perf_counter() - start
    finally:
        if enabled:
            gc.enable()


def flat_grad(params) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in params]).double()


# ------------------------------------------------------------------- memory
def prepared_step(spec: dict):
    """The training step of ``spec``'s contender, its model and batch built (in the
    measuring process: see ``measure.peak_memory(..., isolated=True)``). Its gradients
    are its output: dropped after each call, not part of what the next one starts from."""
    torch.set_num_threads(spec["threads"])
    functions, params, x0, target = make_problem(spec)
    model = build(spec["contender"], functions, spec)

    def step():
        train_step(model, params, x0, target)
        for p in params:
            p.grad = None
    return step


# ---------------------------------------------------------------------- run
def run(cfg) -> dict:
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = apply_threads(cfg)

    notes, names = [], []
    for name in dict.fromkeys(as_list(cfg, "contenders")):   # keep order, drop repeats
        why = CONTENDERS[name].missing()
        if why:
            notes.append(why)
        else:
            names.append(name)
    for note in notes:
        print(f"rode bench: note: {note}", flush=True)
    if "backprop" not in names:
        names.insert(0, "backprop")   # the reference for the gradient error and the ratios
    methods = list(dict.fromkeys(as_list(cfg, "methods")))
    depths = sorted(set(int(d) for d in as_list(cfg, "depths")))
    memory_kind = ISOLATED_KINDS[torch.device(device).type] if cfg.memory else "not_measured"

    inits = list(dict.fromkeys(as_list(cfg, "init")))
    jobs = [(i, m, d) for i in inits for m in methods for d in depths]
    work = sum(len([n for n in names if m in CONTENDERS[n].methods]) for _, m, _ in jobs)
    bar = tqdm(total=work, desc="bench", dynamic_ncols=True,
               disable=not show_progress(cfg))
    rows = []
    # What exists now (torch, Hydra, the config) lives for the whole run: frozen out of
    # the cyclic collector, the collection before each timed step visits only the
    # contenders' objects (0.2 s a collection otherwise).
    gc.collect()
    gc.freeze()
    try:
        for init, method, depth in jobs:
            spec = {"method": method, "depth": depth, "width": int(cfg.width),
                    "batch": int(cfg.batch_size), "init": init, "dtype": cfg.dtype,
                    "device": device, "seed": int(cfg.seed), "threads": threads,
                    "compile": bool(cfg.compile), "alpha": float(cfg.get("alpha", 1.0)),
                    **model_spec(cfg)}
            here = [n for n in names if method in CONTENDERS[n].methods]
            start = time.perf_counter()
            rows += _bench_one(spec, here, cfg, memory_kind, notes, bar)
            write_csv(rows, out_dir / "bench.csv", COLUMNS)   # after each depth: a long run keeps its rows
            if bar.disable:
                print(f"rode bench: {init} {method} depth {depth}: {len(here)} contenders in "
                      f"{time.perf_counter() - start:.0f} s", flush=True)
    finally:
        gc.unfreeze()
        bar.close()

    summary = {"status": "completed", "config": plain(cfg, exclude=["out_dir"]),
               "device": device, "threads": threads, "memory_kind": memory_kind,
               "torch": torch.__version__, "notes": notes, "ratios": ratios(rows)}
    write_json(summary, out_dir / "summary.json")
    write_json(summary, out_dir / "bench.json")
    print(format_table(rows), flush=True)
    for note in notes:
        print(f"note: {note}", flush=True)
    print(f"rode bench: {len(rows)} measurements ({device}, {threads} threads, "
          f"{cfg.dtype}) -> {out_dir / 'bench.csv'}", flush=True)
    return summary


def model_spec(cfg) -> dict:
    """The residual functions' keys of the config (``model.*``, ``tokens``), flat."""
    m = cfg.model
    if m.name == "transformer":
        return {"model": "transformer", "tokens": int(cfg.tokens), "heads": int(m.heads),
                "mlp_ratio": float(m.mlp_ratio), "dropout": float(m.dropout), "block": m.block}
    return {"model": "mlp", "hidden": m.hidden and int(m.hidden), "activation": m.activation}


def _bench_one(spec, names, cfg, memory_kind, notes, bar) -> list[dict]:
    """All contenders at one (method, depth): gradients, interleaved timing, memory."""
    functions, params, x0, target = make_problem(spec)
    models = {n: build(n, functions, spec) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    grads, peaks = {}, {}
    random = spec.get("dropout", 0.0) > 0
    for n, model in models.items():
        # The compared step draws from the same seed in every contender: the stack's
        # contenders (backprop, adjoint, checkpoint) then draw the same dropout masks.
        torch.manual_seed(spec["seed"] + 2)
        train_step(model, params, x0, target)   # warm-up; its gradients are the ones compared
        grads[n] = flat_grad(params)
        for _ in range(int(cfg.warmup)):
            train_step(model, params, x0, target)
    order = list(models)
    for r in range(int(cfg.repeats)):
        # Interleaved, the order rotated each round: no contender always runs
        # right after the same other one (or first, on a warm cache).
        for n in order[r % len(order):] + order[:r % len(order)]:
            times[n].append(train_step(models[n], params, x0, target))
    reference = (float64_reference(functions, spec, x0, target)
                 if spec["dtype"] in LOW_PRECISION else grads["backprop"])
    if random and "plain" in names:
        why = ("with model.dropout > 0 the plain loop draws its own dropout masks, not the "
               "stack's: its gradient error is not measured (nan)")
        if why not in notes:
            notes.append(why)
    del models
    gc.collect()

    rows = []
    for n in names:
        if memory_kind != "not_measured":
            try:
                peak, _ = peak_memory(functools.partial(prepared_step, {**spec, "contender": n}),
                                      torch.device(spec["device"]), isolated=True)
                peaks[n] = float(peak)
            except PeakMemoryError as e:
                why = (f"memory of {n} ({spec['method']}, depth {spec['depth']}) "
                       f"not measured: {e}")
                notes.append(why)
                print(f"rode bench: note: {why}", file=sys.stderr, flush=True)
        error = ((grads[n] - reference).norm() / reference.norm()).item()
        if random and n == "plain":
            error = math.nan
        rows.append({
            "depth": spec["depth"], "contender": n, "method": spec["method"],
            "width": spec["width"], "batch_size": spec["batch"],
            "seconds_per_step": statistics.median(times[n]),
            "peak_bytes": peaks.get(n, math.nan), "grad_rel_error": error,
            "steps": INTEGRATORS[spec["method"]]().num_steps(len(functions)),
            "seconds_min": min(times[n]), "seconds_max": max(times[n]), "repeats": len(times[n]),
            "memory_kind": memory_kind, "device": spec["device"], "dtype": spec["dtype"],
            "init": spec["init"], "threads": spec["threads"],
            "model": spec.get("model", "mlp"), "tokens": spec.get("tokens", ""),
        })
        bar.update()
    return rows


# ------------------------------------------------------------------ output
def ratios(rows: list[dict]) -> dict:
    """What the targets are about, per method: time / backprop's at each depth,
    peak memory at the largest depth / at depth 64 (or the smallest), gradient
    error / torchdiffeq's at each depth; with the ``plain`` contender, time / the
    plain loop's too (``time_vs_plain``: the plain Euler loop's for the methods that
    have no plain loop, rev_heun, momentum, coupled). Several inits in one run: keyed
    ``method/init``."""
    out = {}
    inits = list(dict.fromkeys(r.get("init") for r in rows))
    for method, init in dict.fromkeys((r["method"], r.get("init")) for r in rows):
        mine = [r for r in rows if r["method"] == method and r.get("init") == init]
        at = {(r["contender"], r["depth"]): r for r in mine}
        for (d, r) in _plain_floor(rows, method, init).items():
            at.setdefault(("plain", d), r)
        depths = sorted({r["depth"] for r in mine})
        base_depth = 64 if 64 in depths else depths[0]
        entry = {"time_vs_backprop": {}, "memory_growth": {}, "grad_error_vs_torchdiffeq": {},
                 "memory_growth_depths": [base_depth, depths[-1]]}
        if any(c == "plain" for c, _ in at):
            entry["time_vs_plain"] = {
                name: {d: at[name, d]["seconds_per_step"] / at["plain", d]["seconds_per_step"]
                       for d in depths if (name, d) in at and ("plain", d) in at}
                for name in dict.fromkeys(r["contender"] for r in mine)}
        for name in dict.fromkeys(r["contender"] for r in mine):
            entry["time_vs_backprop"][name] = {
                d: at[name, d]["seconds_per_step"] / at["backprop", d]["seconds_per_step"]
                for d in depths if (name, d) in at and ("backprop", d) in at}
            lo, hi = at.get((name, base_depth)), at.get((name, depths[-1]))
            if lo and hi and lo["peak_bytes"] > 0:
                entry["memory_growth"][name] = hi["peak_bytes"] / lo["peak_bytes"]
            entry["grad_error_vs_torchdiffeq"][name] = {
                d: at[name, d]["grad_rel_error"] / at["torchdiffeq", d]["grad_rel_error"]
                for d in depths if (name, d) in at and ("torchdiffeq", d) in at
                and at["torchdiffeq", d]["grad_rel_error"] > 0}
        out[method if len(inits) == 1 else f"{method}/{init}"] = entry
    return _finite(out)


def _plain_floor(rows: list[dict], method: str, init) -> dict:
    """depth -> the plain loop's row for ``method`` (the Euler one where the method has
    no plain loop of its own)."""
    for m in (method, "euler"):
        found = {r["depth"]: r for r in rows if r["contender"] == "plain" and r["method"] == m
                 and r.get("init") == init}
        if found:
            return found
    return {}


def _finite(value):
    """NaN (a measurement that failed or was skipped) as None, for strict JSON."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def format_table(rows: list[dict]) -> str:
    head = (f"{'method':<8} {'depth':>6} {'contender':<15} {'s/step':>9} {'x bp':>6} "
            f"{'peak MiB':>9} {'x bp':>6} {'grad rel err':>12} {'x plain':>7} {'init':<6}")
    lines = [head, "-" * len(head)]
    bp = {(r["method"], r["depth"], r.get("init")): r for r in rows if r["contender"] == "backprop"}
    floor = {(r["method"], r["depth"], r.get("init")): r for r in rows if r["contender"] == "plain"}
    for r in rows:
        key = (r["method"], r["depth"], r.get("init"))
        ref = bp.get(key)
        low = floor.get(key) or floor.get(("euler", r["depth"], r.get("init")))   # rev_heun ...
        t_ratio = r["seconds_per_step"] / ref["seconds_per_step"] if ref else math.nan
        p_ratio = r["seconds_per_step"] / low["seconds_per_step"] if low else math.nan
        m_ratio = (r["peak_bytes"] / ref["peak_bytes"]
                   if ref and ref["peak_bytes"] and ref["peak_bytes"] > 0 else math.nan)
        lines.append(f"{r['method']:<8} {r['depth']:>6} {r['contender']:<15} "
                     f"{r['seconds_per_step']:>9.4f} {t_ratio:>6.2f} "
                     f"{r['peak_bytes'] / 2**20:>9.1f} {m_ratio:>6.2f} {r['grad_rel_error']:>12.2e} "
                     f"{p_ratio:>7.2f} {r.get('init') or '':<6}")
    return "\n".join(lines)


# ------------------------------------------------------------------ report
def batch_size_of(row: dict):
    """A bench.csv row's batch size: column ``batch_size``, or ``batch`` in older files."""
    for new_or_old in ("batch_size", *OLD_COLUMNS):
        if row.get(new_or_old) not in (None, ""):
            return row[new_or_old]
    return None


def report_section(jobs: list[Job], out: Path, figures: list[str]) -> str:
    found = table_jobs(jobs, "bench.csv")
    rows = [r for _, rs in found for r in rs]
    if not rows:
        return ""
    from ..plots import plot_bench  # matplotlib: only when a report is drawn
    plot_bench(rows, out / "bench.png")
    figures.append("bench.png")
    body = [[r.get("contender"), r.get("method"), int(num(r["depth"])), r.get("width"),
             batch_size_of(r), num(r.get("seconds_per_step")), format_size(r.get("peak_bytes")),
             num(r.get("grad_rel_error"))]
            for r in sorted(rows, key=lambda r: (r.get("method", ""), num(r["depth"]),
                                                 r.get("contender", "")))]
    notes = [n for j, _ in found for n in j.summary.get("notes", [])]
    return "\n".join([
        "## Benchmark: one training step vs depth (`rode bench`)", "",
        table(["contender", "method", "depth", "width", "batch_size", "s/step", "peak",
               "grad error"], body), "",
        *[f"- note: {n}" for n in notes], *([""] if notes else []),
        "![benchmark](bench.png)"])
