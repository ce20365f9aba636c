#!/usr/bin/env bash
# Compatibility check: install one torch release into a fresh virtual environment, install rode
# into it (`pip install -e .`: its other dependencies come, that torch must stay), then run the core
# suite (stack, integrators, adjoint, optimizer, resume, and the private-vs-public comparison of
# runner/compat.py) twice: once as the release comes, once with RODE_TORCH_PUBLIC=1 (every private
# torch call replaced by its public fallback).
#
#   scripts/compat_check.sh 2.4.1            # the oldest supported release
#   scripts/compat_check.sh 2.15.0           # the newest
#
# Environment: PYTHON (default python3), COMPAT_VENV (default $TMPDIR/rode-compat-VERSION),
# COMPAT_KEEP=1 keeps the environment afterwards (it is 1-6 GB: deleted by default),
# COMPAT_REUSE=1 reuses that environment when it already holds this torch,
# TORCH_INDEX=URL an index serving CPU wheels (e.g. PyTorch's own CPU index), tried first.
set -euo pipefail
VERSION=${1:?usage: scripts/compat_check.sh TORCH_VERSION   (e.g. 2.4.1)}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
VENV=${COMPAT_VENV:-${TMPDIR:-/tmp}/rode-compat-$VERSION}
CORE=(tests/test_compat.py tests/test_stack.py tests/test_reversible.py tests/test_anchored.py
      tests/test_optim.py tests/test_resume.py)

cleanup() { if [ "${COMPAT_KEEP:-0}" != 1 ]; then rm -rf "$VENV"; fi; }
trap cleanup EXIT

PIP=("$VENV/bin/python" -m pip --quiet)
have_torch() { "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$VERSION')" 2>/dev/null; }

start=$(date +%s)
if [ "${COMPAT_REUSE:-0}" = 1 ] && have_torch; then
    echo "== reusing $VENV (torch $VERSION already there)"
else
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
fi
# A site-wide pip constraint (a cap on torch) would silently hide the release asked for: this
# environment takes exactly the one asked, and nothing else is constrained in it.
: > "$VENV/no-constraints.txt"
export PIP_CONSTRAINT="$VENV/no-constraints.txt"

if ! have_torch; then
    echo "== torch==$VERSION into $VENV"
    if [ -n "${TORCH_INDEX:-}" ] && "${PIP[@]}" install --index-url "$TORCH_INDEX" "torch==$VERSION"; then
        :
    else
        # a local CPU build (find-links) is preferred by pip when present; otherwise the registry's
        "${PIP[@]}" install "torch==$VERSION"
    fi
fi
# rode itself, as a lab would install it next to the torch it has: its other dependencies come,
# the torch stays (checked below); then what the core suite needs
"${PIP[@]}" install -e "$ROOT" "pytest>=7"
have_torch || { echo "== pip install -e . replaced torch $VERSION"; exit 1; }
echo "== installed in $(( $(date +%s) - start )) s"
"$VENV/bin/python" - <<'PY'
import torch, runner.compat as c
print("torch", torch.__version__, "| private features:",
      ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in c.AVAILABLE.items()))
PY

cd "$ROOT"
status=0
for public in 0 1; do
    echo "== core suite, RODE_TORCH_PUBLIC=$public"
    t0=$(date +%s)
    RODE_TORCH_PUBLIC=$public OMP_NUM_THREADS=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
        "${CORE[@]}" || status=$?
    echo "== took $(( $(date +%s) - t0 )) s"
done
echo "== torch $VERSION: $([ $status = 0 ] && echo PASSED || echo FAILED)"
exit $status
