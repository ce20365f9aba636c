#!/usr/bin/env bash
# Table and figure: time, peak memory and gradient error of one training step vs depth, for
# backprop, the adjoint (vjp=exact and vjp=shared), checkpoint_sequential, torchdiffeq's
# odeint_adjoint and memcnn, on the same residual functions and batch (docs/benchmarks.md).
# Expected: backprop's memory grows linearly with depth, checkpointing's like sqrt(depth),
# the adjoint's stays flat; the shared adjoint costs about 4/3 of backprop, the exact 5/3.
# Usage: scripts/bench.sh [full] [overrides...]
#   default: CPU, width 256, batch 1024, depths 16..1024, Euler (15 to 25 minutes on 2 cores)
#   full:    GPU (cuda max allocated), Euler and Heun, depths 16..4096
# Writes <out>/bench.csv, bench.json, report.md and bench.png.
source "$(dirname "$0")/common.sh"
variant bench "$@"
"$RODE" bench experiment="$EXPERIMENT" "hydra.run.dir=$OUT" "${ARGS[@]}"
"$RODE" report "$OUT"
