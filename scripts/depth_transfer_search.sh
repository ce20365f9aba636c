#!/usr/bin/env bash
# The depth-transfer search: does an lr found by a search at a shallow depth work at a
# deep one? Per residual scaling alpha (step N^-alpha: 1, 0.5, 0):
#   1. rode -m train hparams_search=optuna over lr (log scale) at depth SHALLOW,
#   2. rode train at depth DEEP with the lr it found (read back from the search's
#      optimization_results.yaml by `python -m runner.transfer best <dir> lr`),
#   3. the same search run directly at depth DEEP,
# then a table: the deep loss reached with the transferred lr against the deep search's.
# Each run is the transfer experiment's (experiment=train_depth_transfer: digits, residual
# MLP width 64, smooth init, Adam, 63 steps at constant lr, one thread); a trial's value
# is its training loss (objective=train_loss, minimized; a diverged trial fails and the
# search goes on).
# Usage: scripts/depth_transfer_search.sh [full] [overrides...]    (e.g. optimizer=sgd)
#   SHALLOW=4 DEEP=64 TRIALS=6 ALPHAS="1.0 0.5 0.0" LR='tag(log,interval(1e-4,1e-1))'
#   (CPU: about 220 CPU seconds in all, docs/depth-scaling.md)
# Writes <out>/alpha_<a>/{shallow,transfer,deep} and <out>/search.md (the table).
source "$(dirname "$0")/common.sh"
variant train_depth_transfer "$@"
SHALLOW=${SHALLOW:-4}
DEEP=${DEEP:-64}
TRIALS=${TRIALS:-6}
ALPHAS=${ALPHAS:-1.0 0.5 0.0}
LR=${LR:-tag(log,interval(1e-4,1e-1))}
PY="$(dirname "$(command -v "$RODE")")/python"
# lr is the only searched key: optuna.yaml's other keys (and the experiment's sweep lists)
# are fixed here by plain overrides, which the Optuna sweeper takes as fixed values.
SEARCH=(hparams_search=optuna "hydra.sweeper.n_trials=$TRIALS" hydra.sweeper.max_failure_rate=1.0
        objective=train_loss hydra.sweeper.direction=minimize method=euler adjoint.vjp=exact seed=0
        "lr=$LR")
for a in $ALPHAS; do
  dir="$OUT/alpha_$a"
  start=$(date +%s)
  "$RODE" -m train experiment="$EXPERIMENT" "${SEARCH[@]}" alpha="$a" depth="$SHALLOW" \
    "hydra.sweep.dir='$dir/shallow'" "${ARGS[@]}"
  lr=$("$PY" -m runner.transfer best "$dir/shallow" lr)
  echo "== alpha=$a: search at depth $SHALLOW: lr=$lr ($(( $(date +%s) - start )) s)"
  start=$(date +%s)
  "$RODE" train experiment="$EXPERIMENT" alpha="$a" depth="$DEEP" lr="$lr" seed=0 \
    "hydra.run.dir='$dir/transfer'" "${ARGS[@]}" || echo "== the transferred lr failed at depth $DEEP"
  echo "== alpha=$a: depth $DEEP with the transferred lr ($(( $(date +%s) - start )) s)"
  start=$(date +%s)
  "$RODE" -m train experiment="$EXPERIMENT" "${SEARCH[@]}" alpha="$a" depth="$DEEP" \
    "hydra.sweep.dir='$dir/deep'" "${ARGS[@]}"
  echo "== alpha=$a: search at depth $DEEP ($(( $(date +%s) - start )) s)"
done
"$PY" -m runner.transfer search-table "$OUT" | tee "$OUT/search.md"
