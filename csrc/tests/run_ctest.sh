#!/usr/bin/env bash
# Configure, build and run the C++ kernel tests (CMakeLists.txt at the repo root).
#
#   csrc/tests/run_ctest.sh              build-cmake/,          release flags
#   csrc/tests/run_ctest.sh --sanitize   build-cmake-sanitize/, -fsanitize=address,undefined
#   csrc/tests/run_ctest.sh --prebuilt stablenets_ext
#                                        build-cmake-prebuilt/: no kernel compile, the tests
#                                        link setup.py's in-place _cpu_<isa>*.so (`make test`)
#
# Environment: PYTHON (default: .venv/bin/python of the repo, else python3) is the
# interpreter whose torch is built against; JOBS (default 2) parallel compile
# jobs; BUILD_DIR overrides the build folder; extra CMake arguments go in
# CMAKE_ARGS (e.g. CMAKE_ARGS="-DSTABLENETS_CPU_ISA=generic").
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

sanitize=OFF
prebuilt=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --sanitize) sanitize=ON ;;
    --prebuilt)
      [[ $# -ge 2 ]] || { echo "run_ctest.sh: --prebuilt needs a folder" >&2; exit 2; }
      prebuilt="$(cd "$2" && pwd)" || { echo "run_ctest.sh: --prebuilt: no folder '$2'" >&2; exit 2; }
      shift ;;
    -h|--help) sed -n '2,13p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "run_ctest.sh: unknown argument '$1' (expected --sanitize or --prebuilt DIR)" >&2; exit 2 ;;
  esac
  shift
done
if [[ "$sanitize" == ON && -n "$prebuilt" ]]; then
  echo "run_ctest.sh: --sanitize compiles instrumented kernels; it cannot use --prebuilt" >&2
  exit 2
fi

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
if [[ "$sanitize" == ON ]]; then default_dir=build-cmake-sanitize
elif [[ -n "$prebuilt" ]]; then default_dir=build-cmake-prebuilt
else default_dir=build-cmake; fi
BUILD="${BUILD_DIR:-$default_dir}"
JOBS="${JOBS:-2}"

PREFIX="$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')" || {
  echo "run_ctest.sh: '$PYTHON' cannot import torch; set PYTHON to an interpreter that can" >&2
  exit 1
}

run() { echo "+ $*"; "$@"; }

# shellcheck disable=SC2086  # CMAKE_ARGS is a list of words on purpose
run cmake -S . -B "$BUILD" -DCMAKE_PREFIX_PATH="$PREFIX" -DSTABLENETS_SANITIZE="$sanitize" \
  -DSTABLENETS_PREBUILT_CPU="$prebuilt" ${CMAKE_ARGS:-}
run cmake --build "$BUILD" -j"$JOBS"
run ctest --test-dir "$BUILD" --output-on-failure
# ctest shows the per-check lines only on failure; point at them either way.
log="$BUILD/Testing/Temporary/LastTest.log"
if [[ -f "$log" ]]; then
  echo "per-check output: $log"
  grep -E '^[0-9]+ checks, [0-9]+ failed' "$log" || true
fi
