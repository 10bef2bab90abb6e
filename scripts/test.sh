#!/usr/bin/env bash
# Sets up nad-ext (scripts/setup.sh), runs the Python test suite, then the benchmarks as a smoke
# test, then builds the LibTorch library with CMake and runs the C++ tests (scripts/test_cpp.sh),
# then runs the CUDA kernels under the CPU simulator (scripts/test_cudasim.sh), then fuzzes the mask
# bank reader (scripts/test_fuzz.sh) and runs the C++ tests under ASan+UBSan (scripts/test_sanitize.sh).
# Extra arguments go
# to the Python tests' pytest.
#   NAD_SKIP_CPP=1       run the Python tests (and the benchmark smoke run) only
#   NAD_SKIP_CUDASIM=1   skip the CUDA simulator
#   NAD_SKIP_BENCH=1     skip the benchmark smoke run
#   NAD_SKIP_HARDENING=1 skip the fuzzing and the sanitizer build (scripts/test_fuzz.sh, test_sanitize.sh)
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
# Every benchmark of `pytest benchmarks` at tiny sizes: each path checked against its reference and
# run once, no timing kept (about half a minute), so a benchmark that breaks fails here; the CUDA
# cases are skipped, visibly, without a GPU.
if [ "${NAD_SKIP_BENCH:-0}" != 1 ]; then
  .venv/bin/python -m pytest benchmarks --smoke --benchmark-disable --bench-threads 1 -q -p no:cacheprovider
fi
if [ "${NAD_SKIP_CPP:-0}" != 1 ]; then
  PYTHON=.venv/bin/python bash scripts/test_cpp.sh
  if [ "${NAD_SKIP_CUDASIM:-0}" != 1 ]; then
    PYTHON=.venv/bin/python bash scripts/test_cudasim.sh
  fi
  # The mask bank reader fuzzed (libFuzzer, ~1 minute per target, corpus and regressions replayed)
  # and the C++ library and tests under ASan+UBSan (a CPU build): about 13 minutes on 2 cores.
  if [ "${NAD_SKIP_HARDENING:-0}" != 1 ]; then
    PYTHON=.venv/bin/python bash scripts/test_fuzz.sh
    PYTHON=.venv/bin/python bash scripts/test_sanitize.sh
  fi
fi
