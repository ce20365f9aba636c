#!/usr/bin/env bash
# Figure: memory of one training step vs depth, backprop vs adjoint, Euler and Heun.
# Expected: activations saved for backward grow linearly with depth with backprop and stay
# flat with the adjoint.
# Usage: scripts/memory.sh [full] [overrides...]
#   default: residual MLP, depths 16..1024, on CPU (peak = process RSS growth, labelled so)
#   full:    conv ResNet on CIFAR-shaped inputs, batch 128, on a GPU (cuda max allocated)
# Writes <out>/report.md and <out>/memory.png.
source "$(dirname "$0")/common.sh"
variant memory "$@"
sweep memory experiment="$EXPERIMENT" "hydra.sweep.dir=$OUT" "${ARGS[@]}"
"$RODE" report "$OUT"
