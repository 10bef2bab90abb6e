"""Input pipeline throughput: images per second to a ready (N, 3, S, S) float32 training batch on
the step's device, for the exact pipeline, the fast pipeline and the prepared caches, measured
side by side in one run (timings on shared machines drift, ratios hold).

The data: an ImageNet-like folder generated here (no downloads): ``--count`` JPEGs of 500 x 375
at quality 90 (crops of multi-scale noise with the spectrum of natural images, ~80 KB each,
about the size of an ImageNet training JPEG), in 10 class folders; kept in ``--dir`` between runs. Each
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

from bench_step import timed  # the median of timed runs, synchronised on CUDA
from nad_ext.data import batch_transforms as bt
from nad_ext import data
from nad_ext.data import cache as datacache
from nad_ext.data import pipeline


def make_folder(root: Path, count: int, classes: int = 10, seed: int = 0) -> None:
    """``count`` JPEGs (500 x 375, quality 90) under root/train/<class>/: crops of a few large
    canvases of multi-scale noise (the spectrum of natural images), each with its own fine noise."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    marker = root / "settings.json"
    settings = {"count": count, "classes": classes, "seed": seed, "version": 2}
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return
    shutil.rmtree(root, ignore_errors=True)
    for c in range(classes):
        (root / "train" / f"class{c:02d}").mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    h, w, ch, cw = 375, 500, 750, 1000
    canvases = torch.zeros(max(1, count // 50), 3, ch, cw)
    for cells, amp in ((8, 0.5), (32, 0.25), (128, 0.12), (256, 0.2), (500, 0.5)):
        small = torch.randn(len(canvases), 3, cells * ch // cw, cells, generator=gen)
        canvases += amp * F.interpolate(small, size=(ch, cw), mode="bicubic", align_corners=False)
    corners = torch.randint(0, ch - h, (count,), generator=gen).tolist(), torch.randint(0, cw - w, (count,),
                                                                                          generator=gen).tolist()

    def save(k):
        image = canvases[k % len(canvases), :, corners[0][k]: corners[0][k] + h, corners[1][k]: corners[1][k] + w]
        image = image + torch.randn(3, h, w, generator=torch.Generator().manual_seed(seed * 100_003 + k)) * 0.12
        image = ((image - image.min()) / (image.max() - image.min()) * 255).to(torch.uint8)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(
            root / "train" / f"class{k % classes:02d}" / f"{k:05d}.jpg", quality=90)

    with ThreadPoolExecutor(torch.get_num_threads()) as pool:
        list(pool.map(save, range(count)))
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

    pool = pipeline.single_threaded_pool(workers or min(torch.get_num_threads(), 16))
    listed = windows.tolist()

    def each():
        out = torch.empty(len(images), 3, size, size, dtype=torch.uint8)

        def one(k):
            out[k] = bt.resample_each(images[k], *listed[k], size)

        list(pool.map(one, range(len(images))))
        return out.to(device)

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
        out = fn()  # also the warm-up
        diff = (out.float().cpu() - reference).abs().mean().item()
        rows.append((name, timed(fn, device, warmup=0, repeats=repeats) / len(images) * 1e3, diff))
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
    parser.add_argument("--disentangle", metavar="MODEL",
                        help="also run `disentangle` end to end on the folder (fast pipeline, random weights, "
                             "3 epochs) and report the last epoch's images/s and data wait; compare with "
                             "bench_step.py's img/s for MODEL")
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
    # Pixel agreement with the exact pipeline on the same draws (one step's batch; eval batch).
    levels = torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1) * 255  # normalised units -> grey levels
    agreement = {}
    if "exact" in loaders:
        parts = requests(len(files), args.tasks, args.batch, 12345)[0]
        sample = [i for indices, _ in parts for i in indices][: 4 * args.batch]
        reference = loaders["exact"].train_batch(parts).x
        reference_eval = loaders["exact"].eval_batch(sample)[0]
        for name, loader in loaders.items():
            train_diff = (loader.train_batch(requests(len(files), args.tasks, args.batch, 12345)[0]).x.cpu()
                          - reference).abs() * levels
            eval_diff = (loader.eval_batch(sample)[0].cpu() - reference_eval).abs() * levels
            agreement[name] = (train_diff.mean().item(), train_diff.max().item(), eval_diff.mean().item(),
                               eval_diff.max().item())
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

    if agreement:
        print("\npixels against the exact pipeline, same draws (grey levels):")
        print("| path | training batch: mean abs. diff. | max | evaluation batch: mean | max |")
        print("|---|---|---|---|---|")
        for name, (tm, tx, em, ex) in agreement.items():
            print(f"| {name} | {tm:.3f} | {tx:.0f} | {em:.3f} | {ex:.0f} |")

    print(f"\ncrop + resize of 64 decoded 500x375 images to {args.size} on {device}:")
    print("| method | ms per image | mean abs. difference to the exact pixels (grey levels) |")
    print("|---|---|---|")
    for name, ms, diff in resample_table(folder, args.size, device, max(args.repeats, 3), args.workers):
        print(f"| {name} | {ms:.3f} | {diff:.3f} |")

    if args.disentangle:
        end_to_end(args.disentangle, train, device, args)


def end_to_end(name: str, train, device: torch.device, args) -> None:
    """``disentangle`` on the folder through the fast pipeline: the last of 3 epochs."""
    import tempfile

    from nad_ext import models
    from nad_ext.training import NADConfig, Network, disentangle

    torch.manual_seed(0)
    model = models.load_model(name, num_classes=len(train.classes))
    config = NADConfig(epochs=3, image_size=args.size, tasks_per_step=args.tasks, device=str(device),
                       data_pipeline="fast", keep_every_epoch=False)
    with tempfile.TemporaryDirectory() as out:
        disentangle(Network(model, name, name), train, config=config, out_dir=out, progress=False)
        last = json.loads((Path(out) / "log.json").read_text())["epochs"][-1]
    total = last["data_wait_s"] + last["step_s"]
    print(f"\ndisentangle {name} on {device} (fast pipeline, last of 3 epochs): "
          f"{last['images_per_second']:,.0f} images/s, data wait {last['data_wait_s']:.2f} s of {total:.2f} s "
          f"({last['data_wait_s'] / total:.0%})")


if __name__ == "__main__":
    main()
