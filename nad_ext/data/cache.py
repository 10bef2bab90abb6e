"""Prepared data sets: every image of an ImageFolder tree decoded once, resized, stored for
memory-mapped reading (``nad prepare-data``; ``--data CACHE`` then reads it).

What is stored, and what it means for the transforms. For an input size S the images are stored
with their short side at ``R = round(S * 256 / 224)`` (256 for 224), the size the evaluation
transform resizes to, by the exact path's own resize; images already smaller are stored as they
are (never enlarged). Each image's original size is kept:

- evaluation (Resize(R) + CenterCrop(S)) from the cache gives the exact path's pixels bit for
  bit: the stored image *is* the exact path's intermediate;
- training draws its RandomResizedCrop box and flip on the original size, from the same
  generator in the same order as the exact path (so the scale range keeps its meaning: a
  fraction of the original image's area, and a task sees the same regions), and moves the box
  onto the stored copy, each edge rounded to the nearest stored pixel (at most half a stored
  pixel). The deviation is resolution: a box is resampled from a copy with R / short of the
  original's pixels per side. The exact path shrinks boxes wider than S original pixels, the
  cache only those wider than S * short / R (on a 500 x 375 image at S = 224: 328 instead of
  224 pixels); boxes in between are enlarged slightly from the copy instead of shrunk from the
  original, smaller ones are enlarged from fewer pixels: softer images, on average a few grey
  levels from the exact path's (benchmarks/RESULTS.md). A larger ``short_side`` trades disk
  space for detail; with a short side at least the originals' the cache trains exactly as the
  exact path (tested).

Layout: a folder with ``index.safetensors`` (per split: byte offsets and lengths, stored and
original sizes, labels, a BLAKE2b-128 checksum per image, the file names; metadata: the format,
the settings, the classes, a checksum of the index itself) and ``images.bin`` (the images back to
back: raw uint8 height x width x RGB, or JPEG). ``encoding="raw"`` is the default, by
measurement (benchmarks/RESULTS.md): on 2 CPU cores it reads 1.4-1.6x faster than the JPEG cache (no
decode) and keeps the evaluation pixels exact, where a second JPEG generation costs a few grey
levels; JPEG is 7.6x smaller on disk: the choice for data sets that would not fit otherwise.

The folder is written under a temporary name and renamed into place when complete. Opening
refuses a folder that is not a cache of this format, whose index does not match its checksum, or
whose ``images.bin`` is not exactly as long as the index says (truncated). Each image's checksum
is verified the first time a process reads it (:func:`verify` checks them all at once).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from nad_ext.data.batch_transforms import EVAL_RESIZE
from nad_ext.data.decode import BadImageError, decode_cpu, image_ops
from nad_ext.data.imagesets import ImageSet, image_folder
from nad_ext.data.pipeline import BAD_IMAGE_POLICIES, Fetched, single_threaded_pool

FORMAT = "nad-ext.datacache/1"
INDEX_FILE = "index.safetensors"
IMAGES_FILE = "images.bin"
ENCODINGS = ("raw", "jpeg")
CHECKSUM = "blake2b-128"


class CacheError(ValueError):
    """A prepared cache that cannot be used: not one, damaged, or built for other settings."""


def stored_short_side(image_size: int) -> int:
    """The short side images are stored with for input size ``image_size``: round(size * 256 / 224)."""
    return round(image_size * EVAL_RESIZE)


def is_cache(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by :func:`prepare`."""
    return (Path(path) / INDEX_FILE).is_file()


def _digest(payload) -> bytes:
    return hashlib.blake2b(payload, digest_size=16).digest()


def _bytes_tensor(payload: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8)


def _prepare_one(path: Path, short: int, encoding: str, quality: int):
    """(original (H, W), stored (h, w), payload bytes) of one image file."""
    pixels = decode_cpu(torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8), str(path))
    original = tuple(pixels.shape[-2:])
    if min(original) > short:
        pixels = TF.resize(pixels, [short], antialias=True)
    if encoding == "raw":
        payload = pixels.permute(1, 2, 0).contiguous().numpy().tobytes()
    else:
        payload = image_ops().encode_jpeg(pixels.contiguous(), quality).numpy().tobytes()
    return original, tuple(pixels.shape[-2:]), payload


