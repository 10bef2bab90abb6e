"""Input pipeline throughput: images per second to a ready (N, 3, S, S) float32 training batch on
the step's device, for the exact pipeline, the fast pipeline and the prepared caches, measured
side by side in one run (timings on shared machines drift, ratios hold).

The data: an ImageNet-like folder generated here (no downloads): ``--count`` JPEGs of 500 x 375
at quality 90 (multi-scale noise with the spectrum of natural images, ~80 KB each, about the
size of an ImageNet training JPEG), in 10 class folders; kept in ``--dir`` between runs. Each
measured pass loads every image once as the trainer does: steps of ``--tasks`` task batches of
``--batch`` images, every batch augmented from its own generator, the next steps loading in the
background (``BatchLoader.prefetch``), the batch ready on the device (CUDA synchronised).

- exact: PIL decode + torchvision transforms per image (``data_pipeline="exact"``);
- fast: libjpeg-turbo (CPU) or batched nvjpeg (CUDA) decode, crops on the step's device;
- cache-raw / cache-jpeg: ``nad prepare-data`` caches (uint8 pixels / re-encoded JPEG), read by
  the fast pipeline; "first pass" includes the per-image checksum verification of a process's
  first read, the main number is a later pass.

A second table times the crop + resize of one batch of decoded images three ways: image by image
with torchvision's kernel (the fast path on the CPU), the batched matrix products (the fast path on
CUDA) and ``torchvision.ops.roi_align`` with an adaptive sampling ratio (box-filter antialiasing).

Usage:  python benchmarks/bench_data.py                 # 2,000 images, all paths, device auto
        python benchmarks/bench_data.py --count 300 --repeats 2
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nad_ext import batch_transforms as bt
from nad_ext import data, datacache, pipeline


def make_folder(root: Path, count: int, classes: int = 10, seed: int = 0) -> None:
    """``count`` JPEGs (500 x 375, quality 90) of multi-scale noise under root/train/<class>/."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    marker = root / "settings.json"
    settings = {"count": count, "classes": classes, "seed": seed, "version": 1}
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return
    shutil.rmtree(root, ignore_errors=True)
    for c in range(classes):
        (root / "train" / f"class{c:02d}").mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    h, w, block = 375, 500, 64

    def save(k, array):
        Image.fromarray(array).save(root / "train" / f"class{k % classes:02d}" / f"{k:05d}.jpg", quality=90)

    with ThreadPoolExecutor(torch.get_num_threads()) as pool:
        for lo in range(0, count, block):
            n = min(block, count - lo)
            image = torch.zeros(n, 3, h, w)
            for cells, amp in ((4, 0.5), (16, 0.25), (64, 0.12), (128, 0.2), (250, 0.5)):
                small = torch.randn(n, 3, max(2, cells * h // w), cells, generator=gen)
                image += amp * F.interpolate(small, size=(h, w), mode="bicubic", align_corners=False)
            image += torch.randn(n, 3, h, w, generator=gen) * 0.12
            lo_v, hi_v = image.amin((1, 2, 3), keepdim=True), image.amax((1, 2, 3), keepdim=True)
            arrays = ((image - lo_v) / (hi_v - lo_v) * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
            list(pool.map(save, range(lo, lo + n), arrays))
    marker.write_text(json.dumps(settings))


def requests(n: int, tasks: int, batch: int, seed: int):
    """One pass over images 0..n-1 in steps of ``tasks`` parts of ``batch`` images."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    parts = [(order[i: i + batch], torch.Generator().manual_seed(seed * 7919 + i)) for i in range(0, n, batch)]
    return [parts[i: i + tasks] for i in range(0, len(parts), tasks)]


def one_pass(loader, n: int, args, seed: int) -> float:
    """Images per second of one pass through ``loader.prefetch``."""
    device = loader.device
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    seen = 0
    for batch in loader.prefetch(requests(n, args.tasks, args.batch, seed)):
        assert batch.x.shape[1:] == (3, args.size, args.size) and batch.x.device.type == device.type
        seen += len(batch.labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def resample_table(folder: Path, size: int, device: torch.device, repeats: int, workers: int | None):
    """ms per image for the crop + resize of 64 decoded images, three ways, as the pipeline would
    run them: image by image on the loader's single-threaded worker threads, the batched ways on
    the device (on the CPU with all intra-op threads)."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.ops import roi_align

    files = sorted((folder / "train").rglob("*.jpg"))[:64]
    images = [decode_jpeg(torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8), mode=ImageReadMode.RGB)
              for f in files]
    gen = torch.Generator().manual_seed(0)
    boxes = [data.train_crop_params(*im.shape[-2:], gen)[:4] for im in images]
    windows = torch.tensor([bt.train_windows(*b, size) for b in boxes])
    on_device = [im.to(device) for im in images]

    pool = pipeline._single_threaded_pool(workers or min(torch.get_num_threads(), 16))
    listed = windows.tolist()

    def each():
        out = list(pool.map(lambda k: bt.resample_each(images[k], *listed[k], size), range(len(images))))
        return torch.stack(out).to(device)

    def batched():
        return bt.resample_batched(on_device, windows, size)

    padded = torch.zeros(len(images), 3, max(i.shape[1] for i in images), max(i.shape[2] for i in images),
                         device=device)
    for k, im in enumerate(on_device):
        padded[k, :, : im.shape[1], : im.shape[2]] = im
    rois = torch.tensor([[k, b[1], b[0], b[1] + b[3], b[0] + b[2]] for k, b in enumerate(boxes)],
                        dtype=torch.float32, device=device)

    def roi():  # sampling_ratio=0: ceil(box / output) samples per bin, averaged
        return roi_align(padded, rois, (size, size), 1.0, 0, aligned=True)

    reference = torch.stack([bt.resample_each(im, *w.tolist(), size) for im, w in zip(images, windows)]).float()
    rows = []
    for name, fn in (("image by image (torchvision uint8 kernel)", each), ("batched matrix products", batched),
                     ("roi_align, adaptive sampling (padded batch)", roi)):
        out = fn()
        diff = (out.float().cpu() - reference).abs().mean().item()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        rows.append((name, statistics.median(times) / len(images) * 1e3, diff))
    pool.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16, help="images per task batch")
    parser.add_argument("--tasks", type=int, default=16, help="task batches per step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=None, help="loader threads (default: one per core, <= 16)")
    parser.add_argument("--paths", nargs="+", default=["exact", "fast", "cache-raw", "cache-jpeg"])
    parser.add_argument("--dir", default=".nad_cache/bench_data")
    args = parser.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    folder = Path(args.dir)

    start = time.perf_counter()
    make_folder(folder, args.count)
    files = sorted((folder / "train").rglob("*.jpg"))
    mb = sum(f.stat().st_size for f in files) / 1e6
    print(f"data: {len(files)} JPEGs 500x375 q90, {mb:.0f} MB ({mb * 1e3 / len(files):.0f} KB each) in {folder} "
          f"({time.perf_counter() - start:.0f} s)")
    train = data.image_folder(folder, "train")
    sets = {"exact": train, "fast": train}
    for encoding in ("raw", "jpeg"):
        if f"cache-{encoding}" not in args.paths:
            continue
        out = folder / f"cache_{encoding}_{args.size}"
        start = time.perf_counter()
        datacache.prepare(folder, out, args.size, encoding=encoding, overwrite=True, progress=False,
                          workers=args.workers)
        size_mb = (out / datacache.IMAGES_FILE).stat().st_size / 1e6
        print(f"cache-{encoding}: prepared in {time.perf_counter() - start:.1f} s, {size_mb:.0f} MB")
        sets[f"cache-{encoding}"] = datacache.open_split(out, "train")

    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
          f"steps of {args.tasks} x {args.batch} images, {args.size}x{args.size}")
    loaders = {name: pipeline.make_loader(sets[name], args.size, device, "exact" if name == "exact" else "fast",
                                          workers=args.workers) for name in args.paths}
    first = {}
    for name, loader in loaders.items():  # warm-up: page cache, threads, cuDNN/nvjpeg handles, checksums
        first[name] = one_pass(loader, len(files) if name.startswith("cache") else min(len(files), 256), args, 99)
    results = {name: [] for name in loaders}
    for r in range(args.repeats):  # interleaved, so that drifts of a shared machine hit every path alike
        for name, loader in loaders.items():
            results[name].append(one_pass(loader, len(files), args, r))
    for loader in loaders.values():
        loader.close()

    base = results.get("exact")
    print(f"\n| path | images/s (median of {args.repeats}) | runs | ratio to exact (median) |")
    print("|---|---|---|---|")
    for name, values in results.items():
        ratio = statistics.median(v / b for v, b in zip(values, base)) if base else float("nan")
        note = f"; first pass {first[name]:.0f}" if name.startswith("cache") else ""
        print(f"| {name} | {statistics.median(values):,.0f} | {', '.join(f'{v:.0f}' for v in values)}{note} "
              f"| {ratio:.2f} |")

    print(f"\ncrop + resize of 64 decoded 500x375 images to {args.size} on {device}:")
    print("| method | ms per image | mean abs. difference to the exact pixels (grey levels) |")
    print("|---|---|---|")
    for name, ms, diff in resample_table(folder, args.size, device, max(args.repeats, 3), args.workers):
        print(f"| {name} | {ms:.3f} | {diff:.3f} |")


if __name__ == "__main__":
    main()
