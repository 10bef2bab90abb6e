"""The NAD objective of METHOD.md, for a batch that carries samples of many tasks.

For task t with samples S_t in the batch and K_t the samples the original network classifies
correctly:

    L_act(t)    = ( CE over S_t  +  sum_l MSE(a_t^l(x_K), a^l(x_K)) ) / L
    L_sparse(t) = (1/L) sum_l mean_c sigmoid(m_t^l[c])^2
    Loss(t)     = L_act(t) + beta * L_sparse(t)

Every term is a mean over task t's own samples only, so the gradient of the sum over tasks
with respect to task t's gates is exactly the gradient of Loss(t) alone: batching tasks does
not change what each task learns. A task whose K_t is empty is skipped (no loss, no update).

The selective variant (not in the paper; ``NADConfig(negatives=r, negative_weight=gamma)``)
also routes images of other classes, the *negatives* N_t, through task t's gates and adds

    L_act(t)    = ( CE over S_t  +  gamma * L_neg(t)  +  sum_l MSE(a_t^l(x_K), a^l(x_K)) ) / L
    L_neg(t)    = mean over x in N_t of  -log(1 - p_t(x)),   p_t(x) = sum_{c in t} softmax(F_t(x))_c

S_t and K_t stay the task's own-class samples. -log(1 - p_t) is the cross-entropy of the
event "not task t": the counterpart on negatives of CE on own-class samples (for a one-class
task, CE is -log p_t), zero when the masked network gives t no probability, steep as p_t -> 1.
It asks only that the sub-architecture not predict t; which other class it predicts is left
free, so no knowledge of the other tasks' labels is forced into t's gates. For a task of
several classes p_t sums their probabilities (a negative predicted as any of them counts as
accepted). gamma weighs it against the CE term, inside the 1/L like CE, so gamma means the
same on networks with different numbers of gate points. It is computed stably as
logsumexp(z) - logsumexp(z over the classes not in t).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from nad_ext.ops import gate_mse, normalized_gradient_step_

# The selective objective's settings behind ``--selective``: 4 negatives per 16 own-class
# images, weight 2 (r, gamma: tuned on the demo zoo, 8 epochs at lr 0.2), and gates annealed to
# temperature 0.2 (NADConfig.gate_temperature's default): with soft gates a real-data CNN's
# binary sub-architectures lost 12-19 points of own-class accuracy that the soft ones kept
# (benchmarks/RESULTS.md, "Sub-architectures on real data" and "The selective variant on real
# data"). A bank's config names its objective through
# :func:`nad_ext.gates.maskbank.describe_objective`.
SELECTIVE_DEFAULTS = {"negatives": 0.25, "negative_weight": 2.0, "gate": "annealed"}


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
    negative: torch.Tensor | None = None  # L_neg(t), the selective variant's term (None without negatives)
    # bool (T, L): the step's non-finite gate gradients (set by train_step, nad_ext.training.nonfinite)
    nonfinite: torch.Tensor | None = None


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
    *,
    negative: torch.Tensor | None = None,
    task_classes: torch.Tensor | None = None,
    negative_weight: float = 0.0,
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
        negative: the selective variant: (N,) bool, the sample is a negative of its task (an
            image of another class); None (the paper's objective) when there are none.
        task_classes: with ``negative``: (T, classes) bool, the network outputs of each task.
        negative_weight: with ``negative``: gamma, the weight of the negative term.
    """
    num_tasks = gate_logits[0].shape[0]
    num_points = len(gate_logits)
    own = None if negative is None else ~negative  # the samples of the task's own classes
    ones = torch.ones_like(task_ids, dtype=torch.float32) if own is None else own.float()
    n_t = torch.zeros(num_tasks, device=task_ids.device).index_add_(0, task_ids, ones)
    if own is not None:
        correct = correct & own  # K_t: own-class samples the original network gets right
    correct_f = correct.float()
    k_t = torch.zeros(num_tasks, device=task_ids.device).index_add_(0, task_ids, correct_f)

    ce_n = F.cross_entropy(masked_out.float(), labels, reduction="none")
    ce = _per_task_mean(ce_n if own is None else ce_n * own, task_ids, n_t, num_tasks)
    # nad::gate_mse: one pass per gate point, low-precision activations read without copies.
    axes = [1] * num_points if channel_axes is None else list(channel_axes)
    mse = sum(gate_mse(*_sample_rows(masked, original.detach(), axis), correct, task_ids, num_tasks).float()
              for masked, original, axis in zip(masked_acts, original_acts, axes, strict=True))
    neg = None
    if negative is None:
        act = (ce + mse) / num_points
    else:
        neg = negative_term(masked_out, task_ids, negative, task_classes, num_tasks)
        act = (ce + negative_weight * neg + mse) / num_points
    sparse = sum(torch.sigmoid(m).pow(2).mean(dim=1) for m in gate_logits) / num_points
    loss = act + beta * sparse
    counted = k_t > 0
    # A product instead of loss[counted]: no device sync, and the uncounted tasks' gradients
    # are exact zeros, which the update leaves alone.
    total = (loss * counted).sum()
    return NADLoss(total=total, ce=ce, mse=mse, act=act, sparse=sparse, loss=loss, counted=counted, negative=neg)


def negative_term(masked_out: torch.Tensor, task_ids: torch.Tensor, negative: torch.Tensor,
                  task_classes: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """L_neg(t) of the selective variant, (T,): the mean over task t's negatives of
    -log(1 - p_t(x)), p_t the masked network's summed probability of t's classes (0 for a task
    without negatives in the batch). Shape-static and sync-free (CUDA-graph safe)."""
    z = masked_out.float()
    if task_classes.shape[1] < z.shape[1]:  # outputs beyond the data's classes belong to no task
        task_classes = F.pad(task_classes, (0, z.shape[1] - task_classes.shape[1]))
    in_task = task_classes[task_ids]  # (N, classes)
    # A large finite fill instead of -inf: a row with no class outside t (not a negative, by
    # construction) stays finite, so torch.where passes it a zero gradient instead of NaN.
    rest = torch.logsumexp(z.masked_fill(in_task, -1e30), dim=1)
    per_sample = torch.where(negative, torch.logsumexp(z, dim=1) - rest, torch.zeros_like(rest))
    counts = torch.zeros(num_tasks, device=z.device).index_add_(0, task_ids, negative.float())
    return _per_task_mean(per_sample, task_ids, counts, num_tasks)


@torch.no_grad()
def normalized_gradient_step(gate_logits: Sequence[torch.Tensor], tasks: torch.Tensor, lr: float) -> None:
    """m_t^l <- m_t^l - lr * g / max(||g||_2, 1e-12) for the given tasks at every gate point
    (the authors' ``F.normalize``).

    g is the gradient of task t's loss with respect to its logits at gate point l (``.grad``),
    the norm taken over that gate point's channels. A zero gradient leaves the gate unchanged,
    and so does a non-finite one (the trainer stops or skips such a step first:
    :mod:`nad_ext.training.nonfinite`). One ``nad::normalized_gradient_step_`` launch for all
    gate points.
    """
    normalized_gradient_step_(gate_logits, [m.grad for m in gate_logits], tasks, lr)
