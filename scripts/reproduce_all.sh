#!/usr/bin/env bash
# Every CPU-sized experiment of docs/reproducing.md, one after the other, each with its
# report (outputs/<experiment>/<time>/report.md). About 10 minutes on 2 CPU cores.
# Usage: scripts/reproduce_all.sh [full]     (full: the GPU-scale variants)
set -euo pipefail
here="$(dirname "$0")"
for figure in discretization linear grad_error memory test_error finetune; do
  "$here/$figure.sh" "$@"
done
