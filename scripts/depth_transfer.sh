#!/usr/bin/env bash
# Figure: training loss after a fixed number of steps against lr, one curve per depth,
# one panel per residual scaling alpha (1, 0.5, 0) and optimizer (Adam, SGD); the best lr
# per depth and the slope of log(best lr) against log N, next to the predictions
# N^(alpha-1) (Adam) and N^(2 alpha-1) (SGD).
# Usage: scripts/depth_transfer.sh [full] [overrides...]
#   default: digits, residual MLP width 64, depths 4..256, 2 seeds, 63 steps, 2 jobs at a
#            time (hydra/launcher=parallel), one thread each (measured on 2 quiet cores:
#            11 minutes, 1 146 CPU s; docs/depth-scaling.md, "Time")
#   e.g. scripts/depth_transfer.sh depth=4,16,64 seed=0   (a smaller grid: overrides win)
#        scripts/depth_transfer.sh hydra.launcher.n_jobs=1   (one job at a time)
#   full:    depths 4..1024, 3 seeds, 210 steps, finer grid, on a GPU
#   e.g. scripts/depth_transfer.sh parametrization=completep   (or model=conv dataset=...)
# Writes <out>/adam, <out>/sgd (the two sweeps), <out>/report.md and <out>/transfer.png.
source "$(dirname "$0")/common.sh"
variant train_depth_transfer "$@"
LAUNCH=()
if [[ "$EXPERIMENT" == train_depth_transfer ]]; then LAUNCH=(hydra/launcher=parallel); fi
SGD_LR=3e-4,1e-3,3e-3,1e-2,3e-2,1e-1,3e-1,1   # SGD diverges from 0.3 at every depth; 3e-4 for alpha=0
if [[ "$EXPERIMENT" == train_depth_transfer_full ]]; then SGD_LR=3e-3,1e-2,3e-2,1e-1,3e-1,1,3,10; fi
start=$(date +%s)
sweep train experiment="$EXPERIMENT" optimizer=adam "hydra.sweep.dir=$OUT/adam" "${LAUNCH[@]}" "${ARGS[@]}"
echo "== adam sweep: $(( $(date +%s) - start )) s"
start=$(date +%s)
sweep train experiment="$EXPERIMENT" optimizer=sgd "lr=$SGD_LR" "hydra.sweep.dir=$OUT/sgd" "${LAUNCH[@]}" "${ARGS[@]}"
echo "== sgd sweep: $(( $(date +%s) - start )) s"
start=$(date +%s)
"$RODE" report "$OUT"
echo "== report: $(( $(date +%s) - start )) s"
