"""Labelled image sets: :class:`ImageSet` (one split of a labelled image collection, in memory
or read lazily from files), ImageFolder trees on disk (:func:`image_folder`) and
:func:`load_batch`, the batches the analyses evaluate (through an attached input pipeline where
there is one). The built-in generated set is :mod:`nad_ext.data.shapes`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from nad_ext.data.transforms import eval_transform, train_transform

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class ImageSet:
    """One split of a labelled image collection.

    Images live either in memory (``images``: uint8 (N, 3, H, W)) or on disk (``paths``: read
    lazily by :meth:`load`). ``name`` identifies the collection (e.g. the generator's settings or
    the folder path); caches use it to tell data sets apart. ``batch_loader``, None by default,
    is where an input pipeline (:func:`nad_ext.data.pipeline.with_loader`) takes over
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

    def subset(self, indices) -> "ImageSet":
        """The images at ``indices``, with the same classes, as a new set (read through this
        one's own loading, e.g. a prepared cache's)."""
        indices = [int(i) for i in indices]
        bad = [i for i in indices if not 0 <= i < len(self)]
        if bad:
            raise ValueError(f"indices {bad[:5]} out of range: {self.name} has {len(self)} images")
        name = f"{self.name}[{len(indices)} of {len(self)}]"
        labels = [self.labels[i] for i in indices]
        if type(self) is not ImageSet:
            return _Subset(self, indices, name, labels)
        if self._images is not None:
            return ImageSet(self.classes, labels, name, images=self._images[indices])
        return ImageSet(self.classes, labels, name, paths=[self._paths[i] for i in indices])

    def indices_of_class(self, c: int) -> list[int]:
        """Indices of the images labelled ``c``."""
        if not 0 <= c < len(self.classes):
            raise ValueError(f"class index {c} out of range: {self.name} has {len(self.classes)} classes")
        return [i for i, label in enumerate(self.labels) if label == c]


class _Subset(ImageSet):
    """Some images of an ImageSet subclass that reads its own way: loads (and a prepared
    cache's ``fetch`` and ``check_image_size``) go to the parent."""

    def __init__(self, parent: ImageSet, indices: list[int], name: str, labels: list[int]):
        paths = parent.paths if parent.paths is not None else [Path(f"{parent.name}[{i}]") for i in range(len(parent))]
        super().__init__(parent.classes, labels, name, paths=[paths[i] for i in indices])
        self._parent, self._indices = parent, indices
        for method in ("fetch", "check_image_size"):
            if hasattr(parent, method):
                setattr(self, method, self._delegate(method))

    def _delegate(self, method: str):
        target = getattr(self._parent, method)
        return (lambda i: target(self._indices[i])) if method == "fetch" else target

    def load(self, i: int) -> torch.Tensor:
        return self._parent.load(self._indices[i])


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
