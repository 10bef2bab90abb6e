"""The built-in data set: procedurally drawn shapes and textures, generated offline and
deterministically (:func:`generated_shapes`), so that the demo and the tests need no downloads."""
from __future__ import annotations

import math

import numpy as np
import torch

from nad_ext.data.imagesets import ImageSet

SHAPE_CLASSES = ["circle", "square", "triangle", "star", "cross", "ring", "stripes",
                 "checkerboard", "dots", "diagonal_lines", "crescent", "grid"]
_SPLIT_CODES = {"train": 0, "val": 1}
_DEFAULT_PER_CLASS = {"train": 200, "val": 50}
_TEXTURE_FREQ = 2.5  # texture periods per unit of the shape's local coordinates


def _shape_mask(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of shape ``kind`` in local coordinates (u, v), the shape spanning ~[-1, 1]."""
    r = np.sqrt(u * u + v * v)
    patch = np.maximum(np.abs(u), np.abs(v)) < 0.9  # the square patch that carries a texture
    fu, fv = np.mod(u * _TEXTURE_FREQ, 1.0), np.mod(v * _TEXTURE_FREQ, 1.0)
    if kind == "circle":
        return r < 0.9
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) < 0.72
    if kind == "triangle":
        return (v > -0.5) & (v < 1.0 - math.sqrt(3.0) * np.abs(u))
    if kind == "star":
        phase = np.mod(np.arctan2(v, u) * 5.0 / (2.0 * math.pi), 1.0)
        return r < 0.36 + 0.62 * (1.0 - 2.0 * np.abs(phase - 0.5))
    if kind == "cross":
        return ((np.abs(u) < 0.28) & (np.abs(v) < 0.9)) | ((np.abs(v) < 0.28) & (np.abs(u) < 0.9))
    if kind == "ring":
        return (r > 0.55) & (r < 0.9)
    if kind in ("stripes", "diagonal_lines"):  # thick stripes near 0/90 deg, thin lines near 45/135
        return patch & (fu < (0.5 if kind == "stripes" else 0.25))
    if kind == "checkerboard":
        return patch & ((np.floor(u * _TEXTURE_FREQ) + np.floor(v * _TEXTURE_FREQ)) % 2 == 0)
    if kind == "dots":
        return patch & ((fu - 0.5) ** 2 + (fv - 0.5) ** 2 < 0.3**2)
    if kind == "crescent":
        return (r < 0.9) & ((u - 0.45) ** 2 + v * v > 0.72**2)
    if kind == "grid":
        return patch & ((fu < 0.2) | (fv < 0.2))
    raise ValueError(f"unknown shape kind {kind!r}")


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB for arrays of shape (n,); returns (n, 3) in [0, 1]."""
    i = np.floor(h * 6.0).astype(np.int64) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack([np.stack(c, 1) for c in [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]])
    return table[i, np.arange(len(h))]


def _draw_class(kind: str, class_index: int, num_hues: int, n: int, size: int,
                rng: np.random.Generator) -> np.ndarray:
    """``n`` images of one class as uint8 (n, 3, size, size)."""
    col = lambda a: a[:, None, None]  # noqa: E731  per-image parameter broadcast over pixels
    # Anti-aliasing by 2x2 supersampling: pixel centres of the fine grid in coarse pixel units.
    fine = (np.arange(2 * size, dtype=np.float32) + 0.5) / 2.0
    y, x = np.meshgrid(fine, fine, indexing="ij")
    cx, cy = (rng.uniform(0.38, 0.62, (2, n)) * size).astype(np.float32)
    scale = (rng.uniform(0.24, 0.36, n) * size).astype(np.float32)
    if kind in ("stripes", "diagonal_lines"):
        base = rng.integers(0, 2, n) * (math.pi / 2) + (math.pi / 4 if kind == "diagonal_lines" else 0.0)
        angle = base + rng.uniform(-0.2, 0.2, n)
    else:
        angle = rng.uniform(0.0, 2.0 * math.pi, n)
    cos, sin = col(np.cos(angle).astype(np.float32)), col(np.sin(angle).astype(np.float32))
    dx, dy = x[None] - col(cx), y[None] - col(cy)
    u = (dx * cos + dy * sin) / col(scale)
    v = (-dx * sin + dy * cos) / col(scale)
    mask = _shape_mask(kind, u, v).astype(np.float32)
    mask = mask.reshape(n, size, 2, size, 2).mean(axis=(2, 4))

    # Colours: a weak class cue in the foreground hue, a light/dark contrast flipped at random.
    light_fg = rng.random(n) < 0.5
    hue = np.mod(class_index / num_hues + rng.uniform(-0.06, 0.06, n), 1.0)
    fg_value = np.where(light_fg, rng.uniform(0.65, 1.0, n), rng.uniform(0.05, 0.35, n))
    fg = _hsv_to_rgb(hue, rng.uniform(0.5, 1.0, n), fg_value)
    bg_value = np.where(light_fg, rng.uniform(0.0, 0.4, (2, n)), rng.uniform(0.6, 1.0, (2, n)))
    bg_a = _hsv_to_rgb(rng.random(n), rng.uniform(0.0, 0.6, n), bg_value[0])
    bg_b = _hsv_to_rgb(rng.random(n), rng.uniform(0.0, 0.6, n), bg_value[1])
    grad_angle = rng.uniform(0.0, 2.0 * math.pi, n)
    coarse = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    yy, xx = np.meshgrid(coarse, coarse, indexing="ij")
    ramp = np.clip(xx[None] * col(np.cos(grad_angle)) + yy[None] * col(np.sin(grad_angle)) + 0.5, 0, 1)
    ramp = ramp[:, None].astype(np.float32)  # (n, 1, H, W)
    bg = bg_a[:, :, None, None] * (1 - ramp) + bg_b[:, :, None, None] * ramp
    image = bg * (1 - mask[:, None]) + fg[:, :, None, None] * mask[:, None]
    image = image + rng.normal(0.0, 1.0, image.shape).astype(np.float32) * rng.uniform(0.02, 0.08, (n, 1, 1, 1))
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def generated_shapes(split: str = "train", num_classes: int = 10, images_per_class: int | None = None,
                     image_size: int = 64, seed: int = 0) -> ImageSet:
    """The built-in data set: procedurally drawn shapes and textures, no downloads.

    Classes (the first ``num_classes`` of :data:`SHAPE_CLASSES`, at most 12) differ by shape
    (circle, square, triangle, star, cross, ring, crescent), texture (stripes, checkerboard,
    dots, diagonal lines, grid) and, weakly, by foreground hue. Every image varies position,
    scale, rotation, colours, a two-colour gradient background and pixel noise. The images are a
    function of (split, class, seed) only: independent of the global RNG, and each split draws
    from its own seed (train: ``images_per_class`` defaults to 200, val: 50).
    """
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_CODES)}, got {split!r}")
    if not 1 <= num_classes <= len(SHAPE_CLASSES):
        raise ValueError(f"num_classes must be in [1, {len(SHAPE_CLASSES)}], got {num_classes}")
    per_class = _DEFAULT_PER_CLASS[split] if images_per_class is None else int(images_per_class)
    if per_class < 1 or image_size < 8:
        raise ValueError(f"need images_per_class >= 1 and image_size >= 8, got {per_class}, {image_size}")
    blocks = []
    for c in range(num_classes):
        rng = np.random.default_rng([seed, _SPLIT_CODES[split], c])
        blocks.append(_draw_class(SHAPE_CLASSES[c], c, len(SHAPE_CLASSES), per_class, image_size, rng))
    images = torch.from_numpy(np.concatenate(blocks))
    labels = [c for c in range(num_classes) for _ in range(per_class)]
    name = f"shapes-{split}-c{num_classes}-n{per_class}-{image_size}px-seed{seed}"
    return ImageSet(SHAPE_CLASSES[:num_classes], labels, name, images=images)

