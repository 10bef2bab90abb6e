"""Loads the compiled extension that registers the ``torch.ops.nad`` operators.

NAD_EXT_LIBRARY=<path of libnad.so> uses the LibTorch (CMake) build of the same operators
instead of nad_ext._C. Either may also be loaded while the other is: the first of the two to load
registers the operators and the other registers nothing (csrc/ops/registration.h), so the
operators run the first one's kernels; :func:`library_info` says which.
"""
import os

import torch

from nad_ext import __version__

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


def library_info() -> dict:
    """The library whose kernels run the ``nad`` operators in this process: ``version``,
    ``cuda`` (built with the CUDA kernels), ``torch`` (the PyTorch it was compiled against),
    ``abi`` (its ``_GLIBCXX_USE_CXX11_ABI``) and ``path`` (its file)."""
    try:
        text = torch.ops.nad._library_info()
    except (AttributeError, RuntimeError):  # a build from before _library_info (version unknown)
        cuda = torch._C._dispatch_has_kernel_for_dispatch_key("nad::task_gate", "CUDA")
        return {"version": None, "cuda": cuda, "torch": None, "abi": None, "path": None}
    head, _, path = text.partition(";path=")
    info = dict(item.split("=", 1) for item in head.split(";"))
    return {"version": info["version"], "cuda": info["cuda"] == "1", "torch": info["torch"],
            "abi": int(info["abi"]), "path": path}


def has_cuda_kernels() -> bool:
    """True when the operators' kernels in this process include the CUDA ones."""
    return library_info()["cuda"]


_registered = library_info()
if _registered["version"] not in (None, __version__):
    raise ImportError(
        f"the nad operators of this process were registered by {_registered['path']} (nad-ext "
        f"{_registered['version']}), which loaded before this nad_ext ({__version__}): load one version "
        "of nad-ext per process"
    )
