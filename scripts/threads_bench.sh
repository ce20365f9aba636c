#!/usr/bin/env bash
# Threads: the default `rode train` alone and next to one busy process, against threads=k; and a
# two-job hydra/launcher=parallel sweep against the same two jobs run one after the other.
# Prints one line per measurement: what, threads setting, training seconds (summary.json) or the
# sweep's wall seconds. docs/benchmarks.md ("Threads") quotes its output.
#
#   scripts/threads_bench.sh [RODE]          # RODE: the rode command (default: rode)
#   ARGS="epochs=5" scripts/threads_bench.sh # extra overrides for every run
#   ROUND="null auto 2" ...                   # the threads settings of the single runs
set -euo pipefail
RODE=${1:-rode}
OUT=${OUT:-$(mktemp -d)}
COMMON=(progress=false device=cpu ${ARGS:-})
unset OMP_NUM_THREADS RODE_JOBS

train_seconds() {   # $1: label, rest: overrides
    local label=$1; shift
    local dir="$OUT/$label-$RANDOM"
    $RODE train "${COMMON[@]}" "$@" "hydra.run.dir=$dir" > /dev/null 2>&1
    python3 -c "import json,sys; print(f'{json.load(open(sys.argv[1]))[\"seconds\"]:.1f}')" "$dir/summary.json"
}

one_round() {   # $1: alone | busy
    echo "# load: $(cut -d' ' -f1-3 /proc/loadavg)"
    for t in ${ROUND:-null auto 1 2}; do
        printf '%-6s train threads=%-5s %6s s\n' "$1" "$t" "$(train_seconds "$1-$t" threads=$t)"
    done
}

echo "# usable cores: $(python3 -c 'import os; print(len(os.sched_getaffinity(0)))'), $(date -u +%FT%TZ), load: $(cut -d' ' -f1-3 /proc/loadavg)"
one_round alone
python3 -c 'while 1: pass' & BUSY=$!
trap 'kill $BUSY 2>/dev/null || true' EXIT
sleep 1
one_round busy
kill $BUSY; trap - EXIT

sweep() {   # $1: launcher (parallel | basic), $2: threads
    local t0 t1 launcher=()
    [ "$1" = parallel ] && launcher=(hydra/launcher=parallel)
    t0=$(date +%s.%N)
    $RODE -m train "${COMMON[@]}" seed=0,1 threads=$2 "${launcher[@]}" \
        "hydra.sweep.dir=$OUT/sweep-$1-$2-$RANDOM" > /dev/null 2>&1
    t1=$(date +%s.%N)
    printf 'sweep  %-8s threads=%-5s %6.1f s wall (2 jobs)\n' "$1" "$2" \
        "$(python3 -c "print($t1 - $t0)")"
}
for t in null auto; do
    sweep basic "$t"
    sweep parallel "$t"
done