def prepare(data_root: str | Path, out: str | Path, image_size: int = 224, *, short_side: int | None = None,
            encoding: str = "raw", quality: int = 90, splits: Sequence[str] | None = None,
            overwrite: bool = False, on_bad_image: str = "skip", workers: int | None = None,
            progress: bool = True) -> Path:
    """Writes the cache of the ImageFolder tree ``data_root`` (``splits``: default those of
    "train" and "val" that exist) for input size ``image_size`` to the folder ``out``.

    ``short_side``: the stored images' short side, default :func:`stored_short_side` (the
    evaluation resize: 256 for 224). Larger keeps more of the originals' detail for small crops,
    at the cost of disk space and read time (evaluation then resizes the stored copy).

    ``encoding``: "raw" (uint8 pixels) or "jpeg" (re-encoded at ``quality``). Unreadable files
    are skipped with a warning and listed in the index (``on_bad_image="skip"``) or stop the
    preparation with their path ("stop"). ``overwrite`` replaces an existing cache (never a
    folder that is not one). Returns ``out``.
    """
    root, out = Path(data_root), Path(out)
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {on_bad_image!r}")
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in [1, 100], got {quality!r}")
    if splits is None:
        splits = [s for s in ("train", "val") if (root / s).is_dir()] or ["train"]
    sets = {s: image_folder(root, s) for s in splits}  # clear errors for missing folders
    if out.exists():
        if not is_cache(out):
            raise FileExistsError(f"{out} exists and is not a data cache: choose another --out")
        if not overwrite:
            raise FileExistsError(f"{out} exists: pass overwrite=True (--overwrite) to replace it")
    short = stored_short_side(image_size) if short_side is None else short_side
    if not isinstance(short, int) or isinstance(short, bool) or short < image_size:
        raise ValueError(f"short_side must be an integer >= image_size ({image_size}), got {short!r}")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    workers = max(1, workers or min(os.cpu_count() or 1, 16))
    tensors, splits_meta, offset = {}, {}, 0
    try:
        with open(tmp / IMAGES_FILE, "wb") as blob, single_threaded_pool(workers) as pool:
            for split, images in sets.items():
                split_dir = root / split
                rows, skipped = [], []
                bar = tqdm(total=len(images), desc=f"prepare {split}", unit="img", disable=not progress)
                window = 8 * workers  # images in flight: keeps memory bounded on large sets
                for lo in range(0, len(images), window):
                    chunk = range(lo, min(lo + window, len(images)))
                    futures = [pool.submit(_prepare_one, images.paths[i], short, encoding, quality) for i in chunk]
                    for i, future in zip(chunk, futures):
                        name = images.paths[i].relative_to(split_dir).as_posix()
                        try:
                            original, stored, payload = future.result()
                        except (ValueError, OSError) as err:
                            if on_bad_image == "stop":
                                raise BadImageError(f"{err} (pass --on-bad-image skip to leave it out)") from err
                            skipped.append(f"{name}: {err}")
                            bar.write(f"skipping an unreadable image: {err}")
                            bar.update(1)
                            continue
                        blob.write(payload)
                        rows.append((offset, len(payload), *stored, *original, images.labels[i], _digest(payload),
                                     name))
                        offset += len(payload)
                        bar.update(1)
                bar.close()
                if not rows:
                    raise ValueError(f"no readable images in {split_dir}")
                cols = list(zip(*rows))
                tensors[f"{split}.offset"] = torch.tensor(cols[0], dtype=torch.int64)
                tensors[f"{split}.nbytes"] = torch.tensor(cols[1], dtype=torch.int64)
                tensors[f"{split}.stored_hw"] = torch.tensor(list(zip(cols[2], cols[3])), dtype=torch.int32)
                tensors[f"{split}.original_hw"] = torch.tensor(list(zip(cols[4], cols[5])), dtype=torch.int32)
                tensors[f"{split}.label"] = torch.tensor(cols[6], dtype=torch.int64)
                tensors[f"{split}.checksum"] = _bytes_tensor(b"".join(cols[7])).view(-1, 16)
                tensors[f"{split}.names"] = _bytes_tensor("\n".join(cols[8]).encode())
                splits_meta[split] = {"classes": images.classes, "count": len(rows), "skipped": skipped,
                                      "source": str(split_dir.resolve())}
            blob.flush()
            os.fsync(blob.fileno())
        metadata = {
            "format": FORMAT,
            "settings": json.dumps({"image_size": image_size, "short_side": short, "encoding": encoding,
                                    "quality": quality if encoding == "jpeg" else None, "layout": "HWC RGB uint8"}),
            "splits": json.dumps(splits_meta),
            "images_bytes": str(offset),
            "checksum": CHECKSUM,
        }
        metadata["index_checksum"] = _index_checksum(tensors, metadata)
        save_file(tensors, str(tmp / INDEX_FILE), metadata=metadata)
        if out.exists():  # overwrite: move the old cache aside, the new one in, then delete the old
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _index_checksum(tensors: dict, metadata: dict) -> str:
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].contiguous().numpy().tobytes())
    for key in sorted(k for k in metadata if k != "index_checksum"):
        h.update(f"{key}={metadata[key]}".encode())
    return h.hexdigest()


