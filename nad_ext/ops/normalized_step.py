"""``nad::normalized_gradient_step_``: the NAD update of all gate points and tasks at once."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import checks

# The smallest norm the step divides by: F.normalize's default eps (csrc/ops/normalized_step.h).
STEP_EPS = 1e-12


def normalized_gradient_step_(
    logits: Sequence[torch.Tensor], grads: Sequence[Optional[torch.Tensor]], tasks: torch.Tensor, lr: float
) -> None:
    """In place, for every gate point l and task t in ``tasks``:
    ``m_l[t] -= lr * g_l[t] / max(||g_l[t]||_2, 1e-12)``.

    The norm is over gate point l's channels, clamped as the authors' ``F.normalize`` clamps it
    (eps 1e-12): a norm below 1e-12 gives a step shorter than ``lr``. Rows whose gradient norm is
    zero or not finite (a NaN or Inf in the gradient) are left unchanged; the trainer finds
    non-finite gradients before the step and stops or skips the task's step
    (:mod:`nad_ext.training.nonfinite`), so the op never writes them into the gates. A task listed
    twice is updated once. Equals :func:`nad_ext.training.objective.normalized_gradient_step` with
    ``grads[l] = logits[l].grad``, in one launch for all gate points on CUDA.

    Args:
        logits: per gate point, the (T, C_l) gate logits, float32 (or float64), one T for all.
        grads: per gate point, the gradient shaped like ``logits[l]``, or None to skip that point.
        tasks: (K,) int64 in [0, T), the tasks to update.
        lr: step length.
    """
    logits, grads = list(logits), list(grads)
    if len(grads) != len(logits):
        raise ValueError(f"grads must have one entry per gate point ({len(logits)}); got {len(grads)}")
    checks.tensor("tasks", tasks, dims=1, dtypes=(torch.int64,))
    layers = [l for l, g in enumerate(grads) if g is not None]
    if not layers:
        return
    first = checks.tensor(f"logits[{layers[0]}]", logits[layers[0]], dims=2, dtypes=(torch.float32, torch.float64))
    num_tasks, dtype = first.shape[0], first.dtype
    for l in layers:
        m, g = logits[l], grads[l]
        checks.tensor(f"logits[{l}]", m, dims=2, dtypes=(dtype,))
        if m.shape[0] != num_tasks:
            raise ValueError(f"logits[{l}] must have shape ({num_tasks}, C) like logits[{layers[0]}]; got {tuple(m.shape)}")
        checks.tensor(f"grads[{l}]", g, dtypes=(dtype,))
        if g.shape != m.shape:
            raise ValueError(f"grads[{l}] must have logits[{l}]'s shape {tuple(m.shape)}; got {tuple(g.shape)}")
        checks.same_device(**{f"logits[{l}]": m, f"grads[{l}]": g, "tasks": tasks})
    checks.ids_in_range("tasks", tasks, num_tasks, "one row of logits per task")
    with torch.no_grad():
        torch.ops.nad.normalized_gradient_step_([logits[l] for l in layers], [grads[l] for l in layers], tasks, float(lr))


@torch.no_grad()
def normalized_gradient_step_reference(logits, grads, tasks, lr) -> None:
    """Pure-PyTorch definition of :func:`normalized_gradient_step_` (one layer at a time): the
    authors' ``m - lr * F.normalize(g)`` (the norm summed in float64, as the kernels do), except
    that a row with a non-finite norm is left unchanged."""
    for m, g in zip(logits, grads):
        if g is None:
            continue
        g = g[tasks]
        norm = g.double().norm(dim=1, keepdim=True).to(g.dtype)
        step = g / norm.clamp(min=STEP_EPS)
        m[tasks] -= lr * torch.where(torch.isfinite(norm), step, torch.zeros_like(g))


@torch.library.register_fake("nad::normalized_gradient_step_")
def _(logits, grads, tasks, lr):
    return None
