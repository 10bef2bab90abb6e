"""Input pipelines: (image indices, generator) requests in, ready batches on the step's device out.

The trainer asks a :class:`BatchLoader` for one step's batch at a time (:meth:`BatchLoader.prefetch`
loads the next steps in the background); analyses reach one through
:func:`nad_ext.data.imagesets.load_batch` (:func:`with_loader`). Two loaders, chosen by ``data_pipeline``:

- ``exact``: the reference. Per image: PIL decode (:meth:`ImageSet.load`), then
  :func:`nad_ext.data.transforms.train_transform` / :func:`~nad_ext.data.transforms.eval_transform`; tasks in parallel
  on CPU threads.
- ``fast``: file bytes are read in worker threads and decoded by libjpeg-turbo, on a GPU in
  batches by nvjpeg (:mod:`nad_ext.data.decode`); crops, flips and the normalisation run on the
  step's device: image by image with torchvision's uint8 kernel on the CPU (the exact path's
  pixels, bit for bit), as two batched matrix products on a GPU (:mod:`nad_ext.data.batch_transforms`;
  within two grey levels of the exact path). In-memory image sets skip the decode; prepared
  caches (:mod:`nad_ext.data.cache`) hand over stored pixels.

``auto`` (the default) is ``fast``, on the CPU too: there it gives the exact pipeline's pixels
(where PIL and torchvision decode JPEG with the same libjpeg-turbo, as here; tested) and was
measured 1.8-1.9x faster on ImageNet-sized JPEGs and 1.2x on the in-memory shapes
(benchmarks/RESULTS.md). ``exact`` stays the reference.

Both loaders take every random draw from :func:`nad_ext.data.transforms.train_crop_params`, with the
request's generator, image by image in the request's order, once the image has decoded: a task
sees the same image regions in both, and an unreadable image consumes no draws. Unreadable
images (truncated, corrupted, not an image) stop the run with the file's path
(``on_bad_image="stop"``) or are skipped with a warning and counted (``"skip"``); PNG, CMYK or
grayscale JPEG and other formats PIL reads are decoded, not skipped.
"""
from __future__ import annotations

import copy
import os
import threading
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch

from nad_ext.data import batch_transforms as bt
from nad_ext.data import transforms
from nad_ext.data.decode import BadImageError, decode_batch_cuda, decode_cpu, nvjpeg_can
from nad_ext.data.imagesets import ImageSet

PIPELINES = ("auto", "exact", "fast")
BAD_IMAGE_POLICIES = ("skip", "stop")
MAX_LISTED_BAD_FILES = 100


@dataclass
class Fetched:
    """One image as a source hands it over: decoded ``pixels`` (uint8 (3, h, w), any strides) or
    encoded ``jpeg`` bytes (uint8 (n,)). ``size`` is the (H, W) that crop boxes are drawn on, the
    original image's (a prepared cache stores a resized copy: boxes are mapped onto it)."""

    where: str
    size: tuple[int, int] | None = None
    pixels: torch.Tensor | None = None
    jpeg: torch.Tensor | None = None


@dataclass
class Batch:
    """One step's images: ``x`` float32 (N, 3, S, S), ``labels`` int64 (N,), ``counts[k]`` images
    of request part k (fewer than asked where images were skipped)."""

    x: torch.Tensor
    labels: torch.Tensor
    counts: list[int]
    ready: object = None  # a CUDA event the consumer's stream waits for


class BadImages:
    """Applies the ``on_bad_image`` policy and keeps count of the skipped images."""

    def __init__(self, policy: str):
        if policy not in BAD_IMAGE_POLICIES:
            raise ValueError(f"on_bad_image must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {policy!r}")
        self.policy = policy
        self.count = 0
        self.files: list[str] = []
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def report(self, err: Exception, policy: str | None = None) -> None:
        """Raises ``err`` (as :class:`BadImageError`) under "stop", else counts it and warns once per file."""
        message = str(err)
        if (policy or self.policy) == "stop":
            raise BadImageError(f"{message} (to skip unreadable images instead of stopping, pass "
                                f"--on-bad-image skip / on_bad_image='skip')") from err
        with self._lock:
            self.count += 1
            if len(self.files) < MAX_LISTED_BAD_FILES:
                self.files.append(message)
            if message not in self._warned:
                self._warned.add(message)
                warnings.warn(f"skipping an unreadable image: {message}", stacklevel=2)

    def take(self) -> tuple[int, list[str]]:
        """(count, messages) since the last call."""
        with self._lock:
            out = (self.count, self.files)
            self.count, self.files = 0, []
        return out


