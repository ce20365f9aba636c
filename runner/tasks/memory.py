"""rode memory: activation memory and peak memory of one training step vs depth.

For each depth and grad mode, builds the model, and on a random batch measures

- ``saved_bytes``: bytes autograd saves for backward in the forward pass (whole
  model and loss; parameters not counted), via ``saved_tensors_hooks``;
- ``peak_bytes``: the peak memory of one training step (forward, backward,
  SGD update), measured after one warm-up step; its kind is in summary.json
  (``cuda_max_memory_allocated`` on GPU, ``cpu_peak_rss_growth`` on CPU: see
  :func:`runner.measure.peak_memory`);
- ``seconds_per_step``: the median over ``steps`` more steps.

Writes ``memory.csv`` (depth, grad, method, saved_bytes, peak_bytes,
seconds_per_step) and ``summary.json``, and prints the table.
"""
from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf, open_dict
from tqdm import tqdm

from ..config import as_list, show_progress
from ..data import build_dataset
from ..engine import seed_everything
from ..io import format_size, plain, write_csv, write_json
from ..measure import peak_memory, saved_activation_bytes
from ..models import build_model
from ..preflight import check_device, resolve_device
from ..reporting import Job, num, table, table_jobs
from ..threads import apply as apply_threads

COLUMNS = ["depth", "grad", "method", "saved_bytes", "peak_bytes", "seconds_per_step"]


def validate(cfg) -> None:
    """The device (the schema and rules checked the rest)."""
    check_device(cfg)


def measure_step(cfg, depth: int, grad: str, input_shape, num_classes, device) -> dict:
    """One configuration: saved bytes, peak memory and time of a training step."""
    arch = OmegaConf.create(plain(cfg))
    with open_dict(arch):
        arch.depth, arch.grad = depth, grad
    seed_everything(cfg.seed)
    model = build_model(arch, input_shape, num_classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(cfg.seed)
    if cfg.dataset.name == "text":   # random tokens, a target per position
        x = torch.randint(0, num_classes, (cfg.batch_size, *input_shape), generator=g).to(device)
        y = torch.randint(0, num_classes, (cfg.batch_size, *input_shape), generator=g).to(device)
    else:
        x = torch.randn(cfg.batch_size, *input_shape, generator=g).to(device)
        y = torch.randint(0, num_classes, (cfg.batch_size,), generator=g).to(device)
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    saved = saved_activation_bytes(model, x, y)
    step()   # warm-up: one-time allocations (gradients' first use, kernels, thread pools)
    peak, kind = peak_memory(step, device)
    seconds = []
    for _ in range(cfg.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return {"depth": depth, "grad": grad, "method": cfg.method,
            "saved_bytes": saved["saved_bytes"], "peak_bytes": peak,
            "seconds_per_step": statistics.median(seconds),
            "stack_saved_bytes": saved["stack_saved_bytes"],
            "stack_output_bytes": saved["stack_output_bytes"], "peak_kind": kind}


def run(cfg) -> dict:
    start = time.perf_counter()
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    data = build_dataset(cfg.dataset)
    jobs = [(int(d), str(g)) for d in as_list(cfg, "depths") for g in as_list(cfg, "grads")]

    threads = torch.get_num_threads()
    used = apply_threads(cfg)
    rows = []
    bar = tqdm(jobs, desc="memory", leave=False, dynamic_ncols=True,
               disable=not show_progress(cfg))
    try:
        for depth, grad in bar:
            bar.set_postfix(depth=depth, grad=grad)
            rows.append(measure_step(cfg, depth, grad, data.input_shape, data.num_classes, device))
            gc.collect()
    finally:
        bar.close()
        torch.set_num_threads(threads)

    write_csv(rows, out_dir / "memory.csv", COLUMNS)
    kinds = sorted({r["peak_kind"] for r in rows})
    summary = {"status": "completed", "peak_kind": kinds[0] if len(kinds) == 1 else kinds,
               "device": str(device), "method": cfg.method, "init": cfg.init, "model": cfg.model.name,
               "width": int(cfg.width), "batch": int(cfg.batch_size), "dataset": cfg.dataset.name,
               "threads": used,
               "rows": rows, "seconds": round(time.perf_counter() - start, 3),
               "config": plain(cfg)}
    write_json(summary, out_dir / "summary.json")

    print(f"rode memory: one training step, {cfg.model.name} width {cfg.width}, batch "
          f"{cfg.batch_size}, {cfg.method}, init={cfg.init}, {device} (peak: {summary['peak_kind']})")
    print(f"{'depth':>6}  {'grad':<8}  {'saved':>10}  {'peak':>10}  {'s/step':>8}")
    for r in rows:
        print(f"{r['depth']:>6}  {r['grad']:<8}  {format_size(r['saved_bytes']):>10}  "
              f"{format_size(r['peak_bytes']):>10}  {r['seconds_per_step']:>8.4f}")
    print(f"-> {out_dir}", flush=True)
    return summary


# ------------------------------------------------------------------ report
def report_section(jobs: list[Job], out: Path, figures: list[str]) -> str:
    found = table_jobs(jobs, "memory.csv")
    rows = [r for _, rs in found for r in rs]
    if not rows:
        return ""
    from ..plots import plot_memory  # matplotlib: only when a report is drawn
    plot_memory(rows, out / "memory.png")
    figures.append("memory.png")
    kinds = {str(j.summary.get("peak_kind")) for j, _ in found if j.summary.get("peak_kind")}
    body = [[r.get("method"), r.get("grad"), int(num(r["depth"])),
             format_size(r.get("saved_bytes")), format_size(r.get("peak_bytes")),
             num(r.get("seconds_per_step"))]
            for r in sorted(rows, key=lambda r: (r.get("method", ""), r.get("grad", ""),
                                                 num(r["depth"])))]
    return "\n".join([
        "## Memory vs depth (`rode memory`)", "",
        table(["method", "grad", "depth", "saved for backward", "peak", "s/step"], body), "",
        f"Peak memory: {', '.join(sorted(kinds)) or 'kind not recorded'}.", "",
        "![memory vs depth](memory.png)"])
