#!/usr/bin/env bash
# The installed CMake package as a user gets it (item 3 of issue 25): copied to another folder
# while the original install is hidden, it holds no absolute path of this build, and
# examples/cpp configures, builds and runs against the copy (the consumer finds LibTorch itself);
# find_package(nad VERSION) refuses another nad version, another LibTorch minor version, another
# C++ ABI and a missing LibTorch, each with a message that says so.
#   cpp_tests/test_package.sh <install prefix> <work folder> <LibTorch cmake prefix> <fixtures folder>
# scripts/test_cpp.sh runs it after the install. JOBS: parallel build jobs (default 2).
set -euo pipefail
install=$(cd "$1" && pwd)
work=$2
torch_prefix=$3
fixtures=$(cd "$4" && pwd)
root=$(cd "$(dirname "$0")/.." && pwd)
rm -rf "$work" && mkdir -p "$work"
work=$(cd "$work" && pwd)
moved=$work/elsewhere/nad

mkdir -p "$(dirname "$moved")"
cp -a "$install" "$moved"
mv "$install" "$install.hidden"
trap 'mv "$install.hidden" "$install"' EXIT

# 1. No absolute path of this build (its source, build or install folder, or this torch) in the package.
for path in "$root" "$install" "$(dirname "$(dirname "$torch_prefix")")"; do
  if grep -rIl --fixed-strings "$path" "$moved/lib/cmake" "$moved/include"; then
    echo "FAIL: the installed package names $path" >&2
    exit 1
  fi
done
runpath=$(readelf -d "$moved"/lib/libnad.so | sed -n 's/.*(R\(UN\)\?PATH).*\[\(.*\)\]/\2/p')
if [ -n "$runpath" ] && [ "$runpath" != '$ORIGIN' ]; then
  echo "FAIL: libnad carries the RUNPATH '$runpath' (absolute paths make the package unmovable)" >&2
  exit 1
fi
echo "package: no absolute path in lib/cmake/nad, libnad RUNPATH '${runpath}'"

# 2. The examples against the moved package, run without LD_LIBRARY_PATH.
cmake -S "$root/examples/cpp" -B "$work/example" -G Ninja -DCMAKE_PREFIX_PATH="$moved;$torch_prefix" > "$work/example.log" \
  || { cat "$work/example.log" >&2; exit 1; }
grep "nad 0" "$work/example.log"
cmake --build "$work/example" -j "${JOBS:-2}"
env -u LD_LIBRARY_PATH "$work/example/app" "$fixtures/bank.safetensors" "$work/edited.safetensors"
env -u LD_LIBRARY_PATH "$work/example/run_pt2" "$fixtures/gated_all.pt2" "$fixtures/gated_expected.safetensors"

# 3. find_package(nad VERSION) and the LibTorch checks: each refused configuration names its reason.
probe=$work/probe
mkdir -p "$probe"
cat > "$probe/CMakeLists.txt" <<'CMAKE'
cmake_minimum_required(VERSION 3.25)
project(probe LANGUAGES CXX)
find_package(nad ${WANT} REQUIRED)
CMAKE
refused() {  # refused <what> <expected text> <cmake arguments...>
  local what=$1 text=$2 log="$work/probe-$1.log"
  shift 2
  rm -rf "$probe/build"
  if cmake -S "$probe" -B "$probe/build" "$@" > "$log" 2>&1; then
    echo "FAIL: $what was accepted" >&2
    exit 1
  fi
  if ! tr -s ' \n' ' ' < "$log" | grep -qF "$text"; then
    echo "FAIL: $what refused without \"$text\":" >&2
    cat "$log" >&2
    exit 1
  fi
  echo "refused as expected: $what ($text)"
}
fake=$work/fake_torch
mkdir -p "$fake/old" "$fake/abi"
for kind in old abi; do
  version=2.14.1
  [ "$kind" = old ] && version=2.0.0
  cat > "$fake/$kind/TorchConfigVersion.cmake" <<CMAKE
set(PACKAGE_VERSION "$version")
set(PACKAGE_VERSION_COMPATIBLE TRUE)
CMAKE
  cat > "$fake/$kind/TorchConfig.cmake" <<'CMAKE'
add_library(torch INTERFACE IMPORTED)
set(Torch_FOUND TRUE)
CMAKE
done
echo 'set(TORCH_CXX_FLAGS "-D_GLIBCXX_USE_CXX11_ABI=0")' >> "$fake/abi/TorchConfig.cmake"
refused newer_nad "compatible with requested version \"9.9\"" -DWANT=9.9 -DCMAKE_PREFIX_PATH="$moved;$torch_prefix"
refused other_libtorch "was built against LibTorch" -DWANT=0.1 -DCMAKE_PREFIX_PATH="$moved" -DTorch_DIR="$fake/old"
tr -s ' \n' ' ' < "$work/probe-other_libtorch.log" | grep -qF "but LibTorch 2.0.0 was found" \
  || { echo "FAIL: the message does not name the LibTorch found" >&2; exit 1; }
refused other_abi "_GLIBCXX_USE_CXX11_ABI=0" -DWANT=0.1 -DCMAKE_PREFIX_PATH="$moved" -DTorch_DIR="$fake/abi"
refused no_libtorch "needs LibTorch" -DWANT=0.1 -DCMAKE_PREFIX_PATH="$moved" -DTorch_DIR="$work/none"
echo "package: relocatable, and find_package(nad) checks its version and LibTorch's"
