#!/usr/bin/env bash
# The C++ library, tools and tests built with AddressSanitizer and UndefinedBehaviorSanitizer
# (CMake option NAD_SANITIZE=address,undefined; a CPU build, NAD_WITH_CUDA=OFF, in build-asan/),
# then ctest on the C++ tests' fixtures (cpp_tests/make_fixtures.py). Any sanitizer report fails
# the test that made it: memory errors, leaks (LeakSanitizer), undefined behaviour.
#
# The two ctest cases that run Python (maskbank_cpp_written_read_by_python: Python reads the
# banks C++ wrote, through the instrumented libnad; one_registration_per_process: libnad and
# nad_ext._C in one process) load the instrumented libnad into CPython, which is not
# instrumented: ASan's runtime must then come first, so they run in a second ctest pass with
# LD_PRELOAD of the compiler's libasan and libubsan, and without leak detection (CPython and
# torch keep allocations until the process ends: LeakSanitizer would report them all). Memory
# errors and undefined behaviour in libnad are still fatal there. Every other case runs with leak
# detection on. The fixtures that test_cpp.sh writes through the library (--library: banks written
# by nad_ext, the .pt2 package) are written with nad_ext's own extension (nad_ext._C) here, so
# that the same ctest cases run.
#   PYTHON   Python with torch and nad_ext (default .venv/bin/python)
#   BUILD    build folder (default build-asan)
#   JOBS     parallel build and test jobs (default 2)
#   CXX      the C++ compiler (default: CMake's choice, the one test_cpp.sh uses)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
BUILD=${BUILD:-build-asan}
JOBS=${JOBS:-2}
mkdir -p "$BUILD" && BUILD=$(cd "$BUILD" && pwd)
start=$SECONDS
case $PYTHON in  # ctest runs in the build folder: an absolute path
  */*) PYTHON_PATH=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON") ;;
  *) PYTHON_PATH=$(command -v "$PYTHON") ;;
esac
TORCH_PREFIX=$("$PYTHON" -c "import torch; print(torch.utils.cmake_prefix_path)")
export PATH="$PATH:$(cd "$(dirname "$PYTHON")" && pwd)"  # the environment's cmake and ninja where the system has none

# -O1 -g1 (line tables): stacks with line numbers; -O2 -g takes 2.4 times as long to compile
# under the sanitizers (measured on one kernel source: 78 s against 32 s on the 2-core VM).
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g1 -DNDEBUG" \
  -DNAD_WITH_CUDA=OFF -DNAD_BUILD_TESTS=ON -DNAD_TEST_PYTHON="$PYTHON_PATH" -DNAD_SANITIZE=address,undefined > /dev/null
cmake --build "$BUILD" -j "$JOBS"
echo "sanitized build: $((SECONDS - start)) s"

t=$SECONDS
"$PYTHON" - "$BUILD/fixtures" <<'EOF'
import os, sys
import torch
sys.path[:0] = [os.path.abspath("cpp_tests"), os.path.abspath(".")]
import make_fixtures as m
folder = sys.argv[1]
m.main(folder, None)            # the operators' cases and the bank of make_fixtures.py
m.python_banks(folder, torch.Generator().manual_seed(0))  # banks written by nad_ext (nad_ext._C)
m.export_gated_model(folder)    # the .pt2 package of a gated model
EOF
echo "fixtures: $((SECONDS - t)) s"

t=$SECONDS
# Fatal reports with stacks; leaks checked at exit. The process's CUDA libraries (a CUDA build of
# torch) map memory where ASan's shadow gap lies: protect_shadow_gap=0 lets them.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:protect_shadow_gap=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
PY_CASES='^(maskbank_cpp_written_read_by_python|one_registration_per_process)$'
ctest --test-dir "$BUILD" --output-on-failure -j "$JOBS" -E "$PY_CASES"
echo "ctest: $((SECONDS - t)) s"
t=$SECONDS
CXX_USED=$(sed -n 's/^CMAKE_CXX_COMPILER:[A-Z]*=//p' "$BUILD/CMakeCache.txt")
PRELOAD="$("$CXX_USED" -print-file-name=libasan.so):$("$CXX_USED" -print-file-name=libubsan.so)"
LD_PRELOAD=$PRELOAD ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:protect_shadow_gap=0" \
  ctest --test-dir "$BUILD" --output-on-failure -j "$JOBS" -R "$PY_CASES"
echo "ctest, the cases in Python (LD_PRELOAD of ASan, no leak detection): $((SECONDS - t)) s"
echo "sanitized C++ build and tests: OK ($((SECONDS - start)) s)"
