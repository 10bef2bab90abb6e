"""The NAD step captured in a CUDA graph: one replay instead of hundreds of kernel launches.

``train_step`` never reads a value back from the device, so the whole step (both forwards, the
backward to the gates and the update) can be captured once per batch shape and replayed. Steps
of other shapes (the short last batch of a task) run eagerly. Replays compute exactly what the
eager step computes; the test on the GPU machine checks it (python_tests/test_fused.py).
"""
from __future__ import annotations

import warnings

import torch

from nad_ext.gates.model import GatedModel


class GraphedSteps:
    """Replays ``train_step`` from CUDA graphs, one per batch shape seen (captured on first use).

    Args:
        gated: the gated model, on a CUDA device.
        step: ``step(gated, x, labels, task_ids, tasks)``, the eager step.
        max_graphs: shapes captured at most; further shapes run eagerly. Each graph keeps its
            own activation memory.
    """

    def __init__(self, gated: GatedModel, step, max_graphs: int = 2):
        self.gated, self.step, self.max_graphs = gated, step, max_graphs
        self.graphs: dict[tuple, tuple] = {}
        self.failed = False

    def __call__(self, x: torch.Tensor, labels: torch.Tensor, task_ids: torch.Tensor, tasks: torch.Tensor):
        key = (tuple(x.shape), x.dtype, tasks.numel())
        if key not in self.graphs and (self.failed or len(self.graphs) >= self.max_graphs):
            return self.step(self.gated, x, labels, task_ids, tasks)
        # Eager steps validate the ids; inside the graph nothing can be read back.
        self.gated.check_task_ids(task_ids)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(x, labels, task_ids, tasks)
            except RuntimeError as err:  # a capture problem must not end a long run
                self.failed = True
                warnings.warn(f"CUDA graph capture failed, the step runs eagerly from now on: {err}")
                return self.step(self.gated, x, labels, task_ids, tasks)
        graph, inputs, terms = self.graphs[key]
        for static, value in zip(inputs, (x, labels, task_ids, tasks)):
            static.copy_(value, non_blocking=True)
        graph.replay()
        return terms

    def _capture(self, x, labels, task_ids, tasks):
        device = x.device
        inputs = tuple(t.to(device, copy=True) for t in (x, labels, task_ids, tasks))
        saved = [m.detach().clone() for m in self.gated.logits]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up (cuDNN plans, allocator) outside the capture
            for _ in range(3):
                self.step(self.gated, *inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the data-loading threads keep running (CPU work only) during capture.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            terms = self.step(self.gated, *inputs)
        with torch.no_grad():  # the warm-up steps updated the gates: undo them
            for m, s in zip(self.gated.logits, saved):
                m.copy_(s)
        return graph, inputs, terms
