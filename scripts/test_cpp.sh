#!/usr/bin/env bash
# Builds nad-ext's LibTorch library with CMake (build-cpp/), installs it (build-cpp/install),
# writes the C++ tests' fixtures with the Python side (mask banks by nad_ext, a .pt2 package of a
# gated model), runs the C++ tests (ctest; those that need Python run with PYTHON), then checks
# the installed package as a user gets it: moved to another folder, examples/cpp built and run
# against it, find_package(nad VERSION) refusing what does not fit (cpp_tests/test_package.sh).
# Needs the Python environment (torch, numpy, safetensors; nad_ext._C for the test that loads it
# beside libnad): PYTHON (default .venv/bin/python). docs/CPP.md describes the C++ side.
#   NAD_WITH_CUDA=ON|OFF      CUDA kernels (default: when nvcc and a CUDA build of torch are found)
#   CMAKE_CUDA_ARCHITECTURES  GPU architectures (default 90, the H100)
#   JOBS                      parallel build jobs (default 2)
#   BUILD                     build folder (default build-cpp)
# On a GPU machine the same script runs the GPU cases too (cuda_matches_cpu; skipped elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
BUILD=${BUILD:-build-cpp}
mkdir -p "$BUILD" && BUILD=$(cd "$BUILD" && pwd)  # absolute: also a folder outside the checkout
JOBS=${JOBS:-2}
start=$SECONDS
case $PYTHON in  # ctest runs in the build folder: an absolute path
  */*) PYTHON_PATH=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON") ;;
  *) PYTHON_PATH=$(command -v "$PYTHON") ;;
esac
TORCH_PREFIX=$("$PYTHON" -c "import torch; print(torch.utils.cmake_prefix_path)")
export PATH="$PATH:$(dirname "$PYTHON_PATH")"  # the Python environment's ninja (and cmake) where the system has none
if ! command -v cmake > /dev/null || ! command -v ninja > /dev/null; then
  echo "test_cpp.sh needs cmake (>= 3.25) and ninja: install them (e.g. pip install cmake ninja)" >&2
  exit 1
fi

args=(-G Ninja -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DCMAKE_INSTALL_PREFIX="$BUILD/install"
      -DCMAKE_CUDA_ARCHITECTURES="${CMAKE_CUDA_ARCHITECTURES:-90}" -DNAD_BUILD_TESTS=ON
      -DNAD_TEST_PYTHON="$PYTHON_PATH")
[ -n "${NAD_WITH_CUDA:-}" ] && args+=(-DNAD_WITH_CUDA="$NAD_WITH_CUDA")
cmake -S . -B "$BUILD" "${args[@]}"
cmake --build "$BUILD" -j "$JOBS"
rm -rf "$BUILD/install"
cmake --install "$BUILD"
echo "build and install: $((SECONDS - start)) s"

t=$SECONDS
"$PYTHON" cpp_tests/make_fixtures.py "$BUILD/fixtures" --library "$BUILD/libnad.so"
echo "fixtures: $((SECONDS - t)) s"
t=$SECONDS
ctest --test-dir "$BUILD" --output-on-failure -j "$JOBS"
echo "ctest: $((SECONDS - t)) s"

# The consumer's view: the installed package, moved, found with find_package(nad 0.1).
t=$SECONDS
JOBS=$JOBS bash cpp_tests/test_package.sh "$BUILD/install" "$BUILD/package-test" "$TORCH_PREFIX" "$BUILD/fixtures"
echo "package test: $((SECONDS - t)) s"
echo "C++ build, tests, package and examples: OK ($((SECONDS - start)) s)"
