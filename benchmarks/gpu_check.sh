#!/usr/bin/env bash
# Every GPU check of stablenets-ext in one call on a fresh GPU machine (torch
# with CUDA preinstalled, no network), sized for a 540 s limit on an H200:
#
#   step        what                                                   at most
#   env         GPU, driver, nvcc, torch, compute-sanitizer               10 s
#   build       setup.py build_ext --inplace, once (ninja, MAX_JOBS=16)  240 s
#   test_cuda   python_tests/test_cuda.py, no compile / opcheck          150 s
#   racecheck   compute-sanitizer racecheck, one-launch kernels only     100 s
#   test_core   CUDA cases of test_ops.py, test_reversible.py             90 s
#   memcheck    compute-sanitizer memcheck, every CUDA op                 100 s
#   bench       benchmarks/gpu_bench.py (issue 11's table)                200 s
#   test_late   torch.compile (Inductor) and opcheck tests on CUDA      what is left
#   trainers    multi-process trainers on CUDA (test_pvd -m cuda)       what is left
#
# Each step has its own `timeout`, cut further so the steps after it keep their
# minimum; its verdict goes to $OUT/summary.txt the moment it ends, so a run cut
# off at the device tool's limit still says what passed. A step that cannot
# run says why in its verdict ("skipped: ..."). Logs, at most 8 files in $OUT:
#   summary.txt build.log tests.log sanitize.log bench.log bench.json
# Without $OUT they go to build/gpu-check/. Nothing is installed and nothing is
# downloaded: the tests import the package from this tree (PYTHONPATH).
#
#   bash benchmarks/gpu_check.sh     # PYTHON=python3  GPU_CHECK_BUDGET=520 (seconds)
#
# Dry run without a GPU: the GPU steps skip, each saying so. GPU_CHECK_FORCE=1
# runs them anyway (they then skip or fail on their own), to exercise the
# script itself; with a stand-in compute-sanitizer first on PATH it exercises
# the sanitizer verdicts too.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
LOGS="${OUT:-$ROOT/build/gpu-check}"
mkdir -p "$LOGS" || exit 1
SUMMARY="$LOGS/summary.txt"
: >"$SUMMARY"
T0=$(date +%s)
BUDGET="${GPU_CHECK_BUDGET:-520}"
FAILED=0
HAVE_GPU=0
BUILT=0

elapsed() { echo $(($(date +%s) - T0)); }
left() { echo $((BUDGET - $(elapsed))); }
say() { echo "$*" | tee -a "$SUMMARY"; }

# run_step NAME LOG MAX MIN RESERVE CMD...: run CMD under `timeout`, output
# appended to LOG as it comes (and shown, or with QUIET=1 only its last lines;
# with OPTIONAL=1 running out of time is "incomplete", not a failure).
# The limit is MAX, or less so that RESERVE seconds stay for the steps after
# it; below MIN the step is skipped. CMD's exit status: 0 ok, 77 skipped (the
# reason is its last output line), anything else failed. Sets STEP_RC.
run_step() {
  local name=$1 log=$2 max=$3 min=$4 reserve=$5
  shift 5
  local avail=$(($(left) - reserve)) limit t rc verdict
  limit=$max
  if [ "$avail" -lt "$limit" ]; then limit=$avail; fi
  if [ "$limit" -lt "$min" ]; then
    verdict="skipped: out of time ($(left) s of the budget left, step needs >= $min s)"
    say "$(printf '%-10s %s' "$name" "$verdict")"
    STEP_RC=77
    return 0
  fi
  t=$(date +%s)
  local file="$LOGS/$log" off
  {
    echo
    echo "===== [$(elapsed)s] $name (limit ${limit}s): $*"
  } | tee -a "$file"
  off=$(stat -c %s "$file")
  if [ "${QUIET:-0}" = 1 ]; then
    STEP_LIMIT=$limit timeout -k 10 "$limit" "$@" >>"$file" 2>&1
    rc=$?
    tail -c +$((off + 1)) "$file" | tail -n 12 | cut -c1-300
  else
    STEP_LIMIT=$limit timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$file"
    rc=${PIPESTATUS[0]}
  fi
  case $rc in
    0) verdict=ok ;;
    77) verdict="skipped: $(tail -c +$((off + 1)) "$file" | grep -v '^\s*$' | tail -1 | cut -c1-160)" ;;
    124 | 137)
      if [ "${OPTIONAL:-0}" = 1 ]; then
        verdict="incomplete: stopped at its ${limit}s limit (optional, last)"
      else
        verdict="FAILED: timed out after ${limit}s"
        FAILED=1
      fi
      ;;
    *) verdict="FAILED (exit $rc)"; FAILED=1 ;;
  esac
  # A one-line digest of the step's own result (pytest, sanitizer, benchmark).
  local digest
  digest=$(tail -c +$((off + 1)) "$file" |
    grep -E "^(=+ )?[0-9]+ (passed|failed|error|deselected|skipped)|(passed|failed|error)(,| in )|ERROR SUMMARY|sanitize_cuda:|targets (all|NOT|none)|^build:" |
    tail -1 | sed 's/=//g; s/^ *//' | cut -c1-150)
  say "$(printf '%-10s %-40s %4ss  %s' "$name" "$verdict" $(($(date +%s) - t)) "$digest")"
  STEP_RC=$rc
  return 0
}

