"""``nad::mask_overlap``: all-pairs, layer-wise overlap of binary sub-architectures."""
from __future__ import annotations

from typing import Sequence

import torch

from . import checks

METRICS = ("iou", "iomin", "intersection")


def _check_layer_sizes(layer_sizes) -> list[int]:
    if isinstance(layer_sizes, torch.Tensor):
        layer_sizes = layer_sizes.tolist()
    try:
        sizes = list(layer_sizes)
    except TypeError:
        raise TypeError(
            f"layer_sizes must be a sequence of ints, got {type(layer_sizes).__name__}"
        ) from None
    if not sizes:
        raise ValueError("layer_sizes must name at least one layer; got an empty sequence")
    for index, size in enumerate(sizes):
        if isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(
                f"layer_sizes must hold ints; got {type(size).__name__} at index {index}"
            )
        if size <= 0:
            raise ValueError(f"layer_sizes must be positive; got {size} at index {index}")
    return sizes


def mask_overlap(
    a: torch.Tensor,
    b: torch.Tensor,
    layer_sizes: Sequence[int],
    metric: str = "iou",
    per_layer: bool = False,
) -> torch.Tensor:
    """Overlap of every sub-architecture in ``a`` with every one in ``b``, layer by layer.

    Each row of ``a`` and ``b`` is one binary sub-architecture: the open channels of all gate
    points, concatenated in gate-point order (``layer_sizes`` gives the channels of each).
    For rows A of ``a``, B of ``b`` and layer l (A_l, B_l: that layer's sets of open channels):

    - ``"iou"``: |A_l & B_l| / |A_l | B_l|
    - ``"iomin"``: |A_l & B_l| / min(|A_l|, |B_l|)
    - ``"intersection"``: |A_l & B_l| (a count, as float32)

    0/0 is defined as 1.0 for ``"iou"`` and ``"iomin"``: two empty layers are identical, and
    the empty set is a subset of every set. So an empty layer against a non-empty one gives
    iou 0 (0/k) but iomin 1 (0/0), and two empty layers give 1 for both.

    Args:
        a: (Ta, K) bool. b: (Tb, K) bool, on a's device. K = sum(layer_sizes).
        layer_sizes: channels of each layer, positive ints.
        metric: ``"iou"`` (the paper's similarity), ``"iomin"`` or ``"intersection"``.
        per_layer: return every layer's matrix instead of the mean over layers.

    Returns:
        float32 tensor of shape (Ta, Tb), the mean over layers of the per-layer metric, or
        (L, Ta, Tb) when ``per_layer``. Not differentiable (the inputs are bool).
    """
    checks.tensor("a", a, dims=2, dtypes=(torch.bool,))
    checks.tensor("b", b, dims=2, dtypes=(torch.bool,))
    checks.same_device(a=a, b=b)
    sizes = _check_layer_sizes(layer_sizes)
    total = sum(sizes)
    for name, t in (("a", a), ("b", b)):
        if t.shape[1] != total:
            raise ValueError(
                f"{name} must have K = sum(layer_sizes) = {total} columns; "
                f"got shape {tuple(t.shape)}"
            )
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(map(repr, METRICS))}; got {metric!r}")
    if not isinstance(per_layer, bool):
        raise TypeError(f"per_layer must be a bool, got {type(per_layer).__name__}")
    return torch.ops.nad.mask_overlap(a, b, sizes, metric, per_layer)


def mask_overlap_reference(
    a: torch.Tensor,
    b: torch.Tensor,
    layer_sizes: Sequence[int],
    metric: str = "iou",
    per_layer: bool = False,
) -> torch.Tensor:
    """Pure-PyTorch float64 definition of :func:`mask_overlap` (a matrix product per layer),
    used by the tests and benchmarks. Returns float64 on a's device."""
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    layers, start = [], 0
    for size in layer_sizes:
        al, bl = a64[:, start : start + size], b64[:, start : start + size]
        start += size
        inter = al @ bl.T
        if metric == "intersection":
            layers.append(inter)
            continue
        sa, sb = al.sum(1)[:, None], bl.sum(1)[None, :]
        den = sa + sb - inter if metric == "iou" else torch.minimum(sa, sb)
        layers.append(torch.where(den > 0, inter / den.clamp(min=1), torch.ones_like(inter)))
    stacked = torch.stack(layers)
    return stacked if per_layer else stacked.mean(0)


@torch.library.register_fake("nad::mask_overlap")
def _(a, b, layer_sizes, metric, per_layer):
    # Mixed devices with one of them meta dispatch here rather than to a C++ kernel.
    torch._check(
        a.device == b.device,
        lambda: f"mask_overlap: a and b must be on one device, got {a.device} and {b.device}",
    )
    shape = (len(layer_sizes), a.shape[0], b.shape[0]) if per_layer else (a.shape[0], b.shape[0])
    return a.new_empty(shape, dtype=torch.float32)
