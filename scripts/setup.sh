#!/usr/bin/env bash
# Sets up nad-ext on a fresh machine: a virtual environment in .venv with PyTorch and the
# other dependencies, and an editable install that builds the native extension.
#   NAD_EXT_BUILD=auto|cuda|cpu   kind of build (default auto: CUDA kernels when possible)
#   TORCH_CUDA_ARCH_LIST          GPU architectures (default 9.0, the H100)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q -r requirements.txt
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-2}
.venv/bin/python -m pip install -q --no-build-isolation --no-deps --use-pep517 -e .
.venv/bin/python -c "import nad_ext, nad_ext._extension as e; print('nad_ext built; CUDA kernels:', e.has_cuda_kernels())"