def resolve(pipeline: str, images: ImageSet, device: torch.device | str) -> str:
    """"exact" or "fast" for ``pipeline`` ("auto", "exact", "fast") on ``images`` and ``device``."""
    if pipeline not in PIPELINES:
        raise ValueError(f"data_pipeline must be one of {', '.join(PIPELINES)}, got {pipeline!r}")
    cached = hasattr(images, "fetch")
    if pipeline == "exact" and cached:
        raise ValueError(f"{images.name} is a prepared cache, which is read by the fast pipeline: pass "
                         f"--data-pipeline fast (or auto), or the image folder itself for the exact pipeline")
    return "fast" if pipeline == "auto" else pipeline


def make_loader(images: ImageSet, size: int, device: torch.device | str = "cpu", pipeline: str = "auto",
                on_bad_image: str = "skip", workers: int | None = None) -> "BatchLoader":
    """The loader of ``images`` at ``size`` x ``size`` for a step on ``device``. Close it (or use
    it as a context manager) to end its worker threads."""
    kind = resolve(pipeline, images, device)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    check = getattr(images, "check_image_size", None)
    if check is not None:
        check(size)
    cls = FastLoader if kind == "fast" else ExactLoader
    return cls(images, size, torch.device(device), on_bad_image, workers)


def with_loader(images: ImageSet, loader: "BatchLoader") -> ImageSet:
    """A shallow copy of ``images`` whose :func:`~nad_ext.data.imagesets.load_batch` goes through ``loader``
    (the analyses load their batches that way). Evaluation batches stop at an unreadable image."""
    out = copy.copy(images)

    def load(_images, indices, size, generator=None):
        if size != loader.size:
            raise ValueError(f"this image set's loader makes {loader.size}-pixel batches, not {size}")
        if generator is None:
            return loader.eval_batch(list(indices))
        batch = loader.train_batch([(list(indices), generator)])
        return batch.x, batch.labels

    out.batch_loader = load
    return out


