"""Task-conditional channel gates on any ``torch.nn.Module``, without editing its source.

A :class:`GatedModel` wraps a frozen network and puts a gate on the output of each *gate
point* (a named sub-module) through a forward hook. Every task t owns gate logits m_t^l of
shape (C_l,) at gate point l; one forward pass can carry samples of many tasks, each routed
through its own task's gates by ``nad::task_gate``.
"""
from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from nad_ext.ops import _checks, task_gate


@dataclass(frozen=True)
class GatePoint:
    """A gated module output: its module name and channel count."""

    name: str
    channels: int


_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _is_container(module: nn.Module) -> bool:
    """A container only chains its children (its forward is the base class's, or it has none)."""
    return isinstance(module, _CONTAINERS) and not any(
        "forward" in vars(cls) for cls in type(module).__mro__ if cls not in _CONTAINERS + (nn.Module, object)
    )


def _named_modules(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def resolve_modules(model: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    """Looks up gate-point modules by name; an unknown name gets the closest real ones."""
    modules = _named_modules(model)
    found = []
    for name in names:
        if name not in modules or name == "":
            close = difflib.get_close_matches(name, [n for n in modules if n], n=5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"gate point {name!r} is not a module of {type(model).__name__}{hint}")
        found.append(modules[name])
    if len(set(names)) != len(names):
        raise ValueError(f"gate points must be distinct; got duplicates in {list(names)}")
    return found


def _probe(model: nn.Module, example_input: torch.Tensor, names: Sequence[str]):
    """Runs one forward; returns {name: [output, number of calls]} in the order of first call."""
    modules = _named_modules(model)
    seen: dict[str, list] = {}
    handles = []
    for name in names:
        def hook(module, inputs, output, name=name):
            seen.setdefault(name, [output, 0])[1] += 1

        handles.append(modules[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def propose_gate_points(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """The "auto" gate points of an unknown CNN, in forward order.

    Every *block* output (a module with its own forward that contains a convolution, like a
    ResNet bottleneck or a dense block) and, outside blocks, every activation output, where the
    output is a feature map (N, C, H, W) and the module runs once per forward.
    """
    modules = _named_modules(model)
    blocks = {
        name
        for name, m in modules.items()
        if name
        and not _is_container(m)
        and not isinstance(m, nn.Conv2d)
        and any(isinstance(c, nn.Conv2d) for c in m.modules())
    }
    outermost_blocks = {n for n in blocks if not any(n.startswith(b + ".") for b in blocks)}
    inside_block = lambda n: any(n.startswith(b + ".") for b in outermost_blocks)  # noqa: E731
    candidates = [
        n
        for n, m in modules.items()
        if n in outermost_blocks or (isinstance(m, _ACTIVATIONS) and not inside_block(n))
    ]
    seen = _probe(model, example_input, candidates)
    return [
        name
        for name, (out, count) in seen.items()
        if count == 1 and isinstance(out, torch.Tensor) and out.dim() == 4
    ]


def _init_logits(num_tasks: int, channels: Sequence[int], seed: int, std: float) -> list[torch.Tensor]:
    """m ~ N(0, std^2), drawn per task from its own generator, so that a task's initial gates
    do not depend on how many other tasks there are or how they are batched."""
    per_layer = [torch.empty(num_tasks, c) for c in channels]
    for t in range(num_tasks):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + t)
        for layer, c in zip(per_layer, channels):
            layer[t] = torch.randn(c, generator=gen) * std
    return per_layer


class GatedModel(nn.Module):
    """A frozen network with task-conditional channel gates at its gate points.

    Args:
        model: any module mapping images to class logits. It is put in eval mode, its
            parameters are frozen (``requires_grad=False``) and left untouched; in-place
            activations are made out-of-place so recorded activations stay valid.
        gate_points: module names, in forward order.
        num_tasks: number of tasks T; gate point l gets logits of shape (T, C_l).
        example_input: one input batch, used once to find each gate point's channel count.
        seed, init_std: the initialisation m ~ N(0, init_std^2) (per-task generators).
        model_id: identifies the network in mask banks (e.g. "vgg16").
        fuse: run a rewritten copy of the network (``model`` itself is left as it is):
            BatchNorm folded into convolutions, and gate points at the end of a Conv2d+ReLU
            chain computed by ``nad::masked_conv2d`` (see :mod:`nad_ext.fused`). Same function,
            fewer passes over the activations.
        dtype, channels_last: run the network in this dtype and memory format (e.g. bfloat16
            and channels_last on a GPU); inputs are converted, gate logits stay float32.
    """

    def __init__(
        self,
        model: nn.Module,
        gate_points: Sequence[str],
        num_tasks: int,
        example_input: torch.Tensor,
        *,
        seed: int = 0,
        init_std: float = 1.0,
        model_id: str = "model",
        fuse: bool = False,
        dtype: torch.dtype | None = None,
        channels_last: bool = False,
    ):
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be at least 1, got {num_tasks}")
        if not gate_points:
            raise ValueError("gate_points is empty: name at least one module to gate")
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for m in model.modules():
            if hasattr(m, "inplace") and isinstance(m, _ACTIVATIONS + (nn.Hardtanh, nn.Dropout)):
                m.inplace = False
        resolve_modules(model, gate_points)
        if fuse:
            from nad_ext.fused import fold_batchnorm

            model = copy.deepcopy(model)
            fold_batchnorm(model, example_input, watch=list(gate_points))
        self.model = model
        self.model_id = model_id
        seen = _probe(model, example_input, list(gate_points))
        points = []
        for name in gate_points:
            out, count = seen.get(name, (None, 0))
            if count != 1:
                raise ValueError(
                    f"gate point {name!r} runs {count} times per forward; a gate point must run "
                    "exactly once (shared modules, such as a reused ReLU, cannot be gated by name)"
                )
            if not isinstance(out, torch.Tensor) or out.dim() < 2:
                raise ValueError(
                    f"gate point {name!r} must output a tensor (N, C, ...); got "
                    f"{type(out).__name__}{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}"
                )
            points.append(GatePoint(name, int(out.shape[1])))
        self.gate_points: list[GatePoint] = points
        self.num_tasks = num_tasks
        init = _init_logits(num_tasks, [p.channels for p in points], seed, init_std)
        device = next((p.device for p in model.parameters()), example_input.device)
        self.logits = nn.ParameterList(nn.Parameter(m.to(device)) for m in init)
        self._task_ids: torch.Tensor | None = None
        self._binary = False
        self._record: list | None = None
        self.fused_points: list[int] = []  # gate points gated inside a convolution
        if fuse:
            from nad_ext.fused import fuse_gated_convolutions

            self.fused_points = fuse_gated_convolutions(model, list(gate_points), self._gate_source)
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.preserve_format
        if dtype is not None or channels_last:
            model.to(dtype=dtype, memory_format=self.memory_format)
        modules = resolve_modules(model, gate_points)
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _gate_logits(self, index: int) -> torch.Tensor:
        logits = self.logits[index]
        if self._binary:  # sigmoid(+inf) = 1, sigmoid(-inf) = 0: exact 0/1 gates
            logits = torch.where(logits.detach() > 0, float("inf"), float("-inf"))
        return logits

    def _gate_source(self, index: int):
        """For a fused convolution: its gate's (logits, task_ids) in masked passes, else None."""
        return lambda: None if self._task_ids is None else (self._gate_logits(index), self._task_ids)

    def _hook(self, index: int):
        gated_inside = index in self.fused_points

        def hook(module, inputs, output):
            if self._task_ids is not None and not gated_inside:
                output = task_gate(output, self._gate_logits(index), self._task_ids)
            if self._record is not None:
                self._record[index] = output
            return output

        return hook

    def _run(self, x, task_ids, binary, record):
        if self.dtype is not None or self.memory_format is torch.channels_last:
            x = x.to(dtype=self.dtype, memory_format=self.memory_format)
        self._task_ids, self._binary = task_ids, binary
        self._record = [None] * len(self.gate_points) if record else None
        try:
            # task_ids were checked once here; the gates need not check them again (each check
            # is a device sync).
            with _checks.ids_checked():
                out = self.model(x)
            return out, self._record
        finally:
            self._task_ids, self._record = None, None

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor, *, binary: bool = False, record: bool = False):
        """The masked network: each sample through its task's gates.

        Args:
            x: input batch (N, ...).
            task_ids: (N,) int64, the task of each sample.
            binary: use 0/1 gates (sigmoid(m) > 0.5) instead of the soft ones.
            record: also return the gated outputs at the gate points.

        Returns:
            ``(logits, activations)``; ``activations`` is a list with one tensor per gate point
            when ``record`` is true, else None.
        """
        if not isinstance(task_ids, torch.Tensor) or task_ids.dim() != 1 or task_ids.shape[0] != x.shape[0]:
            raise ValueError(f"task_ids must be a tensor of shape ({x.shape[0]},), one task per sample")
        self.check_task_ids(task_ids)
        return self._run(x, task_ids.to(x.device, torch.int64, non_blocking=True), binary, record)

    def check_task_ids(self, task_ids: torch.Tensor) -> None:
        """ValueError unless every id lies in [0, num_tasks). Pass CPU ids where possible: on a
        CUDA tensor the check waits for the device."""
        _checks.ids_in_range("task_ids", task_ids, self.num_tasks, "one task per sample")

    def original(self, x: torch.Tensor, *, record: bool = True):
        """The original network (no gates); returns ``(logits, activations at gate points)``."""
        return self._run(x, None, False, record)

    @property
    def layer_sizes(self) -> list[int]:
        return [p.channels for p in self.gate_points]

    def set_logits(self, logits: Sequence[torch.Tensor]) -> None:
        """Copies gate logits in (one (T, C_l) tensor per gate point)."""
        with torch.no_grad():
            for dst, src in zip(self.logits, logits, strict=True):
                dst.copy_(src)

    def remove_gates(self) -> nn.Module:
        """Detaches the hooks and returns the wrapped network."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return self.model
