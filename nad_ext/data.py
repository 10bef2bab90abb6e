"""Labelled image sets and the paper's transforms.

An :class:`ImageSet` is one split of a labelled image collection: the built-in procedurally
generated shapes (:func:`generated_shapes`, no downloads) or an ImageFolder tree on disk
(:func:`image_folder`). The transforms follow METHOD.md; every random draw of the training
transform comes from an explicit ``torch.Generator`` so that runs are reproducible whatever the
global RNG does.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class ImageSet:
    """One split of a labelled image collection.

    Images live either in memory (``images``: uint8 (N, 3, H, W)) or on disk (``paths``: read
    lazily by :meth:`load`). ``name`` identifies the collection (e.g. the generator's settings or
    the folder path); caches use it to tell data sets apart. ``batch_loader``, None by default,
    is where an input pipeline (:func:`nad_ext.pipeline.with_loader`) takes over
    :func:`load_batch`.
    """

    def __init__(self, classes: list[str], labels: list[int], name: str, *,
                 images: torch.Tensor | None = None, paths: list[Path] | None = None):
        if (images is None) == (paths is None):
            raise ValueError("an ImageSet needs exactly one of images (in memory) or paths (files)")
        count = len(images) if images is not None else len(paths)
        if count != len(labels):
            raise ValueError(f"{count} images but {len(labels)} labels")
        self.classes = list(classes)
        self.labels = [int(label) for label in labels]
        self.name = name
        self._images = images
        self._paths = paths
        self.batch_loader = None

    @property
    def tensor(self) -> torch.Tensor | None:
        """The images as uint8 (N, 3, H, W) when they live in memory, else None."""
        return self._images

    @property
    def paths(self) -> list[Path] | None:
        """The image files when the images live on disk, else None."""
        return self._paths

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"ImageSet({self.name!r}, {len(self)} images, {len(self.classes)} classes)"

    def load(self, i: int) -> torch.Tensor:
        """Image ``i`` as a uint8 RGB tensor (3, H, W)."""
        if self._images is not None:
            return self._images[i]
        return read_image(self._paths[i])

    def indices_of_class(self, c: int) -> list[int]:
        """Indices of the images labelled ``c``."""
        if not 0 <= c < len(self.classes):
            raise ValueError(f"class index {c} out of range: {self.name} has {len(self.classes)} classes")
        return [i for i, label in enumerate(self.labels) if label == c]


def read_image(path: Path) -> torch.Tensor:
    """Reads an image file as uint8 RGB (3, H, W); ValueError naming the file if it can't."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except Exception as err:  # PIL raises several types for broken or foreign files
        raise ValueError(f"cannot read image file {path}: {err}") from err
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------------------------
# ImageFolder trees


def image_folder(root: str | Path, split: str) -> ImageSet:
    """The images of ``root/<split>/<class>/<file>``; classes are the sorted folder names.

    Files are read lazily; a file that is not a readable image raises ValueError when loaded.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder root not found: {root}")
    split_dir = root / split
    if not split_dir.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise FileNotFoundError(f"split folder not found: {split_dir} (sub-folders of the root: {found})")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"no class folders in {split_dir}: expected {split_dir}/<class>/<image files>")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (split_dir / name).iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"class folder {name!r} has no image files ({', '.join(IMAGE_EXTENSIONS)}): "
                             f"{split_dir / name}")
        paths += files
        labels += [label] * len(files)
    return ImageSet(classes, labels, str(split_dir.resolve()), paths=paths)


# ----------------------------------------------------------------------------------------------
# The built-in generated data set

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


# ----------------------------------------------------------------------------------------------
# Transforms


def _normalise(image: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(-1, 1, 1)
    return (image.float() / 255.0 - mean) / std


def random_resized_crop_params(height: int, width: int, scale: tuple[float, float],
                               ratio: tuple[float, float], generator: torch.Generator) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` with every draw taken from ``generator``.

    Returns (top, left, height, width) of the crop; 10 tries, then the central-crop fallback.
    """
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0].item(), log_ratio[1].item(),
                                                   generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, (1,), generator=generator).item())
            j = int(torch.randint(0, width - w + 1, (1,), generator=generator).item())
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


TRAIN_SCALE = (0.08, 1.25)


def train_crop_params(height: int, width: int, generator: torch.Generator,
                      scale: tuple[float, float] = TRAIN_SCALE) -> tuple[int, int, int, int, bool]:
    """The random draws of :func:`train_transform` for an image of ``height`` x ``width``:
    (top, left, height, width) of the RandomResizedCrop box, then whether to flip. Every input
    pipeline takes its draws from here, in this order, so that all of them crop the same regions."""
    top, left, h, w = random_resized_crop_params(height, width, scale, (3.0 / 4.0, 4.0 / 3.0), generator)
    return top, left, h, w, torch.rand(1, generator=generator).item() < 0.5


def train_transform(image: torch.Tensor, size: int, generator: torch.Generator,
                    scale: tuple[float, float] = TRAIN_SCALE) -> torch.Tensor:
    """The paper's training augmentation: RandomResizedCrop(size, scale, ratio=(3/4, 4/3)), random
    horizontal flip (p=0.5), ImageNet normalisation. All randomness comes from ``generator``.

    ``image``: uint8 (3, H, W); returns float32 (3, size, size).
    """
    top, left, h, w, flip = train_crop_params(image.shape[-2], image.shape[-1], generator, scale)
    out = TF.resized_crop(image, top, left, h, w, [size, size], antialias=True)
    if flip:
        out = TF.horizontal_flip(out)
    return _normalise(out)


def eval_transform(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize(round(size * 256 / 224)) + CenterCrop(size) + ImageNet normalisation (float32)."""
    out = TF.resize(image, [round(size * 256 / 224)], antialias=True)
    return _normalise(TF.center_crop(out, [size, size]))


def load_batch(images: ImageSet, indices: list[int], size: int,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``indices`` of ``images`` as float32 (N, 3, size, size) and their int64 labels.

    With a ``generator`` each image gets :func:`train_transform`, otherwise :func:`eval_transform`.
    An input pipeline attached to ``images`` (``images.batch_loader``) makes the batch instead:
    ``x`` is then on that pipeline's device.
    """
    if images.batch_loader is not None:
        return images.batch_loader(images, indices, size, generator)
    if generator is None:
        batch = [eval_transform(images.load(i), size) for i in indices]
    else:
        batch = [train_transform(images.load(i), size, generator) for i in indices]
    labels = torch.tensor([images.labels[i] for i in indices], dtype=torch.int64)
    if not batch:
        return torch.empty(0, 3, size, size), labels
    return torch.stack(batch), labels
