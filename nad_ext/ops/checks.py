"""Argument checks shared by the operator wrappers: they run in Python, before any kernel, and
name the argument and what was expected. Callers that run many ops on ids they have checked
once (``GatedModel``, the training step) use :func:`ids_in_range` and :func:`ids_checked` too."""
from __future__ import annotations

import contextlib
import contextvars

import torch

# Set while a caller that has already validated its ids runs a batch of ops (see ids_checked).
_IDS_CHECKED = contextvars.ContextVar("nad_ext_ids_checked", default=False)

FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor(name: str, value, *, dims=None, min_dims=None, dtypes=None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dims is not None and value.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimension(s), got shape {tuple(value.shape)}")
    if min_dims is not None and value.dim() < min_dims:
        raise ValueError(
            f"{name} must have at least {min_dims} dimensions, got shape {tuple(value.shape)}"
        )
    if dtypes is not None and value.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype {names}; got {str(value.dtype).replace('torch.', '')}")
    return value


def same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{', '.join(devices)} must be on one device; got {listed}")


@contextlib.contextmanager
def ids_checked():
    """Within this block the op wrappers skip their id-range checks: the caller (for example
    ``GatedModel.forward``) has checked the ids once, and each check costs a device sync."""
    token = _IDS_CHECKED.set(True)
    try:
        yield
    finally:
        _IDS_CHECKED.reset(token)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def ids_in_range(name: str, ids: torch.Tensor, upper: int, what: str) -> None:
    """Values of ``ids`` in [0, upper). Skipped while torch.compile traces or a CUDA graph is
    captured (a value read is impossible there), and inside :func:`ids_checked`. Reads the
    device once: min and max come back together (``aminmax``), one sync per call."""
    if ids.numel() == 0 or _IDS_CHECKED.get() or torch.compiler.is_compiling() or _capturing():
        return
    lo, hi = torch.stack(torch.aminmax(ids)).cpu().tolist()  # one copy to the host
    if lo < 0 or hi >= upper:
        raise ValueError(f"{name} must lie in [0, {upper}) ({what}); got values in [{lo}, {hi}]")
