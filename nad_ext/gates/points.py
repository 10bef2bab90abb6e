"""Gate points: where the gates go, named, parsed, proposed and probed.

A gate point is a named sub-module whose output gets one gate per channel (or per attention
head). :class:`GatePoint` records its name, gate count, channel axis, units and the tensor it
records for the objective; a spec string (``"name"``, ``"name:axis"``, ``"name:heads"``, each
optionally followed by ``":relu"``) is read by :func:`parse_gate_point`;
:func:`propose_gate_points` proposes them for an unknown network ("auto");
:func:`find_gate_points` probes the network for every gate point's channels and axis.
A model preset's gate points (by name) are the registry's: :func:`nad_ext.training.build_gated_model`
resolves them.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from nad_ext.gates import attention
from nad_ext.gates.probe import infer_channel_axis, probe, resized_input, shapes_at

UNITS = ("channels", "heads")
RECORDS = ("output", "relu")  # what a gate point records: its gated output, or relu of it


@dataclass(frozen=True)
class GatePoint:
    """A gated module output: its module name, how many gates it has and along which axis.

    ``units="channels"``: one gate per channel of the module's output, the channels lying on
    ``channel_axis`` (1 for (N, C, H, W) maps and (N, C) vectors, 2 for (N, L, C) tokens, 3 for
    NHWC maps). ``units="heads"``: one gate per attention head of an attention module, on its
    output before the output projection (see :mod:`nad_ext.gates.attention`); the gated tensor is
    (N, *positions, heads, head_dim) and ``channel_axis`` its head axis.

    ``record`` says which tensor the gate point hands to the objective's MSE term (and to the
    activation maps): ``"output"``, the gated output itself, or ``"relu"``, relu of it. The
    forward pass is the same either way (the gate is not changed); the objective is not, since
    the MSE then ignores the negative values. The paper presets use ``"relu"`` where the authors'
    model compares activations after a ReLU (docs/METHOD.md): DARTS's first gate point, whose
    output their model overwrites with the in-place ReLU that starts the second stem, and
    DenseNet's final features, which they gate after the final ReLU.
    """

    name: str
    channels: int
    channel_axis: int = 1
    units: str = "channels"
    record: str = "output"

    @property
    def spec(self) -> str:
        """The gate point as a string that :func:`parse_gate_point` reads back: ``name``,
        ``name:<axis>`` (channels not on axis 1) or ``name:heads``, then ``:relu`` when it
        records relu of its output."""
        if self.units == "heads":
            spec = f"{self.name}:heads"
        else:
            spec = self.name if self.channel_axis == 1 else f"{self.name}:{self.channel_axis}"
        return spec + (":relu" if self.record == "relu" else "")


def parse_gate_point(spec: str | GatePoint) -> tuple[str, int | None, str, str]:
    """``(module name, channel axis or None to find it, units, record)`` of a gate-point spec.

    A spec is a module name, optionally with a suffix: ``"name:2"`` (channels on axis 2;
    negative axes count from the end), ``"name:heads"`` (a gate per attention head), and after
    either (or alone) ``":relu"``: the gate point records relu of its gated output for the
    objective (:attr:`GatePoint.record`). A :class:`GatePoint` gives its own axis, units and
    record.
    """
    if isinstance(spec, GatePoint):
        if spec.record not in RECORDS:
            raise ValueError(f"gate point {spec.name!r}: record must be one of {', '.join(RECORDS)}; "
                             f"got {spec.record!r}")
        return spec.name, spec.channel_axis, spec.units, spec.record
    if not isinstance(spec, str):
        raise TypeError(f"a gate point is a module name (str) or a GatePoint; got {type(spec).__name__}")
    record = "output"
    rest, sep, suffix = spec.rpartition(":")
    if sep and suffix == "relu":
        spec, record = rest, "relu"
    name, sep, suffix = spec.rpartition(":")
    if not sep:
        return spec, None, "channels", record
    if suffix == "heads":
        return name, None, "heads", record
    try:
        return name, int(suffix), "channels", record
    except ValueError:
        raise ValueError(f"gate point {spec!r}: the part after ':' must be a channel axis (an integer), "
                         f"'heads' or 'relu'; got {suffix!r}") from None


ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish)
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


def propose_gate_points(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """The "auto" gate points of an unknown network, in forward order.

    Every *block* output and, outside blocks, every activation output, where the output is a
    feature map (N, C, H, W) / (N, H, W, C) or tokens (N, L, C) and the module runs once per
    forward. A block is a module with its own forward that contains a convolution or an
    attention module (a ResNet bottleneck, a dense block, a ViT encoder block, a Swin block, a
    ConvNeXt block); a block that holds a sequence of blocks (a ViT's ``Encoder``) is a stage,
    and its blocks are proposed instead.
    """
    modules = _named_modules(model)
    blocks = {
        name
        for name, m in modules.items()
        if name
        and not _is_container(m)
        and not isinstance(m, nn.Conv2d)
        and not attention.is_attention(m)
        and any(isinstance(c, nn.Conv2d) or attention.is_attention(c) for c in m.modules())
    }

    def is_stage(name: str) -> bool:
        return any(_is_container(c) and sum(f"{n}.{k}" in blocks for k in c._modules) >= 2
                   for n, c in modules.items() if n.startswith(name + "."))

    blocks = {n for n in blocks if not is_stage(n)}
    outermost_blocks = {n for n in blocks if not any(n.startswith(b + ".") for b in blocks)}
    inside_block = lambda n: any(n.startswith(b + ".") for b in outermost_blocks)  # noqa: E731
    candidates = [
        n
        for n, m in modules.items()
        if n in outermost_blocks or (isinstance(m, ACTIVATIONS) and not inside_block(n))
    ]
    seen = probe(model, example_input, [(n, "channels") for n in candidates])
    return [
        name
        for name, s in seen.items()
        if s.calls == 1 and isinstance(s.output, torch.Tensor) and s.output.dim() in (3, 4)
    ]


def resolve_gate_points(model: nn.Module, gate_points: Sequence[str | GatePoint] | str, example: torch.Tensor,
                        units: str = "channels") -> list[str | GatePoint]:
    """Gate-point specs from a list (as it is) or ``"auto"`` (proposals; with ``units="heads"``
    every attention module's heads). A model preset's name is the registry's to resolve
    (:func:`nad_ext.training.build_gated_model` does)."""
    if not isinstance(gate_points, str):
        return list(gate_points)
    if gate_points != "auto":
        raise ValueError(f"gate points {gate_points!r}: expected a list of gate-point specs or 'auto' (a model "
                         "preset's name is resolved by nad_ext.training.build_gated_model)")
    if units == "heads":
        heads = [f"{name}:heads" for name, m in model.named_modules() if attention.is_attention(m)]
        if not heads:
            raise ValueError(f"units 'heads': {type(model).__name__} has no attention module ({attention.SUPPORTED})")
        return heads
    if units != "channels":
        raise ValueError(f"'auto' gate points gate channels or heads, not {units!r}")
    return propose_gate_points(model, example)


def describe_layout(point: GatePoint, shape: Sequence[int]) -> str:
    """How a gate point's output is laid out, in words: "(N, C, H, W) map", "(N, L, C) tokens"..."""
    d, axis = len(shape), point.channel_axis
    if point.units == "heads":
        return "(N, L, heads, head_dim) heads" if d == 4 else "(N, H, W, heads, head_dim) heads"
    known = {(2, 1): "(N, C) vector", (3, 1): "(N, C, L) sequence", (3, 2): "(N, L, C) tokens",
             (4, 1): "(N, C, H, W) map", (4, 3): "(N, H, W, C) map"}
    return known.get((d, axis), f"{d}-d, channels on axis {axis}")


def requested_axis(name: str, axis: int | None, units: str, channel_axis) -> int | None:
    """The axis asked for: the spec's own, else ``channel_axis`` (one int, or a mapping by name)."""
    if channel_axis is not None and not isinstance(channel_axis, (int, Mapping)) or isinstance(channel_axis, bool):
        raise TypeError(f"channel_axis must be an int or a mapping {{gate point: int}}; got {channel_axis!r}")
    if isinstance(channel_axis, Mapping):
        unknown = [k for k in channel_axis if not isinstance(k, str)]
        if unknown:
            raise TypeError(f"channel_axis keys must be gate-point names; got {unknown}")
        asked = channel_axis.get(name)
    else:
        asked = channel_axis
    if units == "heads":
        if isinstance(channel_axis, Mapping) and name in channel_axis:
            raise ValueError(f"gate point {name!r} gates attention heads: its axis is the heads', not channel_axis")
        return None
    chosen = axis if axis is not None else asked
    if chosen is not None and (not isinstance(chosen, int) or isinstance(chosen, bool)):
        raise TypeError(f"channel_axis of gate point {name!r} must be an int; got {chosen!r}")
    return chosen


def find_gate_points(model: nn.Module, example_input: torch.Tensor,
                     specs: Sequence[tuple[str, int | None, str, str]],
                     given: Sequence[str | GatePoint]) -> tuple[list[GatePoint], list[tuple]]:
    """Probes the network once: every gate point's channel count and channel axis, and its
    output shape for ``example_input``. ``specs``: ``(name, requested axis or None, units,
    record)`` per gate point (:func:`parse_gate_point`, :func:`requested_axis`), ``given``: the
    gate points as the caller gave them (a :class:`GatePoint`'s channel count is checked)."""
    seen = probe(model, example_input, [(name, units) for name, _, units, _ in specs])
    resized = None
    points, shapes = [], []
    for (name, axis, units, record), original in zip(specs, given):
        entry = seen.get(name)
        count = entry.calls if entry is not None else 0
        if count != 1:
            raise ValueError(
                f"gate point {name!r} runs {count} times per forward; a gate point must run "
                "exactly once (shared modules, such as a reused ReLU, cannot be gated by name)"
            )
        out = entry.output
        if not isinstance(out, torch.Tensor) or out.dim() < 2:
            hint = (f" (an attention module: gate its heads with '{name}:heads')"
                    if attention.is_attention(model.get_submodule(name)) else "")
            raise ValueError(
                f"gate point {name!r} must output a tensor (N, C, ...); got "
                f"{type(out).__name__}{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}{hint}"
            )
        if units == "heads":
            axis = out.dim() - 2
        elif axis is None:
            shape = tuple(out.shape)
            try:
                axis = infer_channel_axis(name, shape, entry.layer)
            except ValueError:
                if resized is None:  # a second forward only when an axis is in doubt
                    bigger = resized_input(example_input)
                    resized = {} if bigger is None else shapes_at(
                        model, bigger, [n for n, _, u, _ in specs if u == "channels"])
                axis = infer_channel_axis(name, shape, entry.layer, resized.get(name))
        else:
            if not -out.dim() < axis < out.dim() or axis % out.dim() == 0:
                raise ValueError(f"channel_axis {axis} of gate point {name!r} is out of range: its output "
                                 f"{tuple(out.shape)} has channel axes 1..{out.dim() - 1} (0 is the batch)")
            axis %= out.dim()
        point = GatePoint(name, int(out.shape[axis]), axis, units, record)
        if isinstance(original, GatePoint) and original.channels != point.channels:
            raise ValueError(f"gate point {name!r} has {point.channels} channels on axis {axis} in this "
                             f"network, but {original.channels} were expected")
        points.append(point)
        shapes.append(tuple(out.shape))
    return points, shapes