skip() { # skip NAME REASON
  say "$(printf '%-10s skipped: %s' "$1" "$2")"
}

# ------------------------------------------------------------------ steps

env_info() {
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 ||
    echo "nvidia-smi: not available"
  if command -v nvcc >/dev/null; then nvcc --version | tail -2; else echo "nvcc: not on PATH"; fi
  [ -n "$SAN" ] && "$SAN" --version | tail -1
  "$PY" - <<'EOF'
import os, sys, torch
cuda = torch.cuda.is_available()
print("python", sys.version.split()[0], "| torch", torch.__version__, "| torch CUDA",
      torch.version.cuda, "| GPU", torch.cuda.get_device_name() if cuda else None,
      "| CPUs", os.cpu_count())
for mod in ("pytest", "ninja", "setuptools", "torchdiffeq", "xdist"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "ok"))
    except ImportError:
        print(mod, "MISSING")
print("cuda_available:", cuda)
EOF
}

build() {
  export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
  # One CPU kernel variant (this machine's best), not all three: setuptools builds
  # extensions one after another, and each variant costs ~40 s there.
  export STABLENETS_CPU_ISAS="${STABLENETS_CPU_ISAS:-native}"
  local t=$SECONDS
  "$PY" setup.py build_ext --inplace || return $?
  echo "build: compiled and linked in $((SECONDS - t)) s"
  "$PY" -c "
import stablenets_ext
from stablenets_ext import ops
print(stablenets_ext.info())
assert ops.has_kernel('cuda'), f'built without CUDA kernels: {ops.LOAD_ERROR}'
print('build: import ok, CUDA kernels registered')
"
}

# First the GPU-specific tests without cold Inductor compiles or opcheck's
# dynamic-shape modes (EARLY); those, and the multi-process trainers, last.
EARLY="not compile and not opcheck"
pyt() {
  "$PY" -m pytest -q -p no:cacheprovider -rfE --durations=5 -o faulthandler_timeout=120 "$@"
}

test_cuda() {
  pyt python_tests/test_cuda.py -k "$EARLY"
}

test_core() {
  pyt python_tests/test_ops.py python_tests/test_reversible.py python_tests/test_autograd.py \
    python_tests/test_conv.py python_tests/test_amp.py -m cuda -k "$EARLY"
}

test_late() {
  pyt python_tests/test_cuda.py python_tests/test_ops.py python_tests/test_reversible.py \
    -m cuda -k "not ($EARLY)"
}

trainers() {
  pyt python_tests/test_pvd.py -m cuda
}

SAN="$(command -v compute-sanitizer || true)"
for cand in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer \
  /usr/local/cuda-*/bin/compute-sanitizer; do
  if [ -z "$SAN" ] && [ -x "$cand" ]; then SAN=$cand; fi
done
export SAN

