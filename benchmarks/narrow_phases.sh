#!/usr/bin/env bash
# Compile and run benchmarks/narrow_phases.cpp (per-phase times of the narrow CPU kernels).
#   bash benchmarks/narrow_phases.sh [B d N]        ISA=avx512|avx2|generic (default avx512)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
TORCH="$("$PY" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
case "${ISA:-avx512}" in
  avx512) FLAGS="-mavx512f -mavx512vl -mavx512bw -mavx512dq -mavx2 -mfma -mprefer-vector-width=512" ;;
  avx2) FLAGS="-mavx2 -mfma" ;;
  generic) FLAGS="" ;;
  *) echo "ISA: expected avx512, avx2 or generic" >&2; exit 2 ;;
esac
BIN="$ROOT/build/narrow_phases_${ISA:-avx512}"
mkdir -p "$ROOT/build"
# shellcheck disable=SC2086
c++ -O3 -std=c++20 -fopenmp -fno-math-errno -fno-trapping-math $FLAGS -I"$ROOT/csrc/include" -I"$TORCH/include" \
  -I"$TORCH/include/torch/csrc/api/include" "$ROOT/benchmarks/narrow_phases.cpp" -o "$BIN" \
  -L"$TORCH/lib" -Wl,-rpath,"$TORCH/lib" -ltorch_cpu -lc10
"$BIN" "$@"
