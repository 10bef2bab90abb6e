#!/usr/bin/env bash
# Sets up nad-ext on a fresh machine: a virtual environment in .venv with PyTorch and the
# other dependencies, and an editable install that builds the native extension.
#   NAD_EXT_BUILD=auto|cuda|cpu   kind of build (default auto: the CUDA kernels only on a
#                                 machine with an NVIDIA GPU; cuda compiles them anyway)
#   TORCH_CUDA_ARCH_LIST          GPU architectures (default 9.0, the H100)
#   MAX_JOBS                      parallel compile jobs (default 2)
# The compiler's full output goes to build/setup-build.log; the console shows ninja's [n/m]
# progress, one line per compiled file. Compiled files are kept in build/ (see setup.py), so a
# rerun recompiles only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
start=$SECONDS
elapsed() { local s=$((SECONDS - start)); printf '%dm%02ds' $((s / 60)) $((s % 60)); }

echo "== nad-ext set-up, step 1 of 2: Python environment .venv with PyTorch 2.14.1, torchvision and the"
echo "   other dependencies (a few minutes the first time, mostly downloading PyTorch; seconds after)"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -r requirements.txt
echo "   done ($(elapsed))"

export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-2}
mkdir -p build
if ! kind=$(.venv/bin/python setup.py --print-build-kind 2>build/build-kind.err); then
  cat build/build-kind.err >&2
  exit 1
fi
export NAD_EXT_BUILD=${kind%%:*}
if [ "$NAD_EXT_BUILD" = cuda ]; then
  what="the CPU and CUDA kernels (GPU architectures $TORCH_CUDA_ARCH_LIST): about 10 minutes on 2 cores"
else
  what="the CPU kernels: about 5 minutes on 2 cores"
fi
echo "== step 2 of 2: native extension nad_ext._C, $what"
echo "   (why: ${kind#*: }; $MAX_JOBS compile jobs at a time, full log in build/setup-build.log)"
log=build/setup-build.log
build_start=$SECONDS

# Shortens ninja's "[n/m] c++ <flags> -c <source> -o <object> ..." lines (printed as each file
# is done) to the file compiled.
progress() {
  local line source
  while IFS= read -r line; do
    if [[ $line =~ \[([0-9]+)/([0-9]+)\] ]]; then
      local step="[${BASH_REMATCH[1]}/${BASH_REMATCH[2]}]"
      if [[ $line =~ \ -c\ ([^ ]+\.(cpp|cu))( |$) ]]; then
        source=${BASH_REMATCH[1]#"$PWD/"}
        echo "   $step $source  ($(elapsed))"
      fi
    elif [[ $line == *"ninja: no work to do"* ]]; then
      echo "   nothing to recompile: build/ holds the compiled files of an earlier run"
    fi
  done
}

# pip -v streams the build's output; without it pip is silent until the end.
if ! .venv/bin/python -m pip install -v --no-build-isolation --no-deps --use-pep517 -e . 2>&1 \
    | tee "$log" | progress; then
  echo "The build failed; the end of $log:" >&2
  tail -n 40 "$log" >&2
  exit 1
fi
echo "   built in $((SECONDS - build_start)) s"
.venv/bin/python -c "import nad_ext.ops, nad_ext._extension as e
print('   nad_ext', nad_ext.__version__, 'is ready; CUDA kernels:', e.has_cuda_kernels())"
echo "== set-up done in $(elapsed). Next: .venv/bin/nad demo (about 5.5 minutes on 2 cores the first time)"
