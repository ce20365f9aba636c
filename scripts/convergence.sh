#!/usr/bin/env bash
# Figure: relative distance between the trained networks of depth N and 2N (weights at the
# same t, and outputs) against N, started from the same initial path; log-log slopes.
# Expected: about -1 (O(1/N)) with init=smooth and alpha=1; no decay with init=iid or alpha<1.
# Usage: scripts/convergence.sh [full] [overrides...]
#   default: digits, residual MLP width 32, depths 4..128, smooth/iid x alpha 1/0.5 (CPU minutes)
#   full:    depths 8..1024, alpha 1/0.5/0, on a GPU
# Writes <out>/report.md and <out>/convergence.png.
source "$(dirname "$0")/common.sh"
variant train_convergence "$@"
sweep train experiment="$EXPERIMENT" "hydra.sweep.dir=$OUT" "${ARGS[@]}"
"$RODE" report "$OUT"
