#!/usr/bin/env bash
# One-GPU acceptance check of rode's CUDA paths, in at most about 8 minutes.
#
# Usage: scripts/gpu_check.sh [smoke] [out_dir]
#   (no smoke): on the GPU(s), device=cuda. Checks:
#     bench_w256    rode bench, width 256, batch 1024, depths 64..4096, Euler: backprop,
#                   adjoint, adjoint_shared, checkpoint, torchdiffeq; time per step and
#                   peak memory (torch.cuda.max_memory_allocated above the step's baseline)
#     bench_w1024   the same at width 1024
#     deep          rode bench in the deep regime: depth 1000, width 64, batch 64, Euler and Heun
#     transformer   one training step of model=transformer (causal LM, width 512, 8 heads, batch
#                   8 x 128 tokens, amp) at depths 64, 256, 1024: backprop vs the adjoint (Euler)
#                   and the exact coupled adjoint; time per step, peak memory
#                   (torch.cuda.max_memory_allocated above the step's baseline), saved
#                   activations (scripts/gpu_transformer.py; amp and CUDA peaks, which rode bench does not time)
#     gradcheck     rode gradcheck in bfloat16 (and amp=true) for euler, heun, rev_heun,
#                   momentum at depths 256 and 1024: the adjoint's gradient error against
#                   backprop in float64, backprop's own bfloat16 error, the round-trip error
#     conv_amp      rode train of the conv ResNet on 32x32 synthetic images with amp=true,
#                   grad=backprop vs grad=adjoint: time per step and peak memory
#     ddp_train     torchrun --nproc_per_node=<visible GPUs> -m runner train ... device=cuda
#     ddp_backend   DistributedDataParallel over a rode model (grad=adjoint) on nccl with
#                   every visible GPU (with a single GPU too: a one-process nccl group)
#   smoke: the same checks at toy size on CPU (gloo, no amp) in under 2 minutes; the test
#          suite runs it (tests/test_gpu_check.py) so that the script keeps working.
#
# Writes <out_dir>/summary.md (a table per check, pass/fail, the key figures, device and
# versions), <out_dir>/summary.json, and each check's log and results under <out_dir>/<check>/.
# Exits 1 if any check fails; a failing check never stops the others.
# out_dir defaults to outputs/gpu_check/<date_time>.
# Environment: RODE (the rode command, default: `rode` on PATH, else `python -m runner`),
#   PYTHON (the interpreter that has rode installed), CHECKS (a subset, e.g. "gradcheck ddp_train").
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"

MODE=full
if [[ "${1:-}" == smoke ]]; then MODE=smoke; shift; fi
OUT="${1:-outputs/gpu_check/$(date +%Y-%m-%d_%H-%M-%S)}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"

