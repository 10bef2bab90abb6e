"""The NAD objective of METHOD.md, for a batch that carries samples of many tasks.

For task t with samples S_t in the batch and K_t the samples the original network classifies
correctly:

    L_act(t)    = ( CE over S_t  +  sum_l MSE(a_t^l(x_K), a^l(x_K)) ) / L
    L_sparse(t) = (1/L) sum_l mean_c sigmoid(m_t^l[c])^2
    Loss(t)     = L_act(t) + beta * L_sparse(t)

Every term is a mean over task t's own samples only, so the gradient of the sum over tasks
with respect to task t's gates is exactly the gradient of Loss(t) alone: batching tasks does
not change what each task learns. A task whose K_t is empty is skipped (no loss, no update).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from nad_ext.ops import gate_mse, normalized_gradient_step_


@dataclass
class NADLoss:
    """Loss terms of one step. Per-task tensors have shape (T,) over all tasks of the model;
    only the entries where ``counted`` is true are meaningful."""

    total: torch.Tensor  # scalar: sum of Loss(t) over counted tasks; backpropagate this
    ce: torch.Tensor
    mse: torch.Tensor  # sum over gate points of the per-point MSE
    act: torch.Tensor
    sparse: torch.Tensor
    loss: torch.Tensor
    counted: torch.Tensor  # bool (T,): tasks present in the batch with a non-empty K


def _per_task_mean(values: torch.Tensor, task_ids: torch.Tensor, counts: torch.Tensor, num_tasks: int):
    sums = torch.zeros(num_tasks, dtype=torch.float32, device=values.device).index_add_(0, task_ids, values.float())
    return sums / counts.clamp(min=1)


def _sample_rows(masked: torch.Tensor, original: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair as nad::gate_mse should see it. The MSE is a mean over all of a sample's
    elements, so the order of a sample's dims does not matter: a view in which both are
    contiguous (dims after the batch sorted by stride) is read in place, whatever the layout
    (tokens, NHWC maps, channels_last maps, (N, L, heads, d) head outputs). Otherwise the
    (N, C, ...) view, which the op reads in place when both are channels innermost, else copies
    (a cropped Swin map, say)."""
    order = [0] + sorted(range(1, masked.dim()), key=lambda d: -masked.stride(d))
    m, o = masked.permute(order), original.permute(order)
    if m.is_contiguous() and o.is_contiguous():
        return m, o
    return masked.movedim(axis, 1), original.movedim(axis, 1)


def nad_loss(
    masked_out: torch.Tensor,
    labels: torch.Tensor,
    masked_acts: Sequence[torch.Tensor],
    original_acts: Sequence[torch.Tensor],
    correct: torch.Tensor,
    task_ids: torch.Tensor,
    gate_logits: Sequence[torch.Tensor],
    beta: float | torch.Tensor,
    channel_axes: Sequence[int] | None = None,
) -> NADLoss:
    """Computes the per-task NAD loss terms.

    Args:
        masked_out: (N, classes) logits of the masked network.
        labels: (N,) class of each sample.
        masked_acts / original_acts: per gate point, the masked network's gated output and the
            original network's output, (N, C_l, ...), or channels on another axis (see
            ``channel_axes``); the MSE is the mean over all of a sample's elements either way.
        correct: (N,) bool, the original network classifies the sample correctly.
        task_ids: (N,) int64 task of each sample.
        gate_logits: per gate point, the (T, C_l) gate logits of all tasks.
        beta: weight of the sparsity term; a (T,) tensor gives every task its own (beta
            calibration runs several betas side by side this way).
        channel_axes: per gate point, the channel axis of its activations (default 1 for all).
    """
    num_tasks = gate_logits[0].shape[0]
    num_points = len(gate_logits)
    ones = torch.ones_like(task_ids, dtype=torch.float32)
    n_t = torch.zeros(num_tasks, device=task_ids.device).index_add_(0, task_ids, ones)
    correct_f = correct.float()
    k_t = torch.zeros(num_tasks, device=task_ids.device).index_add_(0, task_ids, correct_f)

    ce = _per_task_mean(F.cross_entropy(masked_out.float(), labels, reduction="none"), task_ids, n_t, num_tasks)
    # nad::gate_mse: one pass per gate point, low-precision activations read without copies.
    axes = [1] * num_points if channel_axes is None else list(channel_axes)
    mse = sum(gate_mse(*_sample_rows(masked, original.detach(), axis), correct, task_ids, num_tasks).float()
              for masked, original, axis in zip(masked_acts, original_acts, axes, strict=True))
    act = (ce + mse) / num_points
    sparse = sum(torch.sigmoid(m).pow(2).mean(dim=1) for m in gate_logits) / num_points
    loss = act + beta * sparse
    counted = k_t > 0
    # A product instead of loss[counted]: no device sync, and the uncounted tasks' gradients
    # are exact zeros, which the update leaves alone.
    total = (loss * counted).sum()
    return NADLoss(total=total, ce=ce, mse=mse, act=act, sparse=sparse, loss=loss, counted=counted)


@torch.no_grad()
def normalized_gradient_step(gate_logits: Sequence[torch.Tensor], tasks: torch.Tensor, lr: float) -> None:
    """m_t^l <- m_t^l - lr * g / ||g||_2 for the given tasks at every gate point.

    g is the gradient of task t's loss with respect to its logits at gate point l (``.grad``),
    the norm taken over that gate point's channels. A zero gradient leaves the gate unchanged.
    One ``nad::normalized_gradient_step_`` launch for all gate points.
    """
    normalized_gradient_step_(gate_logits, [m.grad for m in gate_logits], tasks, lr)
