#!/usr/bin/env bash
# Figure: relative error of the adjoint's gradient against backprop vs depth (log-log, fitted
# slopes), Euler and Heun, weights tied / smooth / i.i.d. in depth. Expected: slopes about
# -1 (Euler) and -2 or better (Heun) for tied or smooth weights; with i.i.d. weights Heun is
# no better than Euler.
# Usage: scripts/grad_error.sh [full] [overrides...]
#   default: digits, tanh residual MLP width 32, float64, depths 2..256 (48 jobs, CPU minutes)
#   full:    CIFAR-10 conv ResNet (16 planes) at initialisation, on a GPU
# Writes <out>/report.md and <out>/grad_error.png.
source "$(dirname "$0")/common.sh"
variant gradcheck "$@"   # experiment=gradcheck[_full]
sweep gradcheck experiment="$EXPERIMENT" "hydra.sweep.dir=$OUT" "${ARGS[@]}"
"$RODE" report "$OUT"