# The interpreter and the rode command: the venv's when there is one.
if [[ -z "${PYTHON:-}" ]]; then
  if command -v rode >/dev/null 2>&1 && [[ -x "$(dirname "$(command -v rode)")/python" ]]; then
    PYTHON="$(dirname "$(command -v rode)")/python"
  elif [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"
  else PYTHON=python3; fi
fi
if [[ -z "${RODE:-}" ]]; then
  if command -v rode >/dev/null 2>&1; then RODE=rode; else RODE="$PYTHON -m runner"; fi
fi
read -r -a RODE_CMD <<<"$RODE"
TORCHRUN=("$PYTHON" -m torch.distributed.run)
CHECKS="${CHECKS:-bench_w256 bench_w1024 deep transformer gradcheck conv_amp ddp_train ddp_backend}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # python -m runner from anywhere

METHODS4=euler,heun,rev_heun,momentum
CONTENDERS="[backprop,adjoint,adjoint_shared,checkpoint,torchdiffeq]"
if [[ $MODE == smoke ]]; then
  DEVICE=cpu; NPROC=2; AMP=false
  export OMP_NUM_THREADS=1
  BENCH_COMMON=(device=cpu threads=1 warmup=0 repeats=1 progress=false "contenders=$CONTENDERS")
  W256=(depths=[4,16] methods=[euler] width=8 batch_size=16 memory=true)
  W1024=(depths=[4,16] methods=[euler] width=16 batch_size=16 memory=false)
  DEEP=(depths=[32] methods=[euler,heun] width=8 batch_size=8 memory=false)
  TF=(--device cpu --depths 2,4 --width 16 --heads 2 --batch 2 --tokens 8 --vocab 16
      --warmup 0 --repeats 1)
  GC_SIZE=(depth=8 width=8 batch_size=32); GC_RUNS=4   # 4 methods, one depth
  CONV=(dataset.shape=[3,8,8] dataset.num_samples=64 depth=2 width=4 batch_size=16
        eval_batch_size=64 threads=1)
  TRAIN=(dataset=synthetic dataset.num_samples=64 depth=4 width=8 batch_size=16 epochs=1 threads=1)
  T_BENCH=60; T_BENCH_BIG=60; T_DEEP=60; T_TF=120; T_GC=60; T_CONV=60; T_DDP=90
else
  DEVICE=cuda; AMP=true
  NPROC="$("$PYTHON" -c 'import torch; print(max(1, torch.cuda.device_count()))' 2>/dev/null || echo 1)"
  BENCH_COMMON=(device=cuda threads=null warmup=1 repeats=3 progress=false "contenders=$CONTENDERS")
  W256=(depths=[64,256,1024,4096] methods=[euler] width=256 batch_size=1024 init=tied)
  W1024=(depths=[64,256,1024,4096] methods=[euler] width=1024 batch_size=1024 init=tied)
  DEEP=(depths=[1000] methods=[euler,heun] width=64 batch_size=64)
  TF=(--device cuda --amp --depths 64,256,1024 --width 512 --heads 8 --batch 8 --tokens 128
      --vocab 128 --warmup 1 --repeats 2)
  GC_SIZE=(depth=256,1024 batch_size=256); GC_RUNS=16   # x 2 depths x (bfloat16, amp)
  CONV=(dataset.shape=[3,32,32] dataset.num_samples=2560 depth=32 width=64 batch_size=128
        eval_batch_size=512)
  TRAIN=(dataset=synthetic dataset.num_samples=4096 depth=16 width=256 batch_size=256 epochs=1)
  # Budget (seconds), about 8 minutes in all: a check past its limit is stopped and fails.
  T_BENCH=80; T_BENCH_BIG=150; T_DEEP=50; T_TF=100; T_GC=50; T_CONV=60; T_DDP=40
fi

: >"$OUT/checks.tsv"
# check NAME LIMIT_S CMD...: runs CMD (log: <out>/NAME/log.txt); records exit status and time.
check() {
  local name=$1 limit=$2; shift 2
  [[ " $CHECKS " == *" $name "* ]] || return 0
  mkdir -p "$OUT/$name"
  echo "== $name: $*" | tee "$OUT/$name/log.txt"
  local start=$SECONDS rc
  timeout --kill-after=15 "$limit" "$@" >>"$OUT/$name/log.txt" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$limit" >>"$OUT/$name/../checks.tsv"
  if [[ $rc == 0 ]]; then echo "   ok ($((SECONDS - start)) s)"
  else echo "   FAILED (exit $rc, $((SECONDS - start)) s): see $OUT/$name/log.txt"; tail -5 "$OUT/$name/log.txt"; fi
}

check bench_w256 "$T_BENCH" "${RODE_CMD[@]}" bench "${BENCH_COMMON[@]}" "${W256[@]}" \
  "hydra.run.dir=$OUT/bench_w256"
check bench_w1024 "$T_BENCH_BIG" "${RODE_CMD[@]}" bench "${BENCH_COMMON[@]}" "${W1024[@]}" \
  "hydra.run.dir=$OUT/bench_w1024"
check deep "$T_DEEP" "${RODE_CMD[@]}" bench "${BENCH_COMMON[@]}" "${DEEP[@]}" \
  "hydra.run.dir=$OUT/deep"
mkdir -p "$OUT/transformer"
check transformer "$T_TF" "$PYTHON" "$ROOT/scripts/gpu_transformer.py" "${TF[@]}" \
  --contenders backprop:euler,adjoint:euler,adjoint:coupled --out "$OUT/transformer/rows.json"
# Two sweeps, one check: bfloat16 weights, then (on CUDA) amp over float32 weights.
mkdir -p "$OUT/gradcheck"
{
  echo "set -e"
  printf '%q ' "${RODE_CMD[@]}" -m gradcheck "method=$METHODS4" dtype=bfloat16 "${GC_SIZE[@]}" \
    "device=$DEVICE" "hydra.sweep.dir=$OUT/gradcheck/bfloat16"; echo
  if [[ $AMP == true ]]; then
    printf '%q ' "${RODE_CMD[@]}" -m gradcheck "method=$METHODS4" dtype=float32 amp=true \
      "${GC_SIZE[@]}" "device=$DEVICE" "hydra.sweep.dir=$OUT/gradcheck/amp"; echo
  fi
} >"$OUT/gradcheck/run.sh"
check gradcheck "$T_GC" bash "$OUT/gradcheck/run.sh"
check conv_amp "$T_CONV" "${RODE_CMD[@]}" -m train model=conv dataset=synthetic \
  dataset.num_classes=10 "${CONV[@]}" epochs=1 grad=backprop,adjoint "amp=$AMP" \
  "device=$DEVICE" progress=false "hydra.sweep.dir=$OUT/conv_amp"
check ddp_train "$T_DDP" "${TORCHRUN[@]}" --standalone "--nproc_per_node=$NPROC" -m runner train \
  "${TRAIN[@]}" grad=adjoint "device=$DEVICE" progress=false "hydra.run.dir=$OUT/ddp_train"

# DDP over a rode model on the device's backend (nccl on CUDA), any number of processes.
mkdir -p "$OUT/ddp_backend"
cat >"$OUT/ddp_backend/ddp_backend.py" <<'PY'
import json, os, sys
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from runner.models import build_mlp

device_kind, out = sys.argv[1], sys.argv[2]
rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
device = torch.device("cuda", local) if device_kind == "cuda" else torch.device("cpu")
if device.type == "cuda":
    torch.cuda.set_device(device)
backend = "nccl" if device.type == "cuda" else "gloo"
dist.init_process_group(backend, rank=rank, world_size=world)
torch.manual_seed(0)
model = build_mlp([16], 4, depth=32, width=32, hidden=None, activation="tanh", init="iid",
                  method="heun", grad="adjoint").to(device)
net = DistributedDataParallel(model, device_ids=[local] if device.type == "cuda" else None)
g = torch.Generator().manual_seed(rank)
x, y = torch.randn(64, 16, generator=g).to(device), torch.randint(0, 4, (64,), generator=g).to(device)
opt = torch.optim.SGD(net.parameters(), lr=0.1)
for _ in range(3):
    opt.zero_grad()
    torch.nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
spread = flat.clone()
dist.all_reduce(spread, op=dist.ReduceOp.MAX)
low = flat.clone()
dist.all_reduce(low, op=dist.ReduceOp.MIN)
diff = (spread - low).abs().max().item()
if rank == 0:
    with open(out, "w") as f:
        json.dump({"backend": backend, "world_size": world, "param_max_diff": diff,
                   "finite": bool(torch.isfinite(flat).all())}, f)
dist.barrier()
dist.destroy_process_group()
# Skip the interpreter's teardown: gloo's threads can abort it ("terminate called
# without an active exception") after the work is done and recorded.
sys.stdout.flush()
os._exit(0)
PY
check ddp_backend "$T_DDP" "${TORCHRUN[@]}" --standalone "--nproc_per_node=$NPROC" \
  "$OUT/ddp_backend/ddp_backend.py" "$DEVICE" "$OUT/ddp_backend/result.json"

# ------------------------------------------------------------------ summary
"$PYTHON" - "$OUT" "$MODE" "$CHECKS" "$GC_RUNS" <<'PY'
import csv, json, math, platform, socket, sys, time
from pathlib import Path

out, mode, wanted = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split()
gc_runs = int(sys.argv[4])
ran = {}
for line in (out / "checks.tsv").read_text().splitlines():
    name, rc, secs, limit = line.split("\t")
    ran[name] = {"rc": int(rc), "seconds": int(secs), "limit": int(limit)}


def versions():
    try:
        import torch
    except ImportError as e:
        return {"torch": f"not importable ({e})"}
    v = {"torch": torch.__version__, "cuda (torch built with)": torch.version.cuda,
         "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
         "gpus visible": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    if torch.cuda.is_available():
        v["device"] = ", ".join(sorted({torch.cuda.get_device_name(i)
                                        for i in range(torch.cuda.device_count())}))
        v["bf16 supported"] = torch.cuda.is_bf16_supported()
    else:
        v["device"] = f"CPU ({platform.processor() or platform.machine()})"
    return v


def f(x, spec=".3g"):
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "-"
    return "-" if math.isnan(x) else format(x, spec)


def mib(x):
    return f(float(x) / 2**20, ".1f") if f(x) != "-" else "-"


def md(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def jobs(folder):   # the summary.json of each run under folder
    return [(p.parent, json.loads(p.read_text())) for p in sorted(folder.rglob("summary.json"))]


def bench(name):
    path = out / name / "bench.csv"
    rows = list(csv.DictReader(path.open())) if path.is_file() else []
    problems = [f"{r['contender']} {r['method']} depth {r['depth']}: no finite time"
                for r in rows if f(r["seconds_per_step"]) == "-"]
    problems += [f"{r['contender']} {r['method']} depth {r['depth']}: no peak memory"
                 for r in rows if r.get("memory_kind") != "not_measured" and f(r["peak_bytes"]) == "-"]
    summary = out / name / "summary.json"
    problems += json.loads(summary.read_text()).get("notes", []) if summary.is_file() else []
    bp = {(r["method"], r["depth"]): r for r in rows if r["contender"] == "backprop"}
    table, key = [], []
    for r in rows:
        ref = bp.get((r["method"], r["depth"]))
        t = float(r["seconds_per_step"]) / float(ref["seconds_per_step"]) if ref else math.nan
        try:
            m = float(r["peak_bytes"]) / float(ref["peak_bytes"])
        except (TypeError, ValueError, ZeroDivisionError):
            m = math.nan
        table.append([r["method"], r["depth"], r["contender"], f(r["seconds_per_step"], ".4f"),
                      f(t, ".2f"), mib(r["peak_bytes"]), f(m, ".2f"), f(r["grad_rel_error"], ".2e")])
    if rows:
        deepest = max(int(r["depth"]) for r in rows)
        for r in rows:
            ref = bp.get((r["method"], r["depth"]))
            if int(r["depth"]) == deepest and r["contender"] != "backprop" and ref:
                key.append(f"{r['contender']} ({r['method']}, depth {deepest}): "
                           f"time x{f(float(r['seconds_per_step']) / float(ref['seconds_per_step']), '.2f')}"
                           f", peak {mib(r['peak_bytes'])} MiB vs backprop {mib(ref['peak_bytes'])} MiB")
    body = md(["method", "depth", "contender", "s/step", "x bp", "peak MiB", "x bp", "grad rel err"], table)
    return (not problems and bool(rows)), "; ".join(key[:3]) or "no rows", body, problems


def transformer(name):
    rows = json.loads((out / name / "rows.json").read_text())
    problems = [f"{r['grad']}:{r['method']} depth {r['depth']}: {r['error']}"
                for r in rows if "error" in r]
    good = [r for r in rows if "error" not in r]
    cuda = any(r["device"].startswith("cuda") for r in good)
    problems += [f"{r['grad']}:{r['method']} depth {r['depth']}: no finite time or loss"
                 for r in good if f(r["seconds_per_step"]) == "-" or f(r["loss"]) == "-"]
    if cuda:
        problems += [f"{r['grad']}:{r['method']} depth {r['depth']}: no peak memory"
                     for r in good if f(r["peak_bytes"]) == "-"]
    bp = {r["depth"]: r for r in good if r["grad"] == "backprop" and r["method"] == "euler"}
    table, key = [], []
    deepest = max((r["depth"] for r in good), default=None)
    for r in good:
        ref = bp.get(r["depth"])
        t = r["seconds_per_step"] / ref["seconds_per_step"] if ref else math.nan
        table.append([r["depth"], r["grad"], r["method"], r["amp"] or "-",
                      f(r["seconds_per_step"], ".4f"), f(t, ".2f"), mib(r["peak_bytes"]),
                      mib(r["saved_bytes"]), f(r["grad_rel_error"], ".2e")])
        if r["depth"] == deepest and r["grad"] == "adjoint" and ref:
            key.append(f"{r['grad']}:{r['method']} depth {deepest}: time x{f(t, '.2f')}, peak "
                       f"{mib(r['peak_bytes'])} vs {mib(ref['peak_bytes'])} MiB, saved "
                       f"{mib(r['saved_bytes'])} vs {mib(ref['saved_bytes'])} MiB")
            if not r["saved_bytes"] < ref["saved_bytes"]:
                problems.append(f"adjoint:{r['method']} depth {deepest} saves as much as backprop")
    if not good:
        problems.append("no rows")
    body = md(["depth", "grad", "method", "amp", "s/step", "x bp", "peak MiB", "saved MiB",
               "grad rel err"], table)
    return not problems, "; ".join(key) or "no rows", body, problems


def gradcheck(name):
    found = jobs(out / name)
    rows, problems = [], []
    for _, s in sorted(found, key=lambda js: (js[1].get("amp", False), js[1]["method"], js[1]["depth"])):
        prec = s["dtype"] + (f" amp {s.get('amp_dtype')}" if s.get("amp") else "")
        vals = [s.get("stack_rel_error"), s.get("backprop_stack_rel_error")]
        if any(f(v) == "-" or not math.isfinite(float(v)) for v in vals):
            problems.append(f"{s['method']} depth {s['depth']} {prec}: non-finite error")
        rows.append([s["method"], s["depth"], prec, f(vals[0], ".3e"), f(vals[1], ".3e"),
                     f(s.get("roundtrip_error"), ".3e"), s.get("device")])
    if len(found) < gc_runs:
        problems.append(f"{len(found)} of {gc_runs} runs finished")
    worst = max(rows, key=lambda r: float(r[3]) if r[3] != "-" else math.inf, default=None)
    key = (f"{len(found)} runs; largest adjoint error {worst[3]} ({worst[0]}, depth {worst[1]}, "
           f"{worst[2]}; backprop's own {worst[4]})") if worst else "no runs"
    body = md(["method", "depth", "precision", "adjoint stack rel err", "backprop's own",
               "round trip", "device"], rows)
    return not problems, key, body, problems


def conv_amp(name):
    found = [s for _, s in jobs(out / name)]
    rows, problems = [], []
    by = {}
    for s in found:
        grad = s.get("config", {}).get("grad")
        steps = s.get("steps") or 0
        per = s["seconds"] / steps if steps else math.nan
        by[grad] = (per, s.get("peak_memory_bytes"))
        if s.get("status") != "completed" or not math.isfinite(s.get("train_loss", math.nan)):
            problems.append(f"{grad}: status {s.get('status')}, train_loss {s.get('train_loss')}")
        rows.append([grad, s.get("config", {}).get("amp"), steps, f(per, ".4f"),
                     mib(s.get("peak_memory_bytes")), s.get("peak_memory_kind"),
                     f(s.get("train_loss"), ".4f"), f(s.get("test_acc"), ".3f")])
    if set(by) != {"backprop", "adjoint"}:
        problems.append(f"runs finished: {sorted(by)}")
    key = "-"
    if {"backprop", "adjoint"} <= set(by):
        (tb, mb), (ta, ma) = by["backprop"], by["adjoint"]
        key = (f"adjoint/backprop: time x{f(ta / tb, '.2f')}, peak x"
               f"{f(float(ma) / float(mb), '.2f') if mb else '-'}")
    body = md(["grad", "amp", "steps", "s/step (train time / steps)", "peak MiB", "peak kind",
               "train loss", "test acc"], rows)
    return not problems, key, body, problems


def ddp_train(name):
    found = [s for _, s in jobs(out / name)]
    if not found:
        return False, "no summary.json", "", ["no summary.json"]
    s = found[0]
    ok = s.get("status") == "completed" and math.isfinite(s.get("train_loss", math.nan))
    diff = s.get("rank_param_max_diff")
    if diff is not None and diff > 0:
        ok = False
    key = (f"world size {s.get('world_size')}, {s.get('device')}, {s.get('steps')} steps in "
           f"{f(s.get('seconds'))} s, rank param max diff {diff}")
    return ok, key, "", [] if ok else [f"status {s.get('status')}, diff {diff}"]


def ddp_backend(name):
    path = out / name / "result.json"
    if not path.is_file():
        return False, "no result", "", ["no result.json"]
    r = json.loads(path.read_text())
    ok = r["finite"] and r["param_max_diff"] == 0
    key = f"{r['backend']}, world size {r['world_size']}, param max diff across ranks {r['param_max_diff']}"
    return ok, key, "", [] if ok else ["replicas differ or non-finite"]


TITLES = {"bench_w256": ("rode bench, width 256", bench), "bench_w1024": ("rode bench, width 1024", bench),
          "deep": ("rode bench, deep regime", bench),
          "transformer": ("transformer training step", transformer), "gradcheck": ("bfloat16 gradcheck", gradcheck),
          "conv_amp": ("conv ResNet step, amp", conv_amp), "ddp_train": ("torchrun rode train", ddp_train),
          "ddp_backend": ("DDP backend", ddp_backend)}
results, sections = {}, []
for name in wanted:
    title, judge = TITLES[name]
    info = ran.get(name, {"rc": None, "seconds": 0, "limit": 0})
    try:
        ok, key, body, problems = judge(name)
    except Exception as e:  # noqa: BLE001 - a broken result is a failed check
        ok, key, body, problems = False, f"unreadable results ({type(e).__name__}: {e})", "", []
    if info["rc"] != 0:
        why = "timed out" if info["rc"] in (124, 137) else f"exit {info['rc']}"
        problems = [f"{why} (limit {info['limit']} s; log: {name}/log.txt)"] + problems
        ok = False
    results[name] = {"pass": ok, "seconds": info["seconds"], "key": key, "problems": problems}
    sections += [f"## {name}: {title} — {'PASS' if ok else 'FAIL'}", "",
                 *(f"- {p}" for p in problems), *([""] if problems else []),
                 f"Key figures: {key}", "", *([body, ""] if body else [])]

v = versions()
head = [f"# rode GPU check ({mode})", "",
        f"{time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()}", "",
        md(["", ""], [[k, val] for k, val in v.items()]), "",
        md(["check", "result", "seconds", "key figures"],
           [[n, "PASS" if r["pass"] else "FAIL", r["seconds"], r["key"]] for n, r in results.items()]), ""]
(out / "summary.md").write_text("\n".join(head + sections) + "\n")
(out / "summary.json").write_text(json.dumps({"mode": mode, "versions": v, "checks": results}, indent=2))
failed = [n for n, r in results.items() if not r["pass"]]
print(f"gpu_check ({mode}): {len(results) - len(failed)}/{len(results)} checks passed"
      + (f"; failed: {', '.join(failed)}" if failed else "") + f" -> {out / 'summary.md'}")
sys.exit(1 if failed else 0)
PY
