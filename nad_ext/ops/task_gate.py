"""``nad::task_gate``: task-conditional channel gates, many tasks in one batch."""
from __future__ import annotations

import torch

from . import checks, _layout


def task_gate(x: torch.Tensor, logits: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
    """Multiplies every channel of every sample by its task's gate.

    ``y[n, c, ...] = x[n, c, ...] * sigmoid(logits[task_ids[n], c])``

    Args:
        x: activations, shape (N, C, ...), float32/float16/bfloat16 (float64 for gradcheck).
            Read in place when contiguous or channels innermost (the (N, C, L) view
            ``t.movedim(2, 1)`` of (N, L, C) tokens, the (N, C, H, W) view of an NHWC map, i.e.
            channels_last; see :mod:`nad_ext.ops._layout`); other layouts are copied.
        logits: gate logits, shape (T, C), float32 (float64 only with float64 ``x``).
        task_ids: the task of each sample, shape (N,), int64 with values in [0, T).

    Returns:
        A tensor shaped like ``x``, in ``x``'s layout when it is channels innermost (so
        ``task_gate(t.movedim(2, 1), ...).movedim(1, 2)`` is (N, L, C) contiguous again),
        contiguous otherwise. Differentiable with respect to ``x`` and ``logits``; the logits gradient is
        accumulated in float32, summed over each task's samples and space (in a fixed order on
        the CPU, and on CUDA under ``torch.use_deterministic_algorithms(True)``; with float
        atomics, fast but not bit-reproducible, on CUDA otherwise). Where ``x`` needs no
        gradient, backward does not compute one.
    """
    checks.tensor("x", x, min_dims=2, dtypes=checks.FLOAT_TYPES)
    checks.tensor("logits", logits, dims=2, dtypes=(torch.float32, torch.float64))
    checks.tensor("task_ids", task_ids, dims=1, dtypes=(torch.int64,))
    checks.same_device(x=x, logits=logits, task_ids=task_ids)
    if logits.dtype == torch.float64 and x.dtype != torch.float64:
        raise ValueError(f"logits may be float64 only when x is float64; x is {x.dtype}")
    if logits.shape[1] != x.shape[1]:
        raise ValueError(
            f"logits must have shape (T, {x.shape[1]}) to match x's {x.shape[1]} channels; "
            f"got {tuple(logits.shape)}"
        )
    if task_ids.shape[0] != x.shape[0]:
        raise ValueError(
            f"task_ids must have shape ({x.shape[0]},), one task per sample of x; "
            f"got {tuple(task_ids.shape)}"
        )
    checks.ids_in_range("task_ids", task_ids, logits.shape[0], "one row of logits per task")
    return torch.ops.nad.task_gate(x, logits, task_ids)


def task_gate_reference(x: torch.Tensor, logits: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch definition of :func:`task_gate`, used by the tests."""
    gate = torch.sigmoid(logits)[task_ids]
    return x * gate.reshape(*gate.shape, *([1] * (x.dim() - 2))).to(x.dtype)


@torch.library.register_fake("nad::task_gate")
def _(x, logits, task_ids):
    return _layout.empty_in_gate_layout(x)


@torch.library.register_fake("nad::task_gate_backward")
def _(grad_y, x, logits, task_ids, x_grad=True):
    grad_x = _layout.empty_in_gate_layout(x) if x_grad else x.new_empty((0,))
    return grad_x, torch.empty_like(logits, memory_format=torch.contiguous_format)
