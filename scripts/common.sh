# Sourced by the figure scripts: finds `rode`, picks the variant and the output dir.
#   variant NAME "$@"  -> sets EXPERIMENT (NAME or NAME_full) and ARGS (the rest)
#   OUT=<dir> scripts/<figure>.sh   writes there instead of outputs/<figure>/<time>
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -z "${RODE:-}" ]]; then
  if command -v rode >/dev/null 2>&1; then RODE=rode; else RODE="$HERE/../.venv/bin/rode"; fi
fi

variant() {
  local name=$1; shift
  EXPERIMENT=$name
  if [[ "${1:-}" == full ]]; then EXPERIMENT=${name}_full; shift; fi
  ARGS=("$@")
  OUT=${OUT:-outputs/$EXPERIMENT/$(date +%Y-%m-%d_%H-%M-%S)}
  echo "== $EXPERIMENT -> $OUT"
}

# A sweep with a failed job still gets its report (which lists the failure).
sweep() { "$RODE" -m "$@" || echo "== some jobs failed (exit $?); the report lists them"; }
