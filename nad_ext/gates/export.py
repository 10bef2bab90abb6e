"""Gated models for C++: TorchScript exports that LibTorch programs run with torch::jit::load.

The gates stay ``nad::task_gate`` calls in the traced graph, so the C++ program must link the
LibTorch library ``nad`` (CMake: ``find_package(nad)``, ``nad::nad``; see examples/cpp).

    export_gated(gated, example_input, "gated.pt")            # forward(x, task_ids)
    export_task(gated, task=2, example_input, "task2.pt")     # forward(x): one sub-architecture
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from nad_ext.gates.model import GatedModel


class _AllTasks(nn.Module):
    def __init__(self, gated: GatedModel, binary: bool):
        super().__init__()
        self.gated, self.binary = gated, binary

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        return self.gated(x, task_ids, binary=self.binary)[0]


class _OneTask(nn.Module):
    def __init__(self, gated: GatedModel, task: int):
        super().__init__()
        self.gated, self.task = gated, task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # new_full with x.shape[0] is traced as a size read: the batch size stays dynamic.
        task_ids = x.new_full((x.shape[0],), self.task, dtype=torch.int64)
        return self.gated(x, task_ids, binary=True)[0]


def _trace(module: nn.Module, inputs: tuple, path: str | Path | None) -> torch.jit.ScriptModule:
    with torch.no_grad(), warnings.catch_warnings():
        # The Python-side argument checks read tensor values (task id range); they run once at
        # trace time and are not part of the graph, which the tracer warns about.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # torch.jit.trace is deprecated in favour of torch.export, but TorchScript is what
        # LibTorch's torch::jit::load runs.
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(module.eval(), inputs, check_trace=False)
    if path is not None:
        traced.save(str(path))
    return traced


def export_gated(
    gated: GatedModel, example_input: torch.Tensor, path: str | Path | None = None, *, binary: bool = False
) -> torch.jit.ScriptModule:
    """The gated model with a task id input: ``forward(x, task_ids) -> class logits``.

    Args:
        gated: the gated model (its current gate logits are exported).
        example_input: an input batch (N, ...) used for tracing; any batch size works later.
        path: where to save the TorchScript file (``torch.jit.load`` / ``torch::jit::load``).
        binary: export the 0/1 sub-architectures (logits > 0) instead of the soft gates.
    """
    task_ids = torch.zeros(example_input.shape[0], dtype=torch.int64, device=example_input.device)
    return _trace(_AllTasks(gated, binary), (example_input, task_ids), path)


def export_task(
    gated: GatedModel, task: int, example_input: torch.Tensor, path: str | Path | None = None
) -> torch.jit.ScriptModule:
    """One task's binary sub-architecture: ``forward(x) -> class logits``."""
    if not 0 <= task < gated.num_tasks:
        raise ValueError(f"task must lie in [0, {gated.num_tasks}), got {task}")
    return _trace(_OneTask(gated, task), (example_input,), path)
