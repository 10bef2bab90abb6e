#!/usr/bin/env bash
# Runs the CUDA kernels without a GPU: builds cpp_tests/cudasim (the unchanged csrc/ops/cuda/*.cu
# files compiled as C++ against a CPU runtime with CUDA's execution semantics, with ASan and
# UBSan) into build-cudasim/ and runs its tests: the simulator's own (planted bugs caught) and
# every CUDA entry point beside its CPU twin, under both schedules. See cpp_tests/cudasim/README.md.
# Needs the Python environment's torch (LibTorch): PYTHON (default .venv/bin/python).
#   JOBS   parallel build jobs (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
BUILD=build-cudasim
start=$SECONDS
TORCH_PREFIX=$("$PYTHON" -c "import torch; print(torch.utils.cmake_prefix_path)")
mkdir -p "$BUILD"
cmake -S cpp_tests/cudasim -B "$BUILD" -G Ninja -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" > "$BUILD/configure.log" 2>&1 \
  || { cat "$BUILD/configure.log" >&2; exit 1; }
cmake --build "$BUILD" -j "${JOBS:-2}"
ctest --test-dir "$BUILD" --output-on-failure -j 2
echo "CUDA simulator: OK ($((SECONDS - start)) s)"
