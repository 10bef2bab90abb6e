#!/usr/bin/env bash
# Fuzzes the native mask bank reader (issue 29): builds two libFuzzer targets with clang under
# -fsanitize=fuzzer,address,undefined (build-fuzz/), replays the committed seed corpus and every
# regression input, then fuzzes each target for FUZZ_SECONDS (default 60) starting from the
# corpus. Fails on any crash, hang, leak, sanitizer report or broken invariant
# (cpp_tests/fuzz/README.md says what each target checks):
#   maskbank_fuzzer  nad::MaskBank::load as a whole (csrc/maskbank/{maskbank,safetensors,json}.cpp),
#                    linked against the Python environment's LibTorch (libtorch_cpu, libc10)
#   json_fuzzer      the JSON parser and quoting alone (csrc/maskbank/json.cpp)
# Installs clang and its libFuzzer runtime with apt when no clang that links -fsanitize=fuzzer is
# found (Debian: clang-19 + libclang-rt-19-dev, else the default clang).
#   PYTHON          Python with torch (default .venv/bin/python)
#   CLANGXX         the clang++ to use (default: found or installed)
#   BUILD           build folder (default build-fuzz)
#   FUZZ_SECONDS    fuzzing time per target (default 60; 0: build and replay only)
#   JOBS            parallel compile jobs (default 2)
# A crash leaves its input in $BUILD/artifacts/<target>/: fix the reader, then copy the input into
# cpp_tests/fuzz/regressions/<target minus _fuzzer>/ so that it is replayed from then on.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-.venv/bin/python}
BUILD=${BUILD:-build-fuzz}
FUZZ_SECONDS=${FUZZ_SECONDS:-60}
JOBS=${JOBS:-2}
FUZZ=cpp_tests/fuzz
start=$SECONDS

# ---- clang with libFuzzer ----
links_fuzzer() {  # $1: a clang++ that builds and links a libFuzzer program with ASan and UBSan
  command -v "$1" > /dev/null || return 1
  local dir
  dir=$(mktemp -d)
  printf '%s\n' '#include <cstdint>' '#include <cstddef>' \
    'extern "C" int LLVMFuzzerTestOneInput(const uint8_t*, size_t) { return 0; }' > "$dir/t.cpp"
  "$1" -std=c++20 -fsanitize=fuzzer,address,undefined "$dir/t.cpp" -o "$dir/t" > /dev/null 2>&1
  local rc=$?
  rm -rf "$dir"
  return $rc
}
find_clang() {
  local c
  for c in ${CLANGXX:-clang++-19 clang++-22 clang++-20 clang++-18 clang++-17 clang++-16 clang++}; do
    if links_fuzzer "$c"; then CLANGXX=$c; return 0; fi
  done
  return 1
}
if ! find_clang; then
  [ -n "${CLANGXX:-}" ] && { echo "test_fuzz.sh: CLANGXX=$CLANGXX cannot link -fsanitize=fuzzer" >&2; exit 1; }
  if ! command -v apt-get > /dev/null; then
    echo "test_fuzz.sh: no clang++ that links -fsanitize=fuzzer, and no apt-get to install one:" \
         "install clang with its libFuzzer runtime, or set CLANGXX" >&2
    exit 1
  fi
  SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
  export DEBIAN_FRONTEND=noninteractive
  t=$SECONDS
  $SUDO apt-get update -qq
  if apt-cache show libclang-rt-19-dev > /dev/null 2>&1; then
    $SUDO apt-get install -y -qq --no-install-recommends clang-19 libclang-rt-19-dev > /dev/null
  else  # the distribution's clang; its libFuzzer is in libclang-rt-N-dev (LLVM >= 15) or libclang-common-N-dev
    $SUDO apt-get install -y -qq --no-install-recommends clang > /dev/null
    v=$(clang --version | sed -n 's/.*clang version \([0-9]*\).*/\1/p' | head -1)
    $SUDO apt-get install -y -qq --no-install-recommends "libclang-rt-$v-dev" > /dev/null 2>&1 ||
      $SUDO apt-get install -y -qq --no-install-recommends "libclang-common-$v-dev" > /dev/null
  fi
  echo "clang installed: $((SECONDS - t)) s"
  find_clang || { echo "test_fuzz.sh: no clang++ that links -fsanitize=fuzzer after installing clang" >&2; exit 1; }
fi
echo "using $CLANGXX ($("$CLANGXX" --version | head -1))"
CLANG_VERSION=$("$CLANGXX" --version | sed -n 's/.*clang version \([0-9]*\).*/\1/p' | head -1)

