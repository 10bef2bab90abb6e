"""Probing a network: what each gate point outputs, how often it runs, and where its
channels are.

One forward of an example input with hooks on the gate points and on every layer of known
width (convolutions, linear layers, normalisations, attention) tells, per gate point, its
output, its call count and the width of the last such layer before it; :func:`infer_channel_axis`
turns that into the channel axis (see docs/DESIGN.md, "Gate points whose channels are not on
axis 1").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from nad_ext.gates import attention


def layer_width(module: nn.Module) -> tuple[int, int] | None:
    """(width, the axis the layer writes it on: 1 or -1) of a layer whose output width is known."""
    if isinstance(module, nn.Linear):
        return module.out_features, -1
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels, 1
    if isinstance(module, nn.modules.batchnorm._NormBase):  # BatchNorm, InstanceNorm
        return module.num_features, 1
    if isinstance(module, nn.GroupNorm):
        return module.num_channels, 1
    if isinstance(module, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
        return int(module.normalized_shape[-1]), -1
    if isinstance(module, nn.Embedding):
        return module.embedding_dim, -1
    if isinstance(module, nn.MultiheadAttention):
        return module.embed_dim, -1
    if attention.is_attention(module):
        return module.proj.out_features, -1
    return None


@dataclass
class Seen:
    """What a probe saw of one gate point: its (first) output, how often it ran, and the width
    of the last layer of known width that ran before it (see :func:`layer_width`)."""

    output: object
    calls: int
    layer: tuple[int, int] | None  # layer_width of the last such layer run before the output


def probe(model: nn.Module, example_input: torch.Tensor, points: Sequence[tuple[str, str]]) -> dict[str, Seen]:
    """Runs one forward; returns {name: :class:`Seen`} for the ``(name, units)`` points (units
    "channels" or "heads"), in the order of their first call. Head points report the per-head
    tensor their gate would see."""
    modules = dict(model.named_modules())
    seen: dict[str, Seen] = {}
    last: list = [None]
    handles = []
    # Layer hooks first: on a module that is a layer and a gate point, its width is known first.
    for module in modules.values():
        width = layer_width(module)
        if width is not None:
            handles.append(module.register_forward_hook(lambda m, i, o, width=width: last.__setitem__(0, width)))

    def record(name, output):
        entry = seen.setdefault(name, Seen(output, 0, last[0]))
        entry.calls += 1
        return output

    for name, units in points:
        if units == "heads":
            handles.append(attention.install_head_gate(modules[name], lambda t, name=name: record(name, t)))
        else:
            def hook(module, inputs, output, name=name):
                record(name, output)

            handles.append(modules[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _ambiguous(name: str, shape, why: str) -> ValueError:
    return ValueError(
        f"cannot tell the channel axis of gate point {name!r}: its output has shape {tuple(shape)} and {why}. "
        f"Name the axis: channel_axis={{{name!r}: k}} (or the gate point '{name}:k'), k in 1..{len(shape) - 1}"
    )


def infer_channel_axis(name: str, shape: Sequence[int], layer: tuple[int, int] | None,
                       resized_shape: Sequence[int] | None = None) -> int:
    """The channel axis of a gate point's output, from the last layer of known width that ran
    before it (a convolution, linear layer or normalisation: ``layer`` = (width, its axis)).

    (N, C) -> 1. Otherwise the one axis whose size is that width: 1 for conv maps, the last for
    (N, L, C) tokens and NHWC maps, or the axis a permute moved it to (ConvNeXt's blocks end
    NCHW after NHWC layers). When several axes have that size (16 channels on a 16 x 16 map) or
    none has it (a concatenation, as in DenseNet), ``resized_shape`` (the same output for a
    larger input) decides: the axes whose size changed are spatial and drop out. Without it, a
    concatenation takes the layer's own axis if its size is a multiple of the width. Anything
    else is ambiguous: ValueError asking for ``channel_axis``.
    """
    d = len(shape)
    if d == 2:
        return 1
    if d < 2:
        raise _ambiguous(name, shape, "it has no channel axis")
    width, natural = layer if layer is not None else (None, 1)
    natural %= d
    matches = [a for a in range(1, d) if shape[a] == width]
    if len(matches) != 1 and resized_shape is not None and len(resized_shape) == d:
        fixed = [a for a in range(1, d) if resized_shape[a] == shape[a]]  # not spatial
        matches = [a for a in matches if a in fixed] or fixed
    elif not matches and width is not None and shape[natural] % width == 0:
        return natural
    if len(matches) == 1:
        return matches[0]
    if width is None:
        raise _ambiguous(name, shape, "no layer of known width (convolution, linear, normalisation) runs before it")
    where = f"axes {matches} all have" if matches else "no axis has"
    raise _ambiguous(name, shape, f"{where} the size {width} of the last layer before it")


def resized_input(example_input: torch.Tensor) -> torch.Tensor | None:
    """A larger input of the same kind (images: 1.5x the side), to tell spatial axes apart."""
    if example_input.dim() != 4:
        return None
    h, w = example_input.shape[-2:]
    return example_input.new_zeros(*example_input.shape[:2], h + max(h // 2, 8), w + max(w // 2, 8))


def shapes_at(model, x, names) -> dict[str, tuple]:
    try:
        seen = probe(model, x, [(n, "channels") for n in names])
    except Exception:  # noqa: BLE001 - a network with a fixed input size: no second opinion
        return {}
    return {n: tuple(s.output.shape) for n, s in seen.items() if isinstance(s.output, torch.Tensor)}
