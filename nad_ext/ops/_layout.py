"""The memory layout of the gate ops' outputs, shared by their fakes (the C++ rule is
``gate_format`` in csrc/ops/gate_passes.h): channels_last when the input is 4-D, channels_last
and not also contiguous, else contiguous. Fakes must give the real op's strides exactly, or
``torch.compile`` traces a layout that the compiled code then does not get."""
from __future__ import annotations

import torch


def gate_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def empty_in_gate_format(x: torch.Tensor, shape=None) -> torch.Tensor:
    """An uninitialised tensor of x's dtype and device (shape: x's by default) in gate_format(x)."""
    return torch.empty(x.shape if shape is None else shape, dtype=x.dtype, device=x.device,
                       memory_format=gate_format(x))
