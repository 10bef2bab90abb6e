"""Non-finite gate gradients: found in every step, on the device, and never written into the gates.

When a gate gradient holds a NaN or an Inf (a broken weight file, an overflow in the network,
a bad image), the authors' update ``m - lr * F.normalize(g)`` spreads it into the gates, and the
normalised step alone (``nad::normalized_gradient_step_``) would leave those rows unchanged
without a word. Neither is what a run needs. Here:

- :func:`guard_step` (in every step, inside :func:`~nad_ext.training.loop.train_step`): flags
  the (task, gate point) rows of the step's tasks whose gradient is not finite and zeroes every
  gradient of a flagged task, so that the task's whole step is skipped (the update leaves zero
  rows alone). Device operations only: no sync, CUDA-graph safe.
- :class:`NonFiniteTally` (per epoch, in :func:`~nad_ext.training.loop.train_epoch`): adds the
  flags up on the device and reads them where the loss sums are read anyway (the progress bar,
  about once a second, and the end of the epoch, before the epoch is committed). Under
  ``on_nonfinite="stop"`` (the default) the first read that finds one raises
  :class:`NonFiniteGradientError` naming the task, the gate points and the epoch, so the run
  folder keeps its last committed epoch; under ``"skip"`` the run goes on and the epoch's log
  entry counts the skipped steps per task (``nonfinite_steps``).
"""
from __future__ import annotations

from typing import Sequence

import torch

POLICIES = ("stop", "skip")


class NonFiniteGradientError(ValueError):
    """A gate gradient was NaN or Inf (``on_nonfinite="stop"``); the epoch was not committed."""


def guard_step(grads: Sequence[torch.Tensor], tasks: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``(grads, flags)``: ``flags`` (T, L) bool marks the rows of the tasks in ``tasks`` whose
    gradient at gate point l holds a NaN or an Inf; ``grads`` are the gradients with every row of
    a flagged task zeroed (the normalised step leaves zero rows unchanged: that task's step is
    skipped at every gate point, not only where the gradient broke)."""
    num_tasks = grads[0].shape[0]
    present = torch.zeros(num_tasks, dtype=torch.bool, device=grads[0].device).index_fill_(0, tasks, True)
    flags = torch.stack([~torch.isfinite(g).all(dim=1) for g in grads], dim=1) & present[:, None]
    bad = flags.any(dim=1, keepdim=True)
    return [g.masked_fill(bad, 0.0) for g in grads], flags


class NonFiniteTally:
    """An epoch's steps with non-finite gate gradients, counted on the device per task and gate
    point; :meth:`check` reads them back (one sync) and, under ``policy="stop"``, raises.

    Args:
        policy: "stop" or "skip" (``NADConfig.on_nonfinite``).
        tasks, points: the task and gate-point names, for the error message.
        epoch: the epoch being trained, 0-based (the run folder holds ``epoch`` committed ones).
        device: where the steps run.
    """

    def __init__(self, policy: str, tasks: Sequence[str], points: Sequence[str], epoch: int, device):
        if policy not in POLICIES:
            raise ValueError(f"on_nonfinite must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy, self.tasks, self.points, self.epoch = policy, list(tasks), list(points), epoch
        self.rows = torch.zeros(len(self.tasks), len(self.points), dtype=torch.int32, device=device)
        self.steps = torch.zeros(len(self.tasks), dtype=torch.int32, device=device)

    def add(self, flags: torch.Tensor) -> torch.Tensor:
        """Counts one step's flags ((T, L) bool, :func:`guard_step`); returns the (T,) bool of the
        tasks whose step was skipped. No sync."""
        skipped = flags.any(dim=1)
        self.rows += flags
        self.steps += skipped
        return skipped

    def per_task(self) -> list[int]:
        """Steps skipped per task so far in this epoch (reads the device)."""
        return self.steps.tolist()

    def check(self) -> None:
        """Under "stop": raises :class:`NonFiniteGradientError` if any step so far had a
        non-finite gate gradient. Reads the device once; call it where the loss sums are read."""
        if self.policy != "stop":
            return
        rows = self.rows.cpu()
        hit = rows.amax(dim=1).nonzero().flatten().tolist()  # the tasks with such a step
        if not hit:
            return
        points = [self.points[l] for l in rows[hit[0]].nonzero().flatten().tolist()]
        where = f"gate point{'s' if len(points) > 1 else ''} " + ", ".join(repr(p) for p in points[:4]) \
            + (f" and {len(points) - 4} more" if len(points) > 4 else "")
        others = ", ".join(repr(self.tasks[t]) for t in hit[1:4]) + (", ..." if len(hit) > 4 else "")
        others = f"; {len(hit) - 1} other task(s) too: {others}" if len(hit) > 1 else ""
        committed = self.epoch if self.epoch else "none yet"
        raise NonFiniteGradientError(
            f"non-finite gate gradient (NaN or Inf) in epoch {self.epoch + 1}: task {self.tasks[hit[0]]!r} at "
            f"{where}{others}. Those steps did not change the gates and epoch {self.epoch + 1} was not committed: "
            f"a run folder keeps its last committed epoch ({committed}) and continues from it with --resume "
            f"(resume=True). To skip such steps and count them in log.json instead, pass --on-nonfinite skip "
            f"(NADConfig(on_nonfinite='skip'))")