class BatchLoader:
    """Base of the loaders: worker threads, the bad-image policy, background prefetching."""

    kind = ""

    def __init__(self, images: ImageSet, size: int, device: torch.device, on_bad_image: str,
                 workers: int | None):
        self.images, self.size, self.device = images, size, device
        self.bad = BadImages(on_bad_image)
        self.workers = max(1, workers or min(os.cpu_count() or 1, 16))
        self._pool = single_threaded_pool(self.workers)
        self.wait_s = 0.0  # time the consumer of prefetch() spent waiting for a batch

    def train_batch(self, parts: Sequence[tuple[Sequence[int], torch.Generator]]) -> Batch:
        """Training images of one step: ``parts`` are (image indices, generator) pairs (one per
        task), each part's images augmented in order from its generator."""
        raise NotImplementedError

    def eval_batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluation images (Resize + CenterCrop): x on the loader's device, labels on the CPU.
        An unreadable image raises :class:`BadImageError`."""
        raise NotImplementedError

    def prefetch(self, requests: Iterable[Sequence[tuple[Sequence[int], torch.Generator]]],
                 depth: int = 2) -> Iterator[Batch]:
        """Yields :meth:`train_batch` of each request in order, the next ``depth`` loading in a
        background thread meanwhile; the time spent waiting for them adds to ``wait_s``. The
        batches are ready for use on the current stream of the consuming thread."""
        requests = iter(requests)
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

        def produce(parts):
            if stream is None:
                return self.train_batch(parts)
            with torch.cuda.stream(stream):
                batch = self.train_batch(parts)
                batch.ready = torch.cuda.Event()
                batch.ready.record(stream)
            return batch

        with ThreadPoolExecutor(1, thread_name_prefix="nad-prefetch") as producer:
            pending = deque()
            for parts in requests:
                pending.append(producer.submit(produce, parts))
                if len(pending) >= depth:
                    break
            while pending:
                start = time.perf_counter()
                batch = pending.popleft().result()
                self.wait_s += time.perf_counter() - start
                nxt = next(requests, None)
                if nxt is not None:
                    pending.append(producer.submit(produce, nxt))
                yield self._handoff(batch)

    def _handoff(self, batch: Batch) -> Batch:
        if batch.ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(batch.ready)
            for t in (batch.x, batch.labels):
                if t.is_cuda:  # made on the loader's stream, used on this one
                    t.record_stream(current)
        batch.x = batch.x.to(self.device, non_blocking=True)
        batch.labels = batch.labels.to(self.device, non_blocking=True)
        return batch

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _labels(self, indices) -> torch.Tensor:
        return torch.tensor([self.images.labels[i] for i in indices], dtype=torch.int64)

    def _map(self, fn, items: Sequence) -> list:
        """``[fn(x) for x in items]`` on the worker threads, in a few contiguous chunks per thread
        (one job per image costs more than a small image's work)."""
        step = max(1, -(-len(items) // (2 * self.workers)))
        chunks = [items[i: i + step] for i in range(0, len(items), step)]
        return [y for chunk in self._pool.map(lambda c: [fn(x) for x in c], chunks) for y in chunk]


def _one_thread() -> None:
    # PyTorch sets a thread's team size from its default on the thread's first parallel call:
    # make that call first, so that the setting below stays.
    torch.get_num_threads()
    torch.set_num_threads(1)


def single_threaded_pool(workers: int) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads whose PyTorch kernels run single-threaded.

    Each loader thread works on one image at a time. Were every small kernel (a 224-pixel resize)
    to fork a team of intra-op threads, the loader threads and the training step would fight
    over the same cores: on the 2-core machine a resize took 15-20 ms instead of 1.4 ms with two
    threads of each (benchmarks/RESULTS.md). ``torch.set_num_threads`` in a thread sets that
    thread's OpenMP team size and, as a side effect, PyTorch's default for threads started later;
    that default is put back once all workers have started.
    """
    default = torch.get_num_threads()  # also fixes this thread's own setting first
    started = threading.Barrier(workers + 1)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="nad-data", initializer=_one_thread)
    for _ in range(workers):  # one blocking job per worker: every thread starts now
        pool.submit(started.wait)
    started.wait()
    torch.set_num_threads(default)
    return pool


class ExactLoader(BatchLoader):
    """The reference pipeline: :meth:`ImageSet.load` and the per-image transforms of
    :mod:`nad_ext.data.transforms`, one thread per task part. Batches are made on the CPU."""

    kind = "exact"

    def train_batch(self, parts):
        starts = [0]
        for indices, _ in parts:
            starts.append(starts[-1] + len(indices))
        out = torch.empty(starts[-1], 3, self.size, self.size)  # each thread fills its parts' rows

        def one(k):
            indices, generator = parts[k]
            kept = []
            for i in indices:
                try:
                    image = self.images.load(i)
                except (ValueError, OSError) as err:
                    self.bad.report(err)
                    continue
                out[starts[k] + len(kept)] = transforms.train_transform(image, self.size, generator)
                kept.append(i)
            return kept

        kept = list(self._pool.map(one, range(len(parts))))
        if sum(map(len, kept)) < len(out):  # images were skipped: close the gaps
            out = torch.cat([out[starts[k]: starts[k] + len(kept[k])] for k in range(len(parts))])
        return Batch(out, self._labels([i for part in kept for i in part]), [len(part) for part in kept])

    def eval_batch(self, indices):
        indices = list(indices)
        out = torch.empty(len(indices), 3, self.size, self.size)

        def one(k):
            try:
                out[k] = transforms.eval_transform(self.images.load(indices[k]), self.size)
            except (ValueError, OSError) as err:
                self.bad.report(err, policy="stop")

        self._map(one, range(len(indices)))
        return out.to(self.device), self._labels(indices)


# ----------------------------------------------------------------------------------------------
# The fast pipeline


class FastLoader(BatchLoader):
    """The fast pipeline (see the module docstring). ``batched``: resample with
    :func:`~nad_ext.data.batch_transforms.resample_batched` (default: on CUDA) instead of image by image."""

    kind = "fast"

    def __init__(self, images, size, device, on_bad_image, workers, batched: bool | None = None):
        super().__init__(images, size, device, on_bad_image, workers)
        self._cuda = device.type == "cuda"
        self._batched = self._cuda if batched is None else batched
        fetch = getattr(images, "fetch", None)  # prepared caches hand over stored images
        if fetch is not None:
            self._fetch = fetch
        elif type(images).load is not ImageSet.load:  # a subclass that reads its own way
            self._fetch = lambda i: Fetched(f"{images.name}[{i}]", pixels=images.load(i))
        elif images.tensor is not None:
            # Channels-last: the layout torchvision's uint8 resize kernel works in on the CPU.
            store = images.tensor.contiguous(memory_format=torch.channels_last)
            if self._cuda:  # uploaded once; the loader's own stream reads it later
                store = store.to(device)
                torch.cuda.current_stream(device).synchronize()
            self._fetch = lambda i: Fetched(f"{images.name}[{i}]", pixels=store[i])
        else:
            self._fetch = self._read_file

    def _read_file(self, i: int) -> Fetched:
        path = self.images.paths[i]
        try:
            encoded = path.read_bytes()
        except OSError as err:
            raise BadImageError(f"cannot read image file {path}: {err}") from err
        return Fetched(str(path), jpeg=torch.frombuffer(bytearray(encoded), dtype=torch.uint8))

    def _load(self, i: int):
        """Image i fetched, and decoded unless nvjpeg will decode it; an exception if it can't be."""
        try:
            item = self._fetch(i)
            if item.jpeg is not None and not (self._cuda and nvjpeg_can(item.jpeg)):
                item.pixels, item.jpeg = decode_cpu(item.jpeg, item.where), None
            return item
        except (ValueError, OSError, RuntimeError) as err:
            if isinstance(err, BadImageError):
                return err
            where = self.images.paths[i] if self.images.paths is not None else f"{self.images.name}[{i}]"
            return BadImageError(f"cannot read image {where}: {err}")

    def _load_all(self, indices: Sequence[int]) -> list:
        items = self._map(self._load, list(indices))
        if self._cuda:
            self._decode_on_device(items)
        for item in items:
            if isinstance(item, Fetched) and item.size is None:
                item.size = tuple(item.pixels.shape[-2:])
        return items

    def _decode_on_device(self, items: list) -> None:
        """Decodes the items that still hold JPEG bytes as one nvjpeg batch (those it refuses on the
        CPU); moves pixels decoded on the CPU to the device."""
        todo = [k for k, item in enumerate(items) if isinstance(item, Fetched) and item.jpeg is not None]
        for k, pixels in zip(todo, decode_batch_cuda([items[k].jpeg for k in todo], [items[k].where for k in todo],
                                                     self.device)):
            if isinstance(pixels, Exception):
                items[k] = pixels
            else:
                items[k].pixels, items[k].jpeg = pixels, None
        for item in items:
            if isinstance(item, Fetched) and item.pixels.device != self.device:
                item.pixels = item.pixels.to(self.device, non_blocking=True)

    def _resample(self, pixels: list[torch.Tensor], windows: list, flips: list[bool]) -> torch.Tensor:
        if self._batched:
            out = bt.resample_batched(pixels, torch.tensor(windows, dtype=torch.int64), self.size)
            return bt.flip_and_normalise(out, flips)
        out = torch.empty(len(pixels), 3, self.size, self.size)

        def one(k):  # image by image in the worker threads, each single-threaded
            image = bt.resample_each(pixels[k], *windows[k], self.size)
            out[k] = bt.normalise(image.flip(-1) if flips[k] else image)

        self._map(one, range(len(pixels)))
        return out

    def train_batch(self, parts):
        items = self._load_all([i for indices, _ in parts for i in indices])
        pixels, windows, flips, kept, counts = [], [], [], [], []
        pos = 0
        for indices, generator in parts:
            count = 0
            for i in indices:
                item = items[pos]
                pos += 1
                if isinstance(item, Exception):
                    self.bad.report(item)
                    continue
                top, left, h, w, flip = transforms.train_crop_params(*item.size, generator)
                box = bt.map_box((top, left, h, w), item.size, tuple(item.pixels.shape[-2:]))
                pixels.append(item.pixels)
                windows.append(bt.train_windows(*box, self.size))
                flips.append(flip)
                kept.append(i)
                count += 1
            counts.append(count)
        return Batch(self._resample(pixels, windows, flips), self._labels(kept), counts)

    def eval_batch(self, indices):
        indices = list(indices)
        items = self._load_all(indices)
        windows = []
        for item in items:
            if isinstance(item, Exception):
                self.bad.report(item, policy="stop")
            grid = tuple(item.pixels.shape[-2:])
            y, x = bt.eval_windows(*item.size, self.size)
            # On a prepared cache's copy the resize starts from the stored size.
            windows.append(((0, grid[0]) + y[2:], (0, grid[1]) + x[2:]))
        x = self._resample([item.pixels for item in items], windows, [False] * len(items))
        return x, self._labels(indices)
