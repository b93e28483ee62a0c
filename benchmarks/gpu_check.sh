#!/usr/bin/env bash
# Every GPU check of stablenets-ext, for a fresh GPU machine (torch with CUDA
# preinstalled, no network): build with the CUDA kernels, the CUDA tests, the
# CUDA-parametrised core tests, compute-sanitizer (memcheck; racecheck on the
# one-launch kernels), and the GPU benchmark. About 8 minutes on an H200.
#
#   bash benchmarks/gpu_check.sh            # PYTHON=... to pick the interpreter
#
# Each step prints to the terminal and, when $OUT is set, to $OUT/<step>.log
# (plus $OUT/summary.txt). A failing step does not stop the others; the script
# exits 1 at the end if any step failed.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
OUTDIR="${OUT:-}"
if [ -n "$OUTDIR" ]; then mkdir -p "$OUTDIR"; fi
T0=$(date +%s)
FAILED=0
SUMMARY=()

elapsed() { echo $(($(date +%s) - T0)); }

# step NAME CMD...: run, tee to $OUT/NAME.log, record the verdict.
# Exit status 77 from a step means "skipped" (the tool cannot run here).
step() {
  local name=$1
  shift
  local t rc verdict
  t=$(date +%s)
  echo
  echo "===== [$(elapsed)s] $name: $*"
  if [ -n "$OUTDIR" ]; then
    "$@" 2>&1 | tee "$OUTDIR/$name.log"
    rc=${PIPESTATUS[0]}
  else
    "$@"
    rc=$?
  fi
  case $rc in
    0) verdict=ok ;;
    77) verdict=skipped ;;
    *) verdict="FAILED (exit $rc)"; FAILED=1 ;;
  esac
  SUMMARY+=("$(printf '%-10s %-18s %5ss' "$name" "$verdict" $(($(date +%s) - t)))")
  echo "===== $name: $verdict"
  return 0
}

env_info() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  command -v nvcc >/dev/null && nvcc --version | tail -2
  "$PY" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| torch CUDA",
      torch.version.cuda, "| GPU", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for mod in ("pytest", "ninja", "setuptools"):
    try:
        __import__(mod)
        print(mod, "ok")
    except ImportError:
        print(mod, "MISSING")
EOF
}

build() {
  export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
  # As `make build`: in-place build (ninja), then an editable install for the
  # `stablenets` console script (reuses the build; no network needed).
  "$PY" setup.py build_ext --inplace || return $?
  "$PY" -m pip install -q --no-build-isolation --no-deps -e . ||
    echo "warning: editable install failed; tests import from the source tree"
  "$PY" -c "
import stablenets_ext
from stablenets_ext import ops
print(stablenets_ext.info())
assert ops.has_kernel('cuda'), 'built without CUDA kernels'
"
}

test_cuda() {
  # Spread over processes when pytest-xdist is there: the compile and opcheck
  # tests are CPU-bound, and every test is small enough to share the GPU.
  local par=()
  if "$PY" -c "import xdist" 2>/dev/null; then par=(-n 6); fi
  "$PY" -m pytest -q -p no:cacheprovider -rfE "${par[@]}" python_tests/test_cuda.py
}

test_core() {
  local rc
  "$PY" -m pytest -q -p no:cacheprovider -rfE python_tests -k cuda \
    --ignore=python_tests/test_cuda.py
  rc=$?
  if [ "$rc" -eq 5 ]; then
    echo "(no CUDA-parametrised core tests were collected)"
    return 0
  fi
  return "$rc"
}

SAN="$(command -v compute-sanitizer || true)"
for cand in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
  if [ -z "$SAN" ] && [ -x "$cand" ]; then SAN=$cand; fi
done

# sanitize TOOL [sanitize_cuda.py args]
sanitize() {
  local tool=$1
  shift
  if [ -z "$SAN" ]; then
    echo "compute-sanitizer not found: skipped"
    return 77
  fi
  local log rc
  log="$(mktemp)"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$tool" --error-exitcode 1 \
    "$PY" benchmarks/sanitize_cuda.py "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ] && grep -qiE "device not supported|not supported on this (platform|device)" "$log"; then
    echo "compute-sanitizer cannot run on this machine: skipped"
    rc=77
  fi
  rm -f "$log"
  return "$rc"
}

bench() {
  # torch.compile columns are dropped once the budget is spent, to stay in time.
  local budget=$((420 - $(elapsed)))
  if [ "$budget" -gt 150 ]; then budget=150; fi
  if [ "$budget" -lt 20 ]; then budget=20; fi
  "$PY" benchmarks/gpu_bench.py --budget "$budget"
}

racecheck() {
  if [ "$(elapsed)" -gt 400 ]; then
    echo "racecheck skipped: out of time ($(elapsed)s elapsed)"
    return 77
  fi
  sanitize racecheck --narrow-only
}

step env env_info
step build build
step test_cuda test_cuda
step test_core test_core
step memcheck sanitize memcheck
step bench bench
step racecheck racecheck

{
  echo
  echo "===== summary ($(elapsed)s)"
  printf '%s\n' "${SUMMARY[@]}"
  if [ $FAILED -ne 0 ]; then echo "RESULT: some steps FAILED"; else echo "RESULT: all steps passed"; fi
} | if [ -n "$OUTDIR" ]; then tee "$OUTDIR/summary.txt"; else cat; fi
exit $FAILED
