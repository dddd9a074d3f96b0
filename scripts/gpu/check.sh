#!/usr/bin/env bash
# The GPU acceptance check, one command on a bare CUDA machine (no network, Python 3.12 with CUDA torch):
#
#   scripts/gpu/check.sh WHEELDIR OUTDIR          # WHEELDIR from scripts/gpu/wheelhouse.sh
#   scripts/gpu/check.sh --second WHEELDIR OUTDIR # a second call: full kernel suite, merged export, FSDP
#   scripts/gpu/check.sh --rehearse [OUTDIR]      # every step on this CPU with a tiny model (CI runs this)
#   scripts/gpu/check.sh --rehearse WHEELDIR OUTDIR   # the same, installing the wheels that fit this Python
#
# It installs the wheels into a private folder (pip install --no-index --no-deps --target) that goes ahead of the
# image's packages on PYTHONPATH, then runs each step of scripts/gpu/check.py in its own process with a time budget
# (480 s in all on a GPU; CHECK_BUDGET overrides; the order and the rule for starting a step: scripts/gpu/plan.py) and
# writes OUTDIR/check.log, OUTDIR/summary.json, OUTDIR/summary.md and OUTDIR/evidence.tar.gz (logs, probe JSON, test
# results: scripts/gpu/evidence.py). Models, data and runs go to $TMPDIR/ft-gpu-{gpu,rehearse}. Exit code 1 when a
# step failed.
# PYTHON chooses the interpreter (default: python3; the rehearsal prefers the project's .venv).
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
args=()
if [[ "${1:-}" == "--rehearse" ]]; then
  shift
  args+=(--rehearse)
  case $# in
    0) out="${TMPDIR:-/tmp}/ft-gpu-rehearse-out" ;;
    1) out="$1" ;;
    2) args+=(--wheels "$1"); out="$2" ;;
    *) echo "usage: $0 --rehearse [[WHEELDIR] OUTDIR]" >&2; exit 2 ;;
  esac
  default_python="python3"
  [[ -x "$root/.venv/bin/python" ]] && default_python="$root/.venv/bin/python"
else
  if [[ "${1:-}" == "--second" ]]; then
    shift
    args+=(--second)
  fi
  if [[ $# -ne 2 ]]; then
    echo "usage: $0 WHEELDIR OUTDIR   (or: $0 --rehearse [[WHEELDIR] OUTDIR])" >&2
    exit 2
  fi
  args+=(--wheels "$1")
  out="$2"
  default_python="python3"
fi
python="${PYTHON:-$default_python}"
[[ -n "${CHECK_BUDGET:-}" ]] && args+=(--budget "$CHECK_BUDGET")
mkdir -p "$out"
cd "$root"
status=0
"$python" -u scripts/gpu/check.py --out "$out" "${args[@]}" 2>&1 | tee "$out/check.log" || status=$?
"$python" scripts/gpu/evidence.py "$out" || true  # once more, with the whole log
exit "$status"