class DataCache:
    """An open cache (read-only): ``settings``, ``splits`` and :meth:`split` to read one."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / INDEX_FILE
        if not index.is_file():
            raise CacheError(f"{self.path} is not a data cache: {INDEX_FILE} is missing "
                             f"(make one with `nad prepare-data --data DIR --out {self.path}`)")
        try:
            from safetensors import safe_open

            with safe_open(str(index), framework="pt") as f:
                metadata = f.metadata() or {}
            tensors = load_file(str(index))
        except (SafetensorError, OSError, ValueError) as err:
            raise CacheError(f"{index} cannot be read ({err}): the cache is damaged; prepare it again") from err
        if metadata.get("format") != FORMAT:
            raise CacheError(f"{self.path} is a cache of format {metadata.get('format')!r}, this version reads "
                             f"{FORMAT!r}: prepare it again")
        if metadata.get("index_checksum") != _index_checksum(tensors, metadata):
            raise CacheError(f"{index} does not match its checksum: the cache is damaged; prepare it again")
        self.settings = json.loads(metadata["settings"])
        self.splits = json.loads(metadata["splits"])
        self._tensors = tensors
        self._names: dict[str, list[str]] = {}
        expected = int(metadata["images_bytes"])
        images = self.path / IMAGES_FILE
        actual = images.stat().st_size if images.is_file() else -1
        if actual != expected:
            raise CacheError(f"{images} has {max(actual, 0)} bytes where its index expects {expected}: the cache "
                             f"is truncated or incomplete; prepare it again")
        self._blob = None
        if expected:
            # A read-only mapping (a private writable one of a file larger than the memory can be
            # refused by the kernel); nothing ever writes to it.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                self._blob = torch.from_numpy(np.memmap(images, dtype=np.uint8, mode="r"))

    @property
    def image_size(self) -> int:
        return int(self.settings["image_size"])

    def split(self, name: str) -> "CachedImageSet":
        if name not in self.splits:
            raise CacheError(f"{self.path} holds no {name!r} split (it has: {', '.join(self.splits)})")
        return CachedImageSet(self, name)

    def entry(self, split: str, i: int, verify: bool = True) -> torch.Tensor:
        """Image i's stored bytes (a view of the mapped file)."""
        t = self._tensors
        offset, nbytes = int(t[f"{split}.offset"][i]), int(t[f"{split}.nbytes"][i])
        payload = self._blob[offset: offset + nbytes]
        if verify and _digest(payload.numpy()) != t[f"{split}.checksum"][i].numpy().tobytes():
            raise BadImageError(f"cache entry {split}/{self.names(split)[i]} in {self.path} is corrupted "
                                f"(checksum mismatch): prepare the cache again")
        return payload

    def names(self, split: str) -> list[str]:
        if split not in self._names:
            self._names[split] = self._tensors[f"{split}.names"].numpy().tobytes().decode().split("\n")
        return self._names[split]


def open_split(path: str | Path, split: str) -> "CachedImageSet":
    """The ``split`` images of the cache at ``path``, as an ImageSet."""
    return DataCache(path).split(split)


class CachedImageSet(ImageSet):
    """One split of a cache. ``load`` gives the stored image (uint8 (3, h, w)); the fast pipeline
    reads it through ``fetch``, with the original size that crop boxes are drawn on."""

    def __init__(self, cache: DataCache, split: str):
        meta = cache.splits[split]
        t = cache._tensors
        source = Path(meta["source"])
        super().__init__(meta["classes"], t[f"{split}.label"].tolist(), f"{source} (cache {cache.path})",
                         paths=[source / n for n in cache.names(split)])
        self.cache, self.split = cache, split
        self._stored = t[f"{split}.stored_hw"].tolist()
        self._original = t[f"{split}.original_hw"].tolist()
        self._verified = np.zeros(len(self), dtype=bool)
        self._jpeg = cache.settings["encoding"] == "jpeg"

    def check_image_size(self, size: int) -> None:
        """CacheError unless the cache was prepared for input size ``size``."""
        if size != self.cache.image_size:
            raise CacheError(f"{self.cache.path} was prepared for image size {self.cache.image_size} (short side "
                             f"{self.cache.settings['short_side']}), this run uses {size}: prepare a cache with "
                             f"`nad prepare-data --image-size {size}`")

    def _payload(self, i: int) -> torch.Tensor:
        payload = self.cache.entry(self.split, i, verify=not self._verified[i])
        self._verified[i] = True
        return payload

    def fetch(self, i: int) -> Fetched:
        where = f"{self.paths[i]} (cache {self.cache.path})"
        payload = self._payload(i)
        if self._jpeg:
            return Fetched(where, size=tuple(self._original[i]), jpeg=payload)
        h, w = self._stored[i]
        return Fetched(where, size=tuple(self._original[i]), pixels=payload.view(h, w, 3).permute(2, 0, 1))

    def load(self, i: int) -> torch.Tensor:
        item = self.fetch(i)
        pixels = item.pixels if item.pixels is not None else decode_cpu(item.jpeg, item.where)
        return pixels.contiguous()


def verify(path: str | Path, workers: int | None = None) -> list[str]:
    """Checks every image of the cache at ``path`` against its checksum; returns the damaged
    entries (empty when the cache is sound). CacheError if the cache cannot be opened."""
    cache = DataCache(path)
    bad = []
    with ThreadPoolExecutor(max(1, workers or min(os.cpu_count() or 1, 16))) as pool:
        for split in cache.splits:
            def check(i, split=split):
                try:
                    cache.entry(split, i)
                except BadImageError as err:
                    return str(err)
            bad += [r for r in pool.map(check, range(cache.splits[split]["count"])) if r]
    return bad
