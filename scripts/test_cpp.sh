#!/usr/bin/env bash
# Builds nad-ext's LibTorch library with CMake (build-cpp/), installs it (build-cpp/install),
# runs the C++ tests against fixtures the Python side writes, then builds and runs the consumer
# example (examples/cpp) against the install. Needs the Python environment (torch, numpy,
# safetensors) for LibTorch and the fixtures: PYTHON (default .venv/bin/python).
#   NAD_WITH_CUDA=ON|OFF   CUDA kernels (default: when nvcc and a CUDA build of torch are found)
#   CMAKE_CUDA_ARCHITECTURES  GPU architectures (default 90, the H100)
#   JOBS                   parallel build jobs (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
BUILD=build-cpp
JOBS=${JOBS:-2}
TORCH_PREFIX=$("$PYTHON" -c "import torch; print(torch.utils.cmake_prefix_path)")

args=(-G Ninja -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DCMAKE_INSTALL_PREFIX="$PWD/$BUILD/install"
      -DCMAKE_CUDA_ARCHITECTURES="${CMAKE_CUDA_ARCHITECTURES:-90}" -DNAD_BUILD_TESTS=ON)
[ -n "${NAD_WITH_CUDA:-}" ] && args+=(-DNAD_WITH_CUDA="$NAD_WITH_CUDA")
cmake -S . -B "$BUILD" "${args[@]}"
cmake --build "$BUILD" -j "$JOBS"
cmake --install "$BUILD"

"$PYTHON" cpp_tests/make_fixtures.py "$BUILD/fixtures" --library "$BUILD/libnad.so"
ctest --test-dir "$BUILD" --output-on-failure

# The consumer example sees only the install: find_package(nad) -> nad::nad.
cmake -S examples/cpp -B "$BUILD/example" -G Ninja -DCMAKE_PREFIX_PATH="$PWD/$BUILD/install"
cmake --build "$BUILD/example" -j "$JOBS"
"$BUILD/example/app" "$BUILD/fixtures/bank.safetensors"
"$BUILD/example/run_gated" "$BUILD/fixtures/gated_all.pt" "$BUILD/fixtures/gated_expected.safetensors"
echo "C++ build, tests and example: OK"
