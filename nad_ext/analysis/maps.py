"""Activation maps of gate points (summed over their units, at every position) and the
single-image view (METHOD.md, analysis 5)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from nad_ext.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from nad_ext.gates.maskbank import MaskBank
from nad_ext.gates.model import GatedModel
from nad_ext.gates.points import GatePoint


def position_map(activation: torch.Tensor, point: GatePoint | None = None) -> torch.Tensor | None:
    """The gate point's output summed over its units at every position: (N, h, w) float, or
    None when the output has no spatial positions.

    Units are summed along ``point.channel_axis`` (and, for attention heads, the head
    dimension too). What remains is the position grid: (h, w) for (N, C, H, W) and NHWC maps and
    for Swin's head outputs; for (N, L) tokens, the square patch grid when L = g * g, or when
    L = g * g + 1 with a leading class token, which is dropped (torchvision's ViT); any other
    token count (extra distillation or register tokens) and (N, C) vectors have no map.
    """
    axis = 1 if point is None else point.channel_axis
    units = [axis] + ([activation.dim() - 1] if point is not None and point.units == "heads" else [])
    maps = activation.float().sum(dim=units)
    if maps.dim() == 2:
        length = maps.shape[1]
        for extra in (0, 1):
            side = math.isqrt(max(length - extra, 0))
            if side > 0 and side * side == length - extra:
                return maps[:, extra:].reshape(-1, side, side)
        return None
    return maps if maps.dim() == 3 else None


def activation_maps(activation: torch.Tensor, size: int, point: GatePoint | None = None) -> torch.Tensor | None:
    """:func:`position_map` (channels on axis 1 when ``point`` is None), min-max normalised
    per sample and resized bicubic to (size, size).

    Returns float (N, size, size), or None when the output is not spatial (see
    :func:`position_map`, or 1 x 1 after a global pool). A constant map (span at most 1e-6 of
    its magnitude) normalises to zeros.
    """
    maps = _normalised_maps(activation, point)
    if maps is None:
        return None
    return F.interpolate(maps[0][:, None], size=(size, size), mode="bicubic", align_corners=False)[:, 0]


def _normalised_maps(activation: torch.Tensor, point: GatePoint | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(the position maps min-max normalised per sample (N, h, w), which maps are constant (N,)),
    or None when not spatial. Constant (span at most 1e-6 of the magnitude, e.g. every channel
    closed) maps normalise to zeros."""
    maps = position_map(activation, point)
    if maps is None or maps.shape[-1] * maps.shape[-2] <= 1:
        return None
    low, high = maps.amin(dim=(1, 2), keepdim=True), maps.amax(dim=(1, 2), keepdim=True)
    span = high - low
    varies = span > 1e-6 * torch.maximum(low.abs(), high.abs())
    maps = torch.where(varies, (maps - low) / span.clamp(min=1e-30), torch.zeros_like(maps))
    return maps, ~varies.flatten()


def top_hits(maps: torch.Tensor, quadrant: torch.Tensor, top_fraction: float) -> torch.Tensor:
    """Fraction of each map's top ``top_fraction`` pixels that lie inside ``quadrant``.

    ``maps``: (N, S, S); ``quadrant``: (N,) in 0..3 (top-left, top-right, bottom-left,
    bottom-right). Pixels tied at the threshold share the remaining places evenly (the expected
    hit under random tie-breaking), so a constant map scores exactly 0.25.
    """
    n, s = maps.shape[0], maps.shape[-1]
    flat = maps.reshape(n, -1)
    k = max(1, int(round(top_fraction * flat.shape[1])))
    threshold = torch.topk(flat, k, dim=1).values[:, -1:]
    rows = torch.arange(s, device=maps.device)[:, None] >= s // 2
    cols = torch.arange(s, device=maps.device)[None, :] >= s // 2
    inside = torch.stack([~rows & ~cols, ~rows & cols, rows & ~cols, rows & cols]).reshape(4, -1)
    inside = inside[quadrant.long()]
    above, tied = flat > threshold, flat == threshold
    n_above, n_tied = above.sum(1).double(), tied.sum(1).double()
    hits = (above & inside).sum(1).double() + (k - n_above) * (tied & inside).sum(1).double() / n_tied
    return hits / k


def _to_display(x: torch.Tensor) -> np.ndarray:
    """Normalised (3, H, W) -> uint8 (H, W, 3)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((x.cpu() * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


@torch.no_grad()
def single_image_view(gated: GatedModel, bank: MaskBank, image: torch.Tensor, task: int | str,
                      image_size: int, top_fraction: float = 0.05) -> list[dict]:
    """One image through one task's binary sub-architecture (METHOD.md, analysis 5).

    ``image``: uint8 (3, H, W) as from :meth:`ImageSet.load` (eval-transformed here); ``task``:
    index or name. Returns per gate point ``{"gate_point", "map": (S, S) float in [0, 1],
    "top": (S, S) bool, the top ``top_fraction`` pixels (ties at the threshold included)}``
    with S = image_size; ``map`` and ``top`` are None where the output is not spatial.
    """
    bank.apply_to(gated)
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction!r}")
    if isinstance(task, str):
        if task not in bank.task_names:
            raise ValueError(f"unknown task {task!r}; the bank's tasks: {', '.join(bank.task_names)}")
        task = bank.task_names.index(task)
    if not 0 <= task < len(bank.tasks):
        raise ValueError(f"task index {task} out of range: the bank has {len(bank.tasks)} tasks")
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError("image must be a (3, H, W) tensor")
    device = next(iter(gated.logits)).device
    x = eval_transform(image, image_size)[None].to(device)
    _, acts = gated(x, torch.tensor([task], device=device), binary=True, record=True)
    views = []
    for point, act in zip(bank.gate_points, acts):
        maps = activation_maps(act, image_size, point)
        if maps is None:
            views.append({"gate_point": point.name, "map": None, "top": None})
            continue
        flat = maps[0].flatten()
        kth = torch.topk(flat, max(1, int(round(top_fraction * flat.numel())))).values[-1]
        views.append({"gate_point": point.name, "map": maps[0].cpu().numpy(), "top": (maps[0] >= kth).cpu().numpy()})
    return views
