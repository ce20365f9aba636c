"""One training step of ``model=transformer`` (a causal character LM, pre-LN parallel
blocks) per depth and grad mode: time per step, peak memory and saved activations.

Used by ``scripts/gpu_check.sh`` (check ``transformer``); ``rode bench`` builds MLP
stacks only. For each depth, each contender (``<grad>:<method>``, e.g. ``backprop:euler``,
``adjoint:euler``, ``adjoint:coupled``) is built on the device with the same seed, then
``warmup`` + ``repeats`` steps (forward under amp when asked, backward, Adam step) are
timed (the median is kept; CUDA synchronised). Peak memory is
``torch.cuda.max_memory_allocated`` during one step minus the memory allocated before it
(parameters, gradients and Adam's state already allocated by the warm-up), on CUDA only;
``saved_bytes`` is what autograd keeps for the backward pass, measured as ``rode memory``
measures it (saved-tensor hooks on one forward pass), on any device. ``grad_rel_error``
is the relative distance of the contender's first gradient to backprop's (same method)
at that depth.

Writes a JSON list of rows to ``--out`` and prints a table; exits 1 if a step fails or
gives a non-finite loss or time.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from runner import measure
from runner.gradmodes import get_grad_mode
from runner.integrators import get_integrator
from runner.transformer import build_transformer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.detach().float().flatten() for p in model.parameters()
                      if p.grad is not None])


def one(args, device, depth: int, grad: str, method: str) -> tuple[dict, torch.Tensor]:
    torch.manual_seed(0)
    with torch.device(device):
        model = build_transformer((args.tokens,), args.vocab, depth=depth, width=args.width,
                                  init="iid", method=get_integrator(method),
                                  grad=get_grad_mode(grad), heads=args.heads, sequence=True)
    model.train()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, args.vocab, (args.batch, args.tokens), generator=g).to(device)
    y = torch.randint(0, args.vocab, (args.batch, args.tokens), generator=g).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    autocast, amp_dtype = measure.autocast_of(device, args.amp)

    def step() -> float:
        opt.zero_grad(set_to_none=False)
        with autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        opt.step()
        return float(loss.detach())

    times, losses, first = [], [], None
    for i in range(args.warmup + args.repeats):
        if i == args.warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        sync(device)
        start = time.perf_counter()
        losses.append(step())
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
        if first is None:
            first = flat_grad(model)
    peak = (torch.cuda.max_memory_allocated(device) - base) if device.type == "cuda" else math.nan
    with autocast():
        saved = measure.saved_activation_bytes(model, x, y, F.cross_entropy)["saved_bytes"]
    row = {"depth": depth, "grad": grad, "method": method, "width": args.width,
           "batch": args.batch, "tokens": args.tokens, "amp": amp_dtype,
           "device": str(device), "seconds_per_step": statistics.median(times),
           "peak_bytes": peak, "saved_bytes": saved, "loss": losses[-1],
           "params": sum(p.numel() for p in model.parameters())}
    return row, first


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--depths", default="64,256,1024")
    p.add_argument("--contenders", default="backprop:euler,adjoint:euler")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--amp", action="store_true")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows, failed = [], False
    for depth in (int(d) for d in args.depths.split(",")):
        ref: dict[str, torch.Tensor] = {}
        for spec in args.contenders.split(","):
            grad, method = spec.split(":")
            try:
                row, g = one(args, device, depth, grad, method)
                if device.type == "cuda":
                    torch.cuda.empty_cache()   # the contender's model and optimizer are gone
            except Exception as e:  # noqa: BLE001 - a failed contender is recorded, the rest run
                print(f"{spec} depth {depth}: {type(e).__name__}: {e}", file=sys.stderr)
                rows.append({"depth": depth, "grad": grad, "method": method,
                             "error": f"{type(e).__name__}: {e}"})
                failed = True
                continue
            if grad == "backprop":
                ref[method] = g
            r = ref.get(method)
            row["grad_rel_error"] = (float((g - r).norm() / r.norm()) if r is not None
                                     else math.nan)
            failed |= not (math.isfinite(row["loss"]) and math.isfinite(row["seconds_per_step"]))
            rows.append(row)
            print(f"depth {depth:>5} {grad:>8} {method:<8} {row['seconds_per_step']:.4f} s/step  "
                  f"peak {row['peak_bytes'] / 2**20:.1f} MiB  saved {row['saved_bytes'] / 2**20:.2f} MiB"
                  f"  grad rel err {row['grad_rel_error']:.2e}", flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
