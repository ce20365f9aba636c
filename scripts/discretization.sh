#!/usr/bin/env bash
# Figure: ||x_N - x(1)|| / ||x(1)|| between the ResNet and the Neural ODE vs depth N, Euler
# and Heun, for weights constant / smooth / rough (Brownian) / i.i.d. in depth, with fitted
# log-log slopes. Expected: -1 (Euler) and -2 (Heun) for constant and smooth weights; Heun
# drops to Euler's order for rough weights; about -1/2 for i.i.d. tanh layers.
# Usage: scripts/discretization.sh [full] [overrides...]   (CPU only; full: deeper, 16 trials)
# Writes <out>/discretization.csv, slopes.csv, report.md and discretization.png.
source "$(dirname "$0")/common.sh"
variant discretization "$@"
"$RODE" discretization experiment="$EXPERIMENT" "hydra.run.dir=$OUT" "${ARGS[@]}"
"$RODE" report "$OUT"
