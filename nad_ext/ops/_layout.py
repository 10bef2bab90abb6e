"""The memory layout of the gate ops' tensors, shared by their fakes: the Python twin of
csrc/ops/gate_layout.h. Fakes must give the real op's strides exactly, or ``torch.compile``
traces a layout that the compiled code then does not get.

An (N, C, *spatial) tensor is *channels innermost* when it is stored as a dense (N, *spatial, C)
tensor and is not also contiguous: the (N, C, L) view ``x.movedim(2, 1)`` of (N, L, C) tokens,
the (N, C, H, W) view of an NHWC map (4-D channels_last), 5-D channels_last_3d. The ops read such
tensors in place and answer in the same layout; contiguous tensors likewise; anything else is
copied to contiguous and answered contiguous.
"""
from __future__ import annotations

import torch


def channels_inner(x: torch.Tensor) -> bool:
    return x.dim() >= 3 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


def empty_in_gate_layout(x: torch.Tensor, inner: bool | None = None, shape=None) -> torch.Tensor:
    """An uninitialised tensor of x's dtype and device (shape: x's by default), channels
    innermost when ``inner`` (default: when x is), else contiguous."""
    shape = tuple(x.shape if shape is None else shape)
    if not (channels_inner(x) if inner is None else inner):
        return torch.empty(shape, dtype=x.dtype, device=x.device)
    # The strides of a contiguous (N, *spatial, C) tensor seen as (N, C, *spatial); no size is
    # 0 here (an empty tensor counts as contiguous).
    strides = [0] * len(shape)
    running = shape[1]
    strides[1] = 1
    for k in range(len(shape) - 1, 1, -1):
        strides[k] = running
        running = running * shape[k]
    strides[0] = running
    return torch.empty_strided(shape, strides, dtype=x.dtype, device=x.device)


def gate_format(x: torch.Tensor) -> torch.memory_format:
    """The rule as a memory format, for the 4-D tensors of ``nad::masked_conv2d``."""
    return torch.channels_last if x.dim() == 4 and channels_inner(x) else torch.contiguous_format


def empty_in_gate_format(x: torch.Tensor, shape=None) -> torch.Tensor:
    """An uninitialised 4-D tensor of x's dtype and device (shape: x's by default) in gate_format(x)."""
    return torch.empty(x.shape if shape is None else shape, dtype=x.dtype, device=x.device,
                       memory_format=gate_format(x))