# sanitize TOOL [sanitize_cuda.py args]: only the package's kernels are
# instrumented (kernel-name filter: everything in namespace stablenets);
# PyTorch's own kernels run unchecked.
sanitize() {
  local tool=$1
  shift
  if [ -z "$SAN" ]; then
    echo "compute-sanitizer not found"
    return 77
  fi
  local filter=() help log rc
  help="$("$SAN" --help 2>&1)"
  if grep -q -- "--kernel-regex" <<<"$help"; then
    filter=(--kernel-regex kns=stablenets)
  elif grep -q -- "--kernel-name" <<<"$help"; then
    filter=(--kernel-name kns=stablenets)
  else
    echo "note: this compute-sanitizer has no kernel-name filter; instrumenting every kernel"
  fi
  local env=()
  if [ "$tool" = memcheck ]; then env=(PYTORCH_NO_CUDA_MEMORY_CACHING=1); fi
  log="$(mktemp)"
  # Stop starting runs 25 s before the step's limit (sanitizer start-up and exit).
  env "${env[@]}" "$SAN" --tool "$tool" "${filter[@]}" --error-exitcode 1 --print-limit 20 \
    "$PY" benchmarks/sanitize_cuda.py --max-seconds $((${STEP_LIMIT:-125} - 25)) "$@" 2>&1 |
    tee "$log"
  rc=${PIPESTATUS[0]}
  # The sanitizer refusing the machine is not a kernel failure; nor is a clean
  # exit a pass when it checked nothing.
  if [ "$rc" -eq 0 ] && grep -qiE "device not supported" "$log"; then rc=1; fi
  if [ "$rc" -ne 0 ] &&
    grep -qiE "device not supported|not supported on this (platform|device)|error 999|CUDA_ERROR_UNKNOWN|sanitize_cuda: no CUDA device|unable to (initialize|attach)" "$log" &&
    ! grep -qE "Invalid (__global__|__shared__|__local__)|Race reported|Program hit|relative error|(ERROR|RACECHECK) SUMMARY: [1-9]" "$log"; then
    echo "compute-sanitizer $tool unavailable on this machine (the sanitizer refused the device)"
    rc=77
  fi
  rm -f "$log"
  return "$rc"
}

bench() {
  # The benchmark keeps to its own deadline (drops torch.compile columns when
  # under 60 s remain, later sections when out of time) and rewrites
  # bench.json after every section.
  "$PY" benchmarks/gpu_bench.py --deadline "$1" --json "$LOGS/bench.json"
}

# ------------------------------------------------------------------- run

say "gpu_check $(date -u '+%Y-%m-%d %H:%M:%S UTC') | budget ${BUDGET}s | logs in $LOGS"
# Bash functions cannot run under `timeout` directly: steps re-enter through
# `bash -c`, which sees the exported functions and variables.
export -f env_info build pyt test_cuda test_core test_late trainers sanitize bench
export PY LOGS EARLY

run_step env build.log 30 5 0 bash -c env_info
if grep -q "^cuda_available: True" "$LOGS/build.log"; then
  HAVE_GPU=1
else
  say "$(printf '%-10s %s' env 'no CUDA device visible to torch: the GPU steps below skip')"
fi

# Reserves keep the later steps' minimum: test_cuda 40, racecheck 30,
# test_core 25, memcheck 30, bench 90.
QUIET=1 run_step build build.log 240 30 215 bash -c build
[ "$STEP_RC" -eq 0 ] && BUILT=1

gpu_step() { # gpu_step NAME LOG MAX MIN RESERVE FUNC [ARGS]
  if [ "$BUILT" -ne 1 ]; then skip "$1" "the build failed or was skipped"; return; fi
  if [ "$HAVE_GPU" -ne 1 ] && [ "${GPU_CHECK_FORCE:-0}" != 1 ]; then
    skip "$1" "no CUDA device visible"
    return
  fi
  run_step "$@"
}

gpu_step test_cuda tests.log 150 40 175 bash -c test_cuda
gpu_step racecheck sanitize.log 100 30 145 bash -c "sanitize racecheck --narrow-only"
gpu_step test_core tests.log 90 25 120 bash -c test_core
gpu_step memcheck sanitize.log 100 30 90 bash -c "sanitize memcheck"
# bench: whatever is left up to 200 s, keeping 5 s to close the summary.
BENCH_LIMIT=$(($(left) - 5))
if [ "$BENCH_LIMIT" -gt 200 ]; then BENCH_LIMIT=200; fi
gpu_step bench bench.log "$BENCH_LIMIT" 45 0 bash -c "bench $((BENCH_LIMIT - 10))"
OPTIONAL=1 gpu_step test_late tests.log 150 30 0 bash -c test_late
OPTIONAL=1 gpu_step trainers tests.log 90 30 0 bash -c trainers

# The end of the output is what the device tool's reply shows: the benchmark
# table and the summary.
if [ -s "$LOGS/bench.log" ]; then
  echo
  echo "===== benchmark table (bench.log)"
  sed -n '/^### Table/,$p' "$LOGS/bench.log" | tail -90 | cut -c1-200
fi
NSKIP=$(grep -cE '^[a-z_]+ +skipped' "$SUMMARY")
say "RESULT: $([ $FAILED -ne 0 ] && echo 'some steps FAILED' || echo 'no step failed'), $NSKIP skipped, after $(elapsed)s"
echo
echo "===== summary ($SUMMARY)"
cat "$SUMMARY"
exit $FAILED
