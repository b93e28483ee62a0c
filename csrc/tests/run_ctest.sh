#!/usr/bin/env bash
# Configure, build and run the C++ kernel tests (CMakeLists.txt at the repo root).
#
#   csrc/tests/run_ctest.sh              build-cmake/,          release flags
#   csrc/tests/run_ctest.sh --sanitize   build-cmake-sanitize/, -fsanitize=address,undefined
#
# Environment: PYTHON (default: .venv/bin/python of the repo, else python3) is the
# interpreter whose torch is built against; JOBS (default 2) parallel compile
# jobs; BUILD_DIR overrides the build folder; extra CMake arguments go in
# CMAKE_ARGS (e.g. CMAKE_ARGS="-DSTABLENETS_CPU_ISA=generic").
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

sanitize=OFF
for arg in "$@"; do
  case "$arg" in
    --sanitize) sanitize=ON ;;
    -h|--help) sed -n '2,11p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "run_ctest.sh: unknown argument '$arg' (expected --sanitize)" >&2; exit 2 ;;
  esac
done

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
if [[ "$sanitize" == ON ]]; then default_dir=build-cmake-sanitize; else default_dir=build-cmake; fi
BUILD="${BUILD_DIR:-$default_dir}"
JOBS="${JOBS:-2}"

PREFIX="$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')" || {
  echo "run_ctest.sh: '$PYTHON' cannot import torch; set PYTHON to an interpreter that can" >&2
  exit 1
}

run() { echo "+ $*"; "$@"; }

# shellcheck disable=SC2086  # CMAKE_ARGS is a list of words on purpose
run cmake -S . -B "$BUILD" -DCMAKE_PREFIX_PATH="$PREFIX" -DSTABLENETS_SANITIZE="$sanitize" \
  ${CMAKE_ARGS:-}
run cmake --build "$BUILD" -j"$JOBS"
run ctest --test-dir "$BUILD" --output-on-failure
# ctest shows the per-check lines only on failure; point at them either way.
log="$BUILD/Testing/Temporary/LastTest.log"
if [[ -f "$log" ]]; then
  echo "per-check output: $log"
  grep -E '^[0-9]+ checks, [0-9]+ failed' "$log" || true
fi
