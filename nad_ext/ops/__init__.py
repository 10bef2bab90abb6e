"""Thin, documented wrappers of the ``torch.ops.nad`` operators.

Each wrapper checks its arguments in Python (clear errors that name the argument) and calls
the dispatcher; kernels are in csrc/, autograd is registered in C++ so LibTorch users get
gradients too, and the fake (meta) implementations here let ``torch.compile`` trace them.
"""
from nad_ext import _extension  # noqa: F401  (loads the operators)

from .mask_overlap import mask_overlap, mask_overlap_reference
from .task_gate import task_gate, task_gate_reference

__all__ = ["mask_overlap", "mask_overlap_reference", "task_gate", "task_gate_reference"]
