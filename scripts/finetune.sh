#!/usr/bin/env bash
# Table: refining. Train a model whose residual weights are tied in depth, untie it (copy
# the shared function into every layer), double its depth by interpolation and fine-tune it
# with the adjoint: test accuracy before and after, and the activation memory of the
# residual layers (backprop vs adjoint).
# Usage: scripts/finetune.sh [full] [overrides for the fine-tuning...]
#   default: digits, residual MLP, depth 8 -> 16 (CPU, a minute)
#   full:    CIFAR-10 conv ResNet, depth 16 -> 32, SGD (GPU)
# Writes <out>/pretrain/, <out>/finetune/ and <out>/report.md.
source "$(dirname "$0")/common.sh"
variant finetune "$@"
pretrain=train_pretrain${EXPERIMENT#finetune}
"$RODE" train experiment="$pretrain" "hydra.run.dir=$OUT/pretrain"
"$RODE" finetune experiment="$EXPERIMENT" "checkpoint=$OUT/pretrain" \
  "hydra.run.dir=$OUT/finetune" "${ARGS[@]}"
"$RODE" report "$OUT"