# ---- build (ninja when there is one: incremental and parallel) ----
TORCH=$("$PYTHON" -c "import os, torch; print(os.path.dirname(torch.__file__))")
ABI=$("$PYTHON" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
mkdir -p "$BUILD"
BUILD=$(cd "$BUILD" && pwd)
t=$SECONDS
# -O1 -g: libFuzzer's usual build. vptr is left out of UBSan: LibTorch is not built with it and its
# classes' type info (hidden in libtorch) cannot be checked from here.
FLAGS="-std=c++20 -O1 -g -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined -fno-sanitize=vptr -fno-sanitize-recover=all"
TORCH_FLAGS="-D_GLIBCXX_USE_CXX11_ABI=$ABI -isystem $TORCH/include -isystem $TORCH/include/torch/csrc/api/include"
TORCH_LIBS="-L$TORCH/lib -Wl,-rpath,$TORCH/lib -ltorch_cpu -lc10"
cat > "$BUILD/build.ninja" <<EOF
cxx = $CLANGXX
flags = $FLAGS -I$ROOT/csrc -I$ROOT/csrc/include
rule cc
  command = nice -n 10 \$cxx \$flags \$extra -MMD -MF \$out.d -c \$in -o \$out
  depfile = \$out.d
  deps = gcc
rule link
  command = \$cxx \$flags \$in -o \$out \$libs
build json.o: cc $ROOT/csrc/maskbank/json.cpp
build json_fuzzer.o: cc $ROOT/$FUZZ/json_fuzzer.cpp
build json_fuzzer: link json_fuzzer.o json.o
build safetensors.o: cc $ROOT/csrc/maskbank/safetensors.cpp
  extra = $TORCH_FLAGS
build maskbank.o: cc $ROOT/csrc/maskbank/maskbank.cpp
  extra = $TORCH_FLAGS
build maskbank_fuzzer.o: cc $ROOT/$FUZZ/maskbank_fuzzer.cpp
  extra = $TORCH_FLAGS
build maskbank_fuzzer: link maskbank_fuzzer.o maskbank.o safetensors.o json.o
  libs = $TORCH_LIBS
EOF
NINJA=$(command -v ninja || command -v "$(dirname "$PYTHON")/ninja" || true)
if [ -n "$NINJA" ]; then
  "$NINJA" -C "$BUILD" -j "$JOBS"
else  # the same commands, in order
  echo "test_fuzz.sh: no ninja, building serially" >&2
  ( cd "$BUILD"
    for s in json:csrc/maskbank/json.cpp json_fuzzer:$FUZZ/json_fuzzer.cpp; do
      nice -n 10 $CLANGXX $FLAGS -I"$ROOT/csrc" -I"$ROOT/csrc/include" -c "$ROOT/${s#*:}" -o "${s%%:*}.o"; done
    for s in safetensors:csrc/maskbank/safetensors.cpp maskbank:csrc/maskbank/maskbank.cpp maskbank_fuzzer:$FUZZ/maskbank_fuzzer.cpp; do
      nice -n 10 $CLANGXX $FLAGS $TORCH_FLAGS -I"$ROOT/csrc" -I"$ROOT/csrc/include" -c "$ROOT/${s#*:}" -o "${s%%:*}.o"; done
    $CLANGXX $FLAGS json_fuzzer.o json.o -o json_fuzzer
    $CLANGXX $FLAGS maskbank_fuzzer.o maskbank.o safetensors.o json.o -o maskbank_fuzzer $TORCH_LIBS )
fi
echo "fuzz targets built: $((SECONDS - t)) s"

# ---- replay, then fuzz ----
# Leaks are reported (LeakSanitizer); an input that runs longer than 10 s is a hang; UBSan stops
# at its first report with a stack trace.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:allocator_may_return_null=0}
SYMBOLIZER=$(command -v "llvm-symbolizer-${CLANG_VERSION}" || command -v llvm-symbolizer || true)
[ -n "$SYMBOLIZER" ] && export ASAN_SYMBOLIZER_PATH=$SYMBOLIZER UBSAN_SYMBOLIZER_PATH=$SYMBOLIZER
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
status=0
for target in maskbank json; do
  fuzzer="$BUILD/${target}_fuzzer"
  seeds=$FUZZ/corpus/$target
  regressions=$FUZZ/regressions/$target
  mkdir -p "$BUILD/artifacts/$target"
  t=$SECONDS
  mapfile -t inputs < <(find "$seeds" "$regressions" -type f ! -name README.md 2>/dev/null | sort)
  if [ ${#inputs[@]} = 0 ]; then  # the fuzzer, given no input, would fuzz without end
    echo "test_fuzz.sh: no inputs in $seeds" >&2
    exit 1
  fi
  echo "== $target: replaying ${#inputs[@]} inputs (corpus and regressions)"
  if ! "$fuzzer" -timeout=10 -artifact_prefix="$BUILD/artifacts/$target/" "${inputs[@]}" > "$BUILD/$target.replay.log" 2>&1; then
    tail -n 60 "$BUILD/$target.replay.log" >&2
    echo "== $target: replay FAILED (full log: $BUILD/$target.replay.log)" >&2
    status=1
    continue
  fi
  echo "== $target: replay OK ($((SECONDS - t)) s)"
  [ "$FUZZ_SECONDS" -gt 0 ] || continue
  # A scratch copy of the corpus takes the new inputs; the committed corpus stays as it is.
  rm -rf "$BUILD/corpus-$target" && mkdir -p "$BUILD/corpus-$target"
  t=$SECONDS
  if ! "$fuzzer" "$BUILD/corpus-$target" "$seeds" "$regressions" -dict="$FUZZ/$target.dict" \
      -max_total_time="$FUZZ_SECONDS" -timeout=10 -max_len=16384 -rss_limit_mb=4096 -print_final_stats=1 \
      -artifact_prefix="$BUILD/artifacts/$target/" > "$BUILD/$target.fuzz.log" 2>&1; then
    tail -n 60 "$BUILD/$target.fuzz.log" >&2
    echo "== $target: fuzzing FAILED; the input is in $BUILD/artifacts/$target/ (full log: $BUILD/$target.fuzz.log)" >&2
    status=1
    continue
  fi
  # libFuzzer's last status line (cov: ft: corp: exec/s) and its final stats
  last=$(grep -E '^#[0-9]+' "$BUILD/$target.fuzz.log" | tail -1)
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$BUILD/$target.fuzz.log")
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$BUILD/$target.fuzz.log")
  echo "== $target: fuzzed $((SECONDS - t)) s, $execs runs, $rate exec/s, no crash: $last"
done
echo "fuzzing: $([ $status = 0 ] && echo OK || echo FAILED) ($((SECONDS - start)) s)"
exit $status
