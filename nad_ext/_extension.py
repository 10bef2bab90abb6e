"""Loads the compiled extension that registers the ``torch.ops.nad`` operators.

NAD_EXT_LIBRARY=<path of libnad.so> uses the LibTorch (CMake) build of the same operators
instead of nad_ext._C (one of the two only: both register the ``nad`` namespace).
"""
import os

import torch

_library = os.environ.get("NAD_EXT_LIBRARY")
try:
    if _library:
        torch.ops.load_library(_library)
    else:
        from nad_ext import _C  # noqa: F401  (importing registers the operators)
except (ImportError, OSError) as err:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "nad_ext's native extension (nad_ext._C) is not built or does not match this PyTorch "
        f"({torch.__version__}): {err}\n"
        "Build it from the repository root with:\n"
        "    pip install --no-build-isolation --use-pep517 -e .\n"
        "(or `python setup.py build_ext --inplace`; NAD_EXT_BUILD=cpu for a CPU-only build)."
    ) from err


def has_cuda_kernels() -> bool:
    """True when the extension was built with its CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("nad::task_gate", "CUDA")
