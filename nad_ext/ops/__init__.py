"""Thin, documented wrappers of the ``torch.ops.nad`` operators.

Each wrapper checks its arguments in Python (clear errors that name the argument) and calls
the dispatcher; kernels are in csrc/, autograd is registered in C++ so LibTorch users get
gradients too, and the fake (meta) implementations here let ``torch.compile`` trace them.
:mod:`~nad_ext.ops.checks` holds the argument checks, also for callers that check task ids once
for many ops.

May import: ``nad_ext._extension`` only (it loads the compiled operators). The gates and the
stages after them use the operators; the data and the models do not.
"""
from nad_ext import _extension  # noqa: F401  (loads the operators)

from .mask_overlap import mask_overlap, mask_overlap_reference
from .task_gate import task_gate, task_gate_reference

from .gate_mse import gate_mse, gate_mse_reference
from .masked_conv2d import masked_conv2d, masked_conv2d_reference
from .normalized_step import normalized_gradient_step_, normalized_gradient_step_reference

__all__ = [
    "task_gate", "task_gate_reference",
    "mask_overlap", "mask_overlap_reference",
    # Fused NAD ops: gated convolution, per-task gate-point MSE, normalised-gradient update.
    "masked_conv2d", "masked_conv2d_reference",
    "gate_mse", "gate_mse_reference",
    "normalized_gradient_step_", "normalized_gradient_step_reference",
]
