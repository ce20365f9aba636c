#!/usr/bin/env bash
# A two-job sweep with hydra/launcher=parallel against the same two jobs one after the other
# (Hydra's basic launcher): wall time, CPU time (user + sys of every process the sweep
# started, the launcher's workers and servers included) and, per job, when it was ready to
# train, how long it trained (summary.json) and how long it took to finish after its last
# epoch. The last line is the summary: both wall times and their ratio, with the load.
#
#   scripts/parallel_sweep.sh [RODE]        # RODE: the rode command (default: rode, else .venv/bin/rode)
#   EPOCHS=60 SEEDS=0,1 scripts/parallel_sweep.sh   # the jobs: rode train seed=<each> epochs=<EPOCHS>
#   ROUNDS=3 scripts/parallel_sweep.sh      # alternate the order, report the median of each
#   ARGS="depth=32" scripts/parallel_sweep.sh  # extra overrides for every job
#   PARALLEL="hydra.launcher.context=loky" ...  # extra overrides for the parallel sweep only
#
# The default jobs are the default `rode train` (digits, depth 16, width 64, the adjoint) for
# 60 epochs: about 40 s of training each on an idle core, so that training, not start-up,
# dominates. docs/scaling.md ("Parallel sweeps") quotes its output.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RODE=${1:-${RODE:-}}
if [[ -z "$RODE" ]]; then
  if command -v rode >/dev/null 2>&1; then RODE=rode; else RODE="$HERE/../.venv/bin/rode"; fi
fi
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
EPOCHS=${EPOCHS:-60}
SEEDS=${SEEDS:-0,1}
ROUNDS=${ROUNDS:-1}
# The machine's defaults, not this shell's: threads=auto decides (runner/threads.py).
unset OMP_NUM_THREADS MKL_NUM_THREADS OPENBLAS_NUM_THREADS RODE_JOBS

exec python3 - "$RODE" "$OUT" "$EPOCHS" "$SEEDS" "$ROUNDS" "${ARGS:-}" "${PARALLEL:-}" <<'EOF'
import ctypes
import datetime as dt
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

rode, out, epochs, seeds, rounds, args, parallel = sys.argv[1:]
out, rounds = Path(out), int(rounds)
common = ["progress=false", "device=cpu", f"epochs={epochs}", f"seed={seeds}", *shlex.split(args)]
# Orphans (a launcher's server that outlives its parent) are reaped here: their CPU counts.
try:
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)   # PR_SET_CHILD_SUBREAPER (Linux)
except (AttributeError, OSError):
    pass


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def stamp(line: str) -> dt.datetime | None:
    try:   # Hydra's job log: [2026-12-03 09:47:55,833][...
        return dt.datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f")
    except ValueError:
        return None


def sweep(name: str, extra: list[str]) -> tuple[float, float]:
    sweep_dir = out / f"{name}-{len(list(out.glob(name + '-*')))}"
    cmd = [rode, "-m", "train", *common, *extra, f"hydra.sweep.dir={sweep_dir}"]
    before, t0, start = cpu(), dt.datetime.now(), os.times().elapsed
    with open(out / f"{sweep_dir.name}.out", "w") as log:
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    wall = os.times().elapsed - start
    t1 = dt.datetime.now()
    while True:   # orphaned descendants (a forkserver exits once its parent has)
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    used = cpu() - before
    if code != 0:
        sys.exit(f"parallel_sweep: the {name} sweep failed (exit {code}); see "
                 f"{out / (sweep_dir.name + '.out')}")
    print(f"{name:<10} {wall:7.1f} s wall {used:7.1f} s CPU   load {load()}   {sweep_dir}")
    for job in sorted(p.parent for p in sweep_dir.glob("*/summary.json")):
        lines = [s for s in map(stamp, (job / "train.log").read_text().splitlines()) if s]
        trained = json.loads((job / "summary.json").read_text())["seconds"]
        ready = (lines[0] - t0).total_seconds() if lines else float("nan")
        tail = (t1 - lines[-1]).total_seconds() if lines else float("nan")
        print(f"  {job.name:<8} ready to train at +{ready:6.1f} s, trained {trained:6.1f} s, "
              f"sweep over {tail:5.1f} s after its last epoch")
    return wall, used


print(f"# {rode} train {' '.join(common)}; {len(os.sched_getaffinity(0))} usable cores; "
      f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%dT%H:%M:%SZ}; load {load()}")
results: dict[str, list[tuple[float, float]]] = {"sequential": [], "parallel": []}
runs = {"sequential": [], "parallel": ["hydra/launcher=parallel", *shlex.split(parallel)]}
for r in range(rounds):
    order = ["sequential", "parallel"] if r % 2 == 0 else ["parallel", "sequential"]
    for name in order:
        results[name].append(sweep(name, runs[name]))
seq = statistics.median(w for w, _ in results["sequential"])
par = statistics.median(w for w, _ in results["parallel"])
seq_cpu = statistics.median(c for _, c in results["sequential"])
par_cpu = statistics.median(c for _, c in results["parallel"])
jobs = len(seeds.split(","))
print(f"parallel_sweep: {jobs} jobs x {epochs} epochs, median of {rounds}: sequential {seq:.1f} s "
      f"wall ({seq_cpu:.1f} s CPU), parallel {par:.1f} s wall ({par_cpu:.1f} s CPU); "
      f"parallel/sequential {par / seq:.2f}; load {load()}; {len(os.sched_getaffinity(0))} cores")
EOF
