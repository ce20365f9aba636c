#!/usr/bin/env bash
# Figure: linear ResNets trained by gradient descent toward B = I + randn (d = 2): the weights
# A_n against n/N at a few optimisation steps, and N * max_n ||A_{n+1} - A_n|| along training,
# from a smooth start (A_n = 0) and, for contrast, an i.i.d. start. Expected: from the smooth
# start the increments are O(1/N) at all times (N times them is the same curve for every N);
# from the i.i.d. start they stay O(1).
# Usage: scripts/linear.sh [full] [overrides...]   (CPU: seconds; full: N up to 1024)
# Writes <out>/report.md, linear_weights*.png and linear_increments*.png.
source "$(dirname "$0")/common.sh"
variant linear "$@"
sweep linear experiment="$EXPERIMENT" init=zero,iid "hydra.sweep.dir=$OUT" "${ARGS[@]}"
"$RODE" report "$OUT"
