"""The paper's transforms (:func:`~nad_ext.data.transforms.train_transform`,
:func:`~nad_ext.data.transforms.eval_transform`) for whole batches: the geometry of each image's
crop as numbers, and two ways to resample them.

A crop is described per image and per axis by a *window* ``(start, length, full, offset)``: the
source pixels ``[start, start + length)`` are resized to ``full`` pixels, of which the output keeps
``[offset, offset + size)``. RandomResizedCrop is ``(top, h, size, 0)`` / ``(left, w, size, 0)``;
Resize(size * 256 / 224) + CenterCrop(size) is ``(0, H, resized_h, crop_top)`` / ``(0, W, ...)``.

- :func:`resample_each` resizes image by image with torchvision's own kernel (the exact path's
  ``TF.resize``: on the CPU, its uint8 AVX code), so it gives the exact path's pixels bit for
  bit. It is the CPU choice: that kernel is faster there than any batched formulation we measured
  (benchmarks/RESULTS.md).
- :func:`resample_batched` does the whole batch in two batched matrix products, with the weights
  of the same antialiased bilinear filter (PyTorch's ``_upsample_bilinear2d_aa``) and the uint8
  kernel's rounding after each pass; on a GPU that is a handful of kernels for any batch. It
  agrees with the exact path within two grey levels, a few hundredths of one on average (the
  uint8 kernel's weights are fixed-point; tested).

Both return uint8-valued batches; :func:`flip_and_normalise` finishes them exactly as the exact
path does (flip, then ``(x / 255 - mean) / std``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torchvision.transforms.v2 import functional as TF

from nad_ext.data.transforms import IMAGENET_MEAN, IMAGENET_STD

EVAL_RESIZE = 256 / 224  # Resize(256) before CenterCrop(224), as a ratio to the input size


def eval_resize_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) after ``TF.resize(image, [round(size * 256 / 224)])``: the short side gets
    that length, the long side ``int(short * long / short_in)`` (torchvision's rule)."""
    short = round(size * EVAL_RESIZE)
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def eval_windows(height: int, width: int, size: int) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """The (y, x) windows of :func:`~nad_ext.data.transforms.eval_transform` on an image of ``height`` x ``width``."""
    rh, rw = eval_resize_size(height, width, size)
    # TF.center_crop's anchor: int(round((image - crop) / 2)), Python's round (half to even).
    return (0, height, rh, int(round((rh - size) / 2.0))), (0, width, rw, int(round((rw - size) / 2.0)))


def train_windows(top: int, left: int, h: int, w: int, size: int):
    """The (y, x) windows of a RandomResizedCrop box (top, left, h, w) resized to ``size``."""
    return (top, h, size, 0), (left, w, size, 0)


def map_box(box: tuple[int, int, int, int], size: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int, int, int]:
    """A crop box drawn on an image of ``size`` (H, W), moved to the same image resized to ``grid``
    (a prepared cache's copy): each edge scaled and rounded to the nearest grid pixel, at least
    one pixel wide. The identity when ``grid == size``."""
    if tuple(grid) == tuple(size):
        return box
    top, left, h, w = box
    sy, sx = grid[0] / size[0], grid[1] / size[1]
    t, b = min(round(top * sy), grid[0] - 1), min(round((top + h) * sy), grid[0])
    l, r = min(round(left * sx), grid[1] - 1), min(round((left + w) * sx), grid[1])
    return t, l, max(b - t, 1), max(r - l, 1)


# ----------------------------------------------------------------------------------------------
# Image by image: torchvision's kernel


def resample_each(image: torch.Tensor, y: Sequence[int], x: Sequence[int], size: int) -> torch.Tensor:
    """One image (uint8 (3, H, W), any strides; channels-last strides are fastest on the CPU)
    through its windows: crop, ``TF.resize`` (antialiased bilinear), crop. Returns uint8
    (3, size, size), the exact path's pixels."""
    crop = image[:, y[0]: y[0] + y[1], x[0]: x[0] + x[1]]
    out = TF.resize(crop, [y[2], x[2]], antialias=True)
    return out[:, y[3]: y[3] + size, x[3]: x[3] + size]


# ----------------------------------------------------------------------------------------------
# The whole batch: matrix products


