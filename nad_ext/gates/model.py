"""The gated model: a frozen network with task-conditional gates at its gate points.

A :class:`GatedModel` wraps a frozen network and puts a gate on the output of each *gate
point* (a named sub-module) through a forward hook. Every task t owns gate logits m_t^l of
shape (C_l,) at gate point l; one forward pass can carry samples of many tasks, each routed
through its own task's gates by ``nad::task_gate`` (:func:`gate_tensor`).

Channels need not be on axis 1: each :class:`~nad_ext.gates.points.GatePoint` records its
channel axis, found when the network is probed (2 for (N, L, C) tokens, 3 for NHWC maps) or
given. Attention modules can be gated per head (``"name:heads"``, :mod:`nad_ext.gates.attention`).
"""
from __future__ import annotations

import copy
from typing import Mapping, Sequence

import torch
from torch import nn

from nad_ext.gates import attention
from nad_ext.gates.points import (ACTIVATIONS, GatePoint, find_gate_points, parse_gate_point, requested_axis,
                                  resolve_modules)
from nad_ext.ops import checks, task_gate


def gate_tensor(x: torch.Tensor, logits: torch.Tensor, task_ids: torch.Tensor, channel_axis: int,
                per_head: bool = False) -> torch.Tensor:
    """``nad::task_gate`` along ``channel_axis``: the op sees the (N, C, ...) view of ``x``,
    which it reads in place when it is contiguous or channels innermost ((N, L, C) tokens, NHWC
    maps), and the result is moved back.

    ``per_head``: ``x`` is (N, *positions, heads, head_dim) and ``channel_axis`` its head axis.
    Where that view would be copied but head_dim is innermost (Swin's head outputs), the op gates
    the heads * head_dim units channels-innermost instead, each head's logit repeated over its
    head_dim (the same gates and, summed by autograd, the same logits gradient).
    """
    if channel_axis == 1:
        return task_gate(x, logits, task_ids)
    view = x.movedim(channel_axis, 1)
    if (per_head and channel_axis == x.dim() - 2 and not view.is_contiguous()
            and x.stride(-1) == 1 and x.stride(-2) == x.shape[-1]):
        units = gate_tensor(x.flatten(-2), logits.repeat_interleave(x.shape[-1], dim=1), task_ids, x.dim() - 2)
        return units.unflatten(-1, x.shape[-2:])
    return task_gate(view, logits, task_ids).movedim(1, channel_axis)


def binary_logits(logits: torch.Tensor) -> torch.Tensor:
    """+inf where ``logits`` > 0, else -inf (detached): sigmoid of them is the exact 0/1 gates."""
    return torch.where(logits.detach() > 0, float("inf"), float("-inf"))


def straight_through_gate(x: torch.Tensor, logits: torch.Tensor, task_ids: torch.Tensor, channel_axis: int,
                          per_head: bool = False) -> torch.Tensor:
    """:func:`gate_tensor` with the binary gates (1 where ``logits`` > 0, else 0) in the forward
    pass and the soft gates' logits gradient (the straight-through estimator): the value is
    ``x * binary``, its gradient with respect to ``x`` that of ``x * binary``, and with respect to
    ``logits`` that of ``x * sigmoid(logits)``. Three ``nad::task_gate`` passes instead of one."""
    hard = gate_tensor(x, binary_logits(logits), task_ids, channel_axis, per_head)
    soft = gate_tensor(x.detach(), logits, task_ids, channel_axis, per_head)
    return hard + (soft - soft.detach())


def init_logits(tasks: int | Sequence[int], channels: Sequence[int], seed: int, std: float) -> list[torch.Tensor]:
    """m ~ N(0, std^2), drawn per task from its own generator, so that a task's initial gates
    do not depend on how many other tasks there are or how they are batched. ``tasks``: the
    number of tasks (rows keyed 0, 1, ...), or each row's key (per-image paths key a row by its
    image's index, :mod:`nad_ext.training.paths`)."""
    keys = range(tasks) if isinstance(tasks, int) else [int(k) for k in tasks]
    per_layer = [torch.empty(len(keys), c) for c in channels]
    for t, key in enumerate(keys):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + key)
        for layer, c in zip(per_layer, channels):
            layer[t] = torch.randn(c, generator=gen) * std
    return per_layer


