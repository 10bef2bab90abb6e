"""``nad::gate_mse``: the per-task activation MSE of one gate point, fused into one pass."""
from __future__ import annotations

import torch

from . import checks, _layout


def gate_mse(
    masked: torch.Tensor, original: torch.Tensor, counts: torch.Tensor, task_ids: torch.Tensor, num_tasks: int
) -> torch.Tensor:
    """Per-task MSE between the masked and the original network's activations at one gate point.

    ``out[t]`` is the mean over all elements of the samples ``n`` with ``task_ids[n] == t`` and
    ``counts[n]`` of ``(masked - original) ** 2`` (0 for tasks without such samples): the
    ``mse`` term of :func:`nad_ext.training.objective.nad_loss` for this gate point.
    Low-precision inputs are read directly and accumulated in float32 (no float32 copies of the
    activations).

    Args:
        masked: the masked network's gated output, (N, C, ...), float32/float16/bfloat16
            (float64 for gradcheck). Read without copies when ``masked`` and ``original`` are
            both contiguous or both channels innermost (token views, channels_last maps; see
            :mod:`nad_ext.ops._layout`).
        original: the original network's output, masked's shape and dtype; no gradient.
        counts: (N,) bool, the samples that count (the original network classifies them correctly).
        task_ids: (N,) int64 in [0, num_tasks).
        num_tasks: T, the length of the result.

    Returns:
        (T,) float32 (float64 for float64 inputs), differentiable with respect to ``masked``.
    """
    checks.tensor("masked", masked, min_dims=2, dtypes=checks.FLOAT_TYPES)
    checks.tensor("original", original, dtypes=(masked.dtype,))
    checks.tensor("counts", counts, dims=1, dtypes=(torch.bool,))
    checks.tensor("task_ids", task_ids, dims=1, dtypes=(torch.int64,))
    checks.same_device(masked=masked, original=original, counts=counts, task_ids=task_ids)
    if original.shape != masked.shape:
        raise ValueError(f"original must have masked's shape {tuple(masked.shape)}; got {tuple(original.shape)}")
    for name, t in (("counts", counts), ("task_ids", task_ids)):
        if t.shape[0] != masked.shape[0]:
            raise ValueError(f"{name} must have shape ({masked.shape[0]},), one entry per sample; got {tuple(t.shape)}")
    if not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks must be a positive int; got {num_tasks!r}")
    if original.requires_grad and torch.is_grad_enabled():
        raise ValueError("original requires grad, but it is the frozen network's activation; pass original.detach()")
    checks.ids_in_range("task_ids", task_ids, num_tasks, "one entry of the result per task")
    return torch.ops.nad.gate_mse(masked, original, counts, task_ids, num_tasks)


def gate_mse_reference(masked, original, counts, task_ids, num_tasks):
    """Pure-PyTorch definition of :func:`gate_mse` (the per-point term of ``nad_loss``)."""
    acc = torch.float64 if masked.dtype == torch.float64 else torch.float32
    squares = (masked.to(acc) - original.to(acc)).pow(2).flatten(1)
    per_sample = squares.sum(dim=1) / max(squares.shape[1], 1)  # a sample of no elements: 0, as the op
    c = counts.to(acc)
    k = torch.zeros(num_tasks, dtype=acc, device=masked.device).index_add_(0, task_ids, c)
    sums = torch.zeros(num_tasks, dtype=acc, device=masked.device).index_add_(0, task_ids, per_sample * c)
    return sums / k.clamp(min=1)


@torch.library.register_fake("nad::gate_mse")
def _(masked, original, counts, task_ids, num_tasks):
    acc = torch.float64 if masked.dtype == torch.float64 else torch.float32
    return masked.new_empty((num_tasks,), dtype=acc)


@torch.library.register_fake("nad::gate_mse_backward")
def _(grad, masked, original, counts, task_ids, num_tasks):
    # Same rule as csrc/ops/gate_mse.cpp: a channels-innermost pair stays channels innermost.
    return _layout.empty_in_gate_layout(masked, _layout.channels_inner(masked) and _layout.channels_inner(original))