def axis_taps(start: torch.Tensor, length: torch.Tensor, full: torch.Tensor, offset: torch.Tensor,
              count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Source indices and weights of the antialiased bilinear filter along one axis, for a batch.

    The four arguments are int64 (N,) tensors of windows; returns ``index`` (N, count, K) int64
    (absolute source pixels) and ``weight`` (N, count, K) float64 (zero on unused taps). The
    formula is PyTorch's (``_upsample_bilinear2d_aa``, align_corners=False): scale = length /
    full, support = max(scale, 1), triangle filter stretched by the scale when downsampling,
    window [trunc(center - support + 0.5), trunc(center + support + 0.5)) clipped to the source,
    weights normalised to sum 1.
    """
    scale = length.double() / full.double()
    down = scale >= 1.0
    support = torch.where(down, scale, torch.ones_like(scale))[:, None]
    inv = torch.where(down, 1.0 / scale, torch.ones_like(scale))[:, None, None]
    center = scale[:, None] * (offset[:, None] + torch.arange(count, device=start.device) + 0.5).double()
    lo = (center - support + 0.5).trunc().clamp(min=0)
    hi = torch.minimum((center + support + 0.5).trunc(), length[:, None].double())
    k = max(int((hi - lo).max().item()), 1) if len(start) else 1
    j = lo[..., None] + torch.arange(k, device=start.device)
    weight = (1.0 - ((j - center[..., None] + 0.5) * inv).abs()).clamp(min=0.0) * (j < hi[..., None])
    total = weight.sum(-1, keepdim=True)
    weight = torch.where(total > 0, weight / total.clamp(min=1e-300), weight)
    # Unused taps point at the window's first used pixel (with weight 0), so that they widen no region.
    index = start[:, None, None] + torch.where(j < hi[..., None], j, lo[..., None]).long()
    return index, weight


def _matrices(index: torch.Tensor, weight: torch.Tensor, region_start: torch.Tensor, width: int) -> torch.Tensor:
    """Dense (N, count, width) resampling matrices from taps, columns relative to each region."""
    out = torch.zeros(*index.shape[:2], width, dtype=torch.float64, device=index.device)
    out.scatter_add_(2, (index - region_start[:, None, None]).clamp(0, width - 1), weight)
    return out.float()


def resample_batched(images: Sequence[torch.Tensor], windows: torch.Tensor, size: int,
                     max_elements: int = 1 << 27) -> torch.Tensor:
    """Every image through its windows at once. ``images``: uint8 (3, H_i, W_i), all on one
    device; ``windows``: int64 (N, 2, 4) of (y, x) windows (on the CPU: the geometry is worked out
    there, so that nothing waits for the device). Returns float32 (N, 3, size, size) on the
    images' device, holding whole grey levels (0-255).

    The source region each output reads is copied into a zero-padded (n, 3, h, w) float buffer
    (in chunks of at most ``max_elements``, images sorted by region so that padding stays small),
    then resampled as ``My @ round(X @ Mx^T)``: horizontal pass first and rounding after each
    pass, as PyTorch's uint8 kernel does.
    """
    n = len(images)
    device = images[0].device if n else torch.device("cpu")
    out = torch.empty(n, 3, size, size, device=device)
    if n == 0:
        return out
    w = windows.to(device="cpu", dtype=torch.int64)
    yi, yw = axis_taps(w[:, 0, 0], w[:, 0, 1], w[:, 0, 2], w[:, 0, 3], size)
    xi, xw = axis_taps(w[:, 1, 0], w[:, 1, 1], w[:, 1, 2], w[:, 1, 3], size)
    y0, x0 = yi.amin((1, 2)), xi.amin((1, 2))  # the rows/columns the filter reads
    spans = torch.stack([y0, yi.amax((1, 2)) + 1, x0, xi.amax((1, 2)) + 1], 1).tolist()
    heights = [b - a for a, b, _, _ in spans]
    widths = [d - c for _, _, c, d in spans]
    order = sorted(range(n), key=lambda i: (heights[i] * widths[i], i))
    chunks, chunk, hh, ww = [], [], 0, 0
    for i in order:
        h2, w2 = max(hh, heights[i]), max(ww, widths[i])
        if chunk and (len(chunk) + 1) * 3 * h2 * w2 > max_elements:
            chunks.append((chunk, hh, ww))
            chunk, h2, w2 = [], heights[i], widths[i]
        chunk, hh, ww = chunk + [i], h2, w2
    chunks.append((chunk, hh, ww))
    for chunk, hh, ww in chunks:
        region = torch.zeros(len(chunk), 3, hh, ww, device=device)
        for slot, k in enumerate(chunk):
            a, b, c, d = spans[k]
            region[slot, :, : b - a, : d - c].copy_(images[k][:, a:b, c:d])
        idx = torch.tensor(chunk)
        mx = _matrices(xi[idx].to(device), xw[idx].to(device), x0[idx].to(device), ww)  # (n, size, ww)
        my = _matrices(yi[idx].to(device), yw[idx].to(device), y0[idx].to(device), hh)  # (n, size, hh)
        horizontal = torch.matmul(region, mx.transpose(1, 2)[:, None]).round_().clamp_(0, 255)
        out[idx.to(device)] = torch.matmul(my[:, None], horizontal).round_().clamp_(0, 255)
    return out


_MEAN = torch.tensor(IMAGENET_MEAN).view(-1, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(-1, 1, 1)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8-valued (..., 3, S, S) -> float32 ``(x / 255 - mean) / std`` per channel: the same
    float operations as the exact path (:func:`~nad_ext.data.transforms.train_transform`)."""
    mean, std = _MEAN.to(images.device, non_blocking=True), _STD.to(images.device, non_blocking=True)
    return (images.float() / 255.0 - mean) / std


def flip_and_normalise(batch: torch.Tensor, flips: Sequence[bool] | torch.Tensor | None = None) -> torch.Tensor:
    """uint8-valued (N, 3, S, S) -> float32: the images with ``flips[i]`` mirrored left-right,
    then :func:`normalise`."""
    if flips is not None and len(batch):
        flips = torch.as_tensor(flips, dtype=torch.bool).to(batch.device, non_blocking=True)
        batch = torch.where(flips.view(-1, 1, 1, 1), batch.flip(-1), batch)
    return normalise(batch)
