#!/usr/bin/env bash
# Figure: test error vs depth for {euler, heun} x {backprop, adjoint}, median and spread over
# seeds (the paper's CIFAR-10 figure). The paper: the adjoint with Euler fails at small depth
# and matches backprop at large depth; with Heun it succeeds at a smaller depth.
# Usage: scripts/test_error.sh [full] [overrides...]
#   default: digits, the conv ResNet, depths 2..16, 2 seeds, 10 epochs (32 jobs, CPU minutes)
#   full:    CIFAR-10, conv ResNet, depths 2..64, 3 seeds, SGD schedule of the paper (GPU)
# Writes <out>/report.md and <out>/test_error.png.
source "$(dirname "$0")/common.sh"
variant train "$@"   # experiment=train[_full]
sweep train experiment="$EXPERIMENT" "hydra.sweep.dir=$OUT" "${ARGS[@]}"
"$RODE" report "$OUT"
