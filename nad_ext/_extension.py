"""Loads the compiled extension that registers the ``torch.ops.nad`` operators."""
import torch

try:
    from nad_ext import _C  # noqa: F401  (importing registers the operators)
except ImportError as err:  # pragma: no cover - exercised only on a broken install
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
