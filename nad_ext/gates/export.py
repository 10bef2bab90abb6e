"""Gated models for C++: ``torch.export`` programs compiled by AOTInductor into ``.pt2`` packages,
which LibTorch programs run with ``torch::inductor::AOTIModelPackageLoader``.

    export_gated(gated, example_input, "gated.pt2")            # forward(x, task_ids) -> class logits
    export_task(gated, 2, example_input, "task2.pt2")          # forward(x): task 2's binary sub-architecture
    program = export_program(gated, example_input)             # the ExportedProgram, not compiled

The gates stay ``nad::task_gate`` calls in the exported graph (the operator's fake makes it
traceable); AOTInductor compiles the rest of the network into the package and calls the gates
through the dispatcher, so the C++ program links the LibTorch library ``nad`` (CMake:
``find_package(nad)``, ``nad::nad``; see examples/cpp/run_pt2.cpp and docs/CPP.md). The batch size
stays dynamic. A package is compiled for the device of ``example_input`` (the CPU, or CUDA: then
on a machine with a GPU) and runs on LibTorch of this PyTorch's release; a CPU package needs a C++
compiler when it is exported (tens of seconds for a small network).

There is no TorchScript export any more: ``torch.jit.trace`` is deprecated, and nothing in nad-ext
needs it (its C++ test, example and README use the package). A LibTorch older than 2.6, which has
no ``AOTIModelPackageLoader``, can still run ``torch.jit.trace`` of the modules
:func:`export_program` wraps, at its own risk.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from nad_ext.gates.model import GatedModel

#: The largest batch an exported program accepts (its batch dimension is symbolic up to here).
MAX_BATCH = 1 << 20


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
        task_ids = x.new_full((x.shape[0],), self.task, dtype=torch.int64)
        return self.gated(x, task_ids, binary=True)[0]


def export_program(gated: GatedModel, example_input: torch.Tensor, *, task: int | None = None,
                   binary: bool = False) -> torch.export.ExportedProgram:
    """The gated model as a ``torch.export`` program with a dynamic batch size.

    Args:
        gated: the gated model (its current gate logits become constants of the program).
        example_input: an input batch (N, ...) on the device to export for (N = 1 will do); any
            batch size from 1 to :data:`MAX_BATCH` works later (the other dims are fixed).
        task: None: ``forward(x, task_ids)``, every sample through its task's gates; a task id:
            ``forward(x)``, that task's binary sub-architecture (sigmoid(m) > 0.5).
        binary: with ``task=None``, the 0/1 sub-architectures instead of the soft gates.
    """
    if task is not None and not 0 <= task < gated.num_tasks:
        raise ValueError(f"task must lie in [0, {gated.num_tasks}), got {task}")
    if example_input.shape[0] < 2:  # torch.export specialises a size-1 dimension: trace with two
        example_input = example_input.expand(2, *example_input.shape[1:]).contiguous()
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    x_dims = {0: batch}
    if task is None:
        module = _AllTasks(gated, binary).eval()
        task_ids = torch.zeros(example_input.shape[0], dtype=torch.int64, device=example_input.device)
        args, dynamic = (example_input, task_ids), {"x": x_dims, "task_ids": {0: batch}}
    else:
        module = _OneTask(gated, task).eval()
        args, dynamic = (example_input,), {"x": x_dims}
    with torch.no_grad():
        return torch.export.export(module, args, dynamic_shapes=dynamic)


def package(program: torch.export.ExportedProgram, path: str | Path, *, inductor_configs: dict | None = None) -> str:
    """Compiles ``program`` with AOTInductor into the package ``path`` (a ``.pt2`` file, for the
    device the program was exported on); returns its path. Python runs it with
    ``torch._inductor.aoti_load_package``, C++ with ``torch::inductor::AOTIModelPackageLoader``."""
    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(f"an AOTInductor package must be named *.pt2, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return torch._inductor.aoti_compile_and_package(program, package_path=str(path),
                                                    inductor_configs=inductor_configs)


def export_gated(gated: GatedModel, example_input: torch.Tensor, path: str | Path, *, binary: bool = False,
                 inductor_configs: dict | None = None) -> str:
    """The gated model with a task id input, ``forward(x, task_ids) -> class logits``, as a
    ``.pt2`` package at ``path`` (see :func:`export_program` and :func:`package`)."""
    return package(export_program(gated, example_input, binary=binary), path, inductor_configs=inductor_configs)


def export_task(gated: GatedModel, task: int, example_input: torch.Tensor, path: str | Path, *,
                inductor_configs: dict | None = None) -> str:
    """One task's binary sub-architecture, ``forward(x) -> class logits``, as a ``.pt2`` package."""
    return package(export_program(gated, example_input, task=task), path, inductor_configs=inductor_configs)