class GatedModel(nn.Module):
    """A frozen network with task-conditional channel gates at its gate points.

    Args:
        model: any module mapping images to class logits. It is put in eval mode, its
            parameters are frozen (``requires_grad=False``) and left untouched; in-place
            activations are made out-of-place so recorded activations stay valid.
        gate_points: in forward order; module names (``"layer1.0"``), with an optional
            suffix (``"blocks.3:2"``: channels on axis 2; ``"blocks.3.attn:heads"``: a gate per
            attention head; then ``":relu"``: record relu of the gated output for the
            objective, :attr:`GatePoint.record`), or :class:`GatePoint` objects (e.g. a mask
            bank's).
        num_tasks: number of tasks T; gate point l gets logits of shape (T, C_l).
        example_input: one input batch, used once to find each gate point's channel count and
            channel axis (see :func:`~nad_ext.gates.probe.infer_channel_axis`; when in doubt a
            second forward at 1.5x the image side tells spatial axes from channels).
        channel_axis: overrides the axis found by probing: one int for all channel gate
            points, or ``{name: axis}`` for some. A spec's own suffix wins.
        seed, init_std: the initialisation m ~ N(0, init_std^2) (per-task generators).
        model_id: identifies the network in mask banks (e.g. "vgg16").
        fuse: run a rewritten copy of the network (``model`` itself is left as it is):
            BatchNorm folded into convolutions, and gate points at the end of a Conv2d+ReLU
            chain computed by ``nad::masked_conv2d`` (see :mod:`nad_ext.gates.fused`). Same
            function, fewer passes over the activations.
        fold: only the first half of ``fuse``: BatchNorm folded into convolutions (on a copy),
            the gates applied by hooks as without it (the CPU's fast path, with channels_last).
        dtype, channels_last: run the network in this dtype and memory format (e.g. bfloat16
            and channels_last on a GPU) on a copy (``model`` itself is left as it is); inputs
            are converted, gate logits stay float32.
        straight_through: masked passes gate with the binary gates (the sub-architecture that
            is kept, 0/1 where sigmoid(m) is below / above 0.5); where gradients are tracked the
            logits get the soft gate's gradient, d sigmoid(m) / dm (the straight-through
            estimator): what is trained is what is kept. Not the paper's (its gates are soft);
            see :class:`~nad_ext.training.config.NADConfig` ``gate``. Such gate points are not
            fused into convolutions.

    Soft gates are sigmoid(m / temperature); :meth:`set_temperature` changes it (1, the
    paper's, by default; an annealed schedule lowers it towards binary gates). Binary gates and
    the binary sub-architecture (m > 0) do not depend on it.
    """

    def __init__(
        self,
        model: nn.Module,
        gate_points: Sequence[str | GatePoint],
        num_tasks: int,
        example_input: torch.Tensor,
        *,
        channel_axis: int | Mapping[str, int] | None = None,
        seed: int = 0,
        init_std: float = 1.0,
        model_id: str = "model",
        fuse: bool = False,
        fold: bool = False,
        dtype: torch.dtype | None = None,
        channels_last: bool = False,
        straight_through: bool = False,
    ):
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be at least 1, got {num_tasks}")
        if not gate_points:
            raise ValueError("gate_points is empty: name at least one module to gate")
        specs = [parse_gate_point(p) for p in gate_points]
        names = [name for name, _, _, _ in specs]
        specs = [(name, requested_axis(name, axis, units, channel_axis), units, record)
                 for name, axis, units, record in specs]
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for m in model.modules():
            if hasattr(m, "inplace") and isinstance(m, ACTIVATIONS + (nn.Hardtanh, nn.Dropout)):
                m.inplace = False
        for (name, _, units, _), module in zip(specs, resolve_modules(model, names)):
            if units == "heads" and not attention.is_attention(module):
                raise ValueError(f"gate point {name!r}: units 'heads' needs an attention module "
                                 f"({attention.SUPPORTED}); {name!r} is a {type(module).__name__}")
        if fuse or fold or dtype is not None or channels_last:
            # A private copy: folding and conversion must not change the caller's network (which
            # may be gated again, e.g. clean and attacked paths, or run as it was).
            model = copy.deepcopy(model)
        self.model = model
        self.model_id = model_id
        self.gate_points, self.example_shapes = find_gate_points(model, example_input, specs, gate_points)
        if fuse or fold:  # after the gate points are checked: folding compares their outputs
            from nad_ext.gates.fused import fold_batchnorm

            fold_batchnorm(model, example_input, watch=[n for n, _, units, _ in specs if units == "channels"])
        self.num_tasks = num_tasks
        init = init_logits(num_tasks, [p.channels for p in self.gate_points], seed, init_std)
        device = next((p.device for p in model.parameters()), example_input.device)
        self.logits = nn.ParameterList(nn.Parameter(m.to(device)) for m in init)
        self._task_ids: torch.Tensor | None = None
        self._binary = False
        self.straight_through = straight_through
        # A device tensor, updated in place: a step captured in a CUDA graph reads the new value.
        self.register_buffer("temperature", torch.ones((), device=device), persistent=False)
        self._tempered = False
        self._record: list | None = None
        self.fused_points: list[int] = []  # gate points gated inside a convolution
        if fuse and not straight_through:  # masked_conv2d applies soft or binary gates only
            from nad_ext.gates.fused import fuse_gated_convolutions

            # Only conv chains with channels on axis 1 fuse; token / NHWC / head points stay hooks.
            eligible = [i for i, p in enumerate(self.gate_points) if p.units == "channels" and p.channel_axis == 1]
            self.fused_points = fuse_gated_convolutions(model, names, self._gate_source, only=eligible)
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.preserve_format
        if dtype is not None or channels_last:
            model.to(dtype=dtype, memory_format=self.memory_format)
        self._handles = []
        for i, (point, module) in enumerate(zip(self.gate_points, resolve_modules(model, names))):
            if point.units == "heads":
                self._handles.append(attention.install_head_gate(module, self._gate_function(i)))
            else:
                self._handles.append(module.register_forward_hook(self._hook(i)))

    def _gate_logits(self, index: int) -> torch.Tensor:
        logits = self.logits[index]
        if self._binary:
            return binary_logits(logits)
        return logits / self.temperature if self._tempered else logits

    def set_temperature(self, temperature: float) -> None:
        """Soft gates sigmoid(m / ``temperature``) from now on (a positive number; 1: the paper's)."""
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        self.temperature.fill_(float(temperature))
        # From now on every masked pass divides by the buffer (by 1 too): a step captured in a
        # CUDA graph at temperature 1 must still read the later temperatures.
        self._tempered = True

    def scaled_logits(self) -> list[torch.Tensor]:
        """Per gate point, m / temperature: the soft gates are sigmoid of these (the sparsity
        term of the objective reads them)."""
        return [m / self.temperature for m in self.logits] if self._tempered else list(self.logits)

    def _gate_source(self, index: int):
        """For a fused convolution: its gate's (logits, task_ids) in masked passes, else None."""
        return lambda: None if self._task_ids is None else (self._gate_logits(index), self._task_ids)

    def _gate_function(self, index: int):
        """Gate point ``index``'s gate (in masked passes) and recording, as a function of its
        output. The recording is the gated output, or relu of it (``GatePoint.record``, a new
        tensor: the network's forward goes on with the gated output)."""
        gated_inside = index in self.fused_points
        point = self.gate_points[index]
        axis, per_head, relu = point.channel_axis, point.units == "heads", point.record == "relu"

        def gate(output: torch.Tensor) -> torch.Tensor:
            if self._task_ids is not None and not gated_inside:
                logits = self._gate_logits(index)
                if self.straight_through and not self._binary and torch.is_grad_enabled():
                    output = straight_through_gate(output, logits, self._task_ids, axis, per_head)
                elif self.straight_through and not self._binary:  # the same value, no gradient wanted
                    output = gate_tensor(output, binary_logits(logits), self._task_ids, axis, per_head)
                else:
                    output = gate_tensor(output, logits, self._task_ids, axis, per_head)
            if self._record is not None:
                self._record[index] = torch.relu(output) if relu else output
            return output

        return gate

    def _hook(self, index: int):
        gate = self._gate_function(index)
        return lambda module, inputs, output: gate(output)

    def _run(self, x, task_ids, binary, record):
        if self.dtype is not None or self.memory_format is torch.channels_last:
            x = x.to(dtype=self.dtype, memory_format=self.memory_format)
        self._task_ids, self._binary = task_ids, binary
        self._record = [None] * len(self.gate_points) if record else None
        try:
            # task_ids were checked once here; the gates need not check them again (each check
            # is a device sync).
            with checks.ids_checked():
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
            record: also return the gated outputs at the gate points (relu of them at gate
                points whose ``record`` is "relu").

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
        checks.ids_in_range("task_ids", task_ids, self.num_tasks, "one task per sample")

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

