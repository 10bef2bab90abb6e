#!/usr/bin/env bash
# Sets up nad-ext (scripts/setup.sh), runs the Python test suite, then builds the LibTorch
# library with CMake and runs the C++ tests (scripts/test_cpp.sh), then runs the CUDA kernels
# under the CPU simulator (scripts/test_cudasim.sh). Extra arguments go to pytest.
#   NAD_SKIP_CPP=1       run the Python tests only
#   NAD_SKIP_CUDASIM=1   skip the CUDA simulator
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
set +e
.venv/bin/python -m pytest python_tests -ra "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
[ "$rc" -eq 0 ] || exit "$rc"
if [ "${NAD_SKIP_CPP:-0}" != 1 ]; then
  PYTHON=.venv/bin/python bash scripts/test_cpp.sh
  if [ "${NAD_SKIP_CUDASIM:-0}" != 1 ]; then
    PYTHON=.venv/bin/python bash scripts/test_cudasim.sh
  fi
fi
