"""Input pipeline throughput: images per second to a ready (N, 3, S, S) float32 training batch on
the step's device, for the exact pipeline, the fast pipeline and the prepared caches, measured
side by side in one run (``harness.measure``: interleaved passes, medians and interquartile
ranges, the exact pipeline the baseline).

The data: an ImageNet-like folder generated here (no downloads): ``--count`` JPEGs of 500 x 375
at quality 90 (crops of multi-scale noise with the spectrum of natural images, ~80 KB each,
about the size of an ImageNet training JPEG), in 10 class folders; kept in ``--dir`` between runs. Each
timed call is one pass that loads every image once as the trainer does: steps of ``--tasks`` task
batches of ``--batch`` images, every batch augmented from its own generator, the next steps loading
in the background (``BatchLoader.prefetch``), the batch ready on the device (CUDA synchronised).

- exact: PIL decode + torchvision transforms per image (``data_pipeline="exact"``): the baseline;
- fast: libjpeg-turbo (CPU) or batched nvjpeg (CUDA) decode, crops on the step's device;
- cache-raw / cache-jpeg: ``nad prepare-data`` caches (uint8 pixels / re-encoded JPEG), read by
  the fast pipeline; the first pass (``first_call_s``) includes the per-image checksum
  verification of a process's first read.

Before any timing each path's batches are compared with the exact pipeline's on the same draws
(one step's training batch and an evaluation batch, in grey levels): the fast path must give the
exact pixels (within 0.5 grey levels mean; it is bit-exact on the CPU), the caches within their
resolution / re-encoding (10 grey levels mean; measured 3.9 and 6.6).

A second comparison times the crop + resize of 64 decoded images three ways: image by image with
torchvision's kernel (the fast path on the CPU; the baseline), the batched matrix products (the
fast path on CUDA) and ``torchvision.ops.roi_align`` with an adaptive sampling ratio (box-filter
antialiasing), each checked against the exact pixels first.

Usage:  python benchmarks/bench_data.py                 # 2,000 images, all paths, device auto
        python benchmarks/bench_data.py --count 300 --repeats 2
        pytest benchmarks/bench_data.py                 # 300 images, CPU
"""
from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from nad_ext import data  # noqa: E402
from nad_ext.data import batch_transforms as bt  # noqa: E402
from nad_ext.data import cache as datacache  # noqa: E402
from nad_ext.data import pipeline  # noqa: E402

PATHS = ["exact", "fast", "cache-raw", "cache-jpeg"]
# Largest mean difference to the exact pixels (grey levels) a path may show: (training, evaluation).
TOLERANCE = {"fast": (0.5, 0.5), "cache-raw": (10.0, 0.5), "cache-jpeg": (10.0, 10.0)}


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


def one_pass(loader, n: int, size: int, tasks: int, batch: int, seed: int) -> int:
    """Loads one pass through ``loader.prefetch``; returns the images seen."""
    device = loader.device
    seen = 0
    for out in loader.prefetch(requests(n, tasks, batch, seed)):
        assert out.x.shape[1:] == (3, size, size) and out.x.device.type == device.type
        seen += len(out.labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen


def pixel_checker(name: str, loader, reference, n: int, size: int, tasks: int, batch: int):
    """The check of ``name``: its training and evaluation batches against the exact pipeline's."""
    levels = torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1) * 255  # normalised units -> grey levels
    parts = requests(n, tasks, batch, 12345)[0]
    sample = [i for indices, _ in parts for i in indices][: 4 * batch]

    def check(_) -> str:
        train = (loader.train_batch(requests(n, tasks, batch, 12345)[0]).x.cpu() - reference["train"]).abs() * levels
        evals = (loader.eval_batch(sample)[0].cpu() - reference["eval"]).abs() * levels
        tm, em = train.mean().item(), evals.mean().item()
        limit_t, limit_e = TOLERANCE[name]
        assert tm <= limit_t and em <= limit_e, (f"mean difference to the exact pixels {tm:.2f} (training batch), "
                                                 f"{em:.2f} (evaluation) grey levels; at most {limit_t}, {limit_e}")
        return (f"passed (grey levels to exact: training mean {tm:.3f} max {train.max().item():.0f}, "
                f"evaluation mean {em:.3f} max {evals.max().item():.0f})")

    def reference_check(_) -> str:
        reference["train"] = loader.train_batch(parts).x.cpu()
        reference["eval"] = loader.eval_batch(sample)[0].cpu()
        return "the reference (exact pipeline)"
    return reference_check if name == "exact" else check


def pipeline_comparison(folder: Path, count: int, size: int, batch: int, tasks: int, device: torch.device,
                        workers: int | None, paths=PATHS, log=print) -> harness.Comparison:
    make_folder(folder, count)
    files = sorted((folder / "train").rglob("*.jpg"))
    mb = sum(f.stat().st_size for f in files) / 1e6
    log(f"data: {len(files)} JPEGs 500x375 q90, {mb:.0f} MB ({mb * 1e3 / len(files):.0f} KB each) in {folder}")
    train = data.image_folder(folder, "train")
    sets = {"exact": train, "fast": train}
    prepared = {}
    for encoding in ("raw", "jpeg"):
        if f"cache-{encoding}" not in paths:
            continue
        out = folder / f"cache_{encoding}_{size}"
        start = time.perf_counter()
        datacache.prepare(folder, out, size, encoding=encoding, overwrite=True, progress=False, workers=workers)
        prepared[f"cache-{encoding}"] = {"prepare_s": round(time.perf_counter() - start, 2),
                                         "cache_MB": round((out / datacache.IMAGES_FILE).stat().st_size / 1e6, 1)}
        log(f"cache-{encoding}: prepared in {prepared[f'cache-{encoding}']['prepare_s']} s, "
            f"{prepared[f'cache-{encoding}']['cache_MB']} MB")
        sets[f"cache-{encoding}"] = datacache.open_split(out, "train")
    paths = ["exact", *[p for p in paths if p != "exact"]]  # the baseline and the pixels' reference
    loaders = {name: pipeline.make_loader(sets[name], size, device, "exact" if name == "exact" else "fast",
                                          workers=workers) for name in paths}
    reference: dict = {}
    seeds = itertools.count()
    timed = []
    for name, loader in loaders.items():
        run = (lambda loader: lambda: one_pass(loader, len(files), size, tasks, batch, next(seeds)))(loader)
        timed.append(harness.Path(name, run, pixel_checker(name, loader, reference, len(files), size, tasks, batch),
                                  name, items=len(files), unit="img/s",
                                  targets=["data-cpu-4x"] if name != "exact" else []))
        if name == "fast":
            timed[-1].targets = ["data-cpu-4x", "data-cuda-10k"]
    comparison = harness.Comparison(f"input pipeline, {len(files)} JPEGs to {size}x{size} batches [{device.type}]",
                                    timed, "exact", str(device),
                                    {"images": len(files), "image_size": size, "tasks_per_step": tasks,
                                     "images_per_task": batch, "workers": workers, "caches": prepared})
    comparison.cleanup += [loader.close for loader in loaders.values()]
    return comparison


def resample_comparison(folder: Path, size: int, device: torch.device, workers: int | None,
                        images: int = 64) -> harness.Comparison:
    """The crop + resize of ``images`` decoded images, three ways, as the pipeline would run them:
    image by image on the loader's single-threaded worker threads, the batched ways on the device
    (on the CPU with all intra-op threads)."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.ops import roi_align

    files = sorted((folder / "train").rglob("*.jpg"))[:images]
    decoded = [decode_jpeg(torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8), mode=ImageReadMode.RGB)
               for f in files]
    gen = torch.Generator().manual_seed(0)
    boxes = [data.train_crop_params(*im.shape[-2:], gen)[:4] for im in decoded]
    windows = torch.tensor([bt.train_windows(*b, size) for b in boxes])
    on_device = [im.to(device) for im in decoded]
    pool = pipeline.single_threaded_pool(workers or min(torch.get_num_threads(), 16))
    listed = windows.tolist()

    def each():
        out = torch.empty(len(decoded), 3, size, size, dtype=torch.uint8)

        def one(k):
            out[k] = bt.resample_each(decoded[k], *listed[k], size)

        list(pool.map(one, range(len(decoded))))
        return out.to(device)

    def batched():
        return bt.resample_batched(on_device, windows, size)

    padded = torch.zeros(len(decoded), 3, max(i.shape[1] for i in decoded), max(i.shape[2] for i in decoded),
                         device=device)
    for k, im in enumerate(on_device):
        padded[k, :, : im.shape[1], : im.shape[2]] = im
    rois = torch.tensor([[k, b[1], b[0], b[1] + b[3], b[0] + b[2]] for k, b in enumerate(boxes)],
                        dtype=torch.float32, device=device)

    def roi():  # sampling_ratio=0: ceil(box / output) samples per bin, averaged
        return roi_align(padded, rois, (size, size), 1.0, 0, aligned=True)

    reference = torch.stack([bt.resample_each(im, *w.tolist(), size) for im, w in zip(decoded, windows)]).float()

    def close_to_exact(limit):
        def check(out) -> str:
            diff = (out.float().cpu() - reference).abs().mean().item()
            assert diff <= limit, f"mean difference to the exact pixels {diff:.3f} grey levels, at most {limit}"
            return f"passed (mean abs. difference to the exact pixels {diff:.3f} grey levels)"
        return check

    paths = [harness.Path("image-by-image", each, close_to_exact(0.0), "torchvision's uint8 kernel per image, "
                          "single-threaded worker threads", items=len(decoded), unit="img/s"),
             harness.Path("batched", batched, close_to_exact(0.1), "batched matrix products (the CUDA path)",
                          items=len(decoded), unit="img/s"),
             harness.Path("roi-align", roi, close_to_exact(3.0), "torchvision.ops.roi_align, adaptive sampling, "
                          "padded float batch", items=len(decoded), unit="img/s")]
    comparison = harness.Comparison(f"crop + resize of {len(decoded)} decoded 500x375 images to {size} "
                                    f"[{device.type}]", paths, "image-by-image", str(device), {"image_size": size})
    comparison.cleanup.append(pool.shutdown)
    return comparison


# ---- pytest-benchmark (CPU, 300 images; smoke: 24 images at 64 pixels) ------------------------------

@pytest.mark.benchmark(timer=harness.REPLAY)
@pytest.mark.parametrize("path", PATHS)
def test_pipeline(benchmark, suite, path):
    def make(smoke):
        count, size, batch, tasks = (24, 64, 4, 2) if smoke else (300, 224, 16, 4)
        return pipeline_comparison(Path(".nad_cache") / f"bench_data_{count}", count, size, batch, tasks,
                                   torch.device("cpu"), None, log=lambda line: None)
    suite.record(benchmark, "pipeline", make, path, rounds=3, warmup=0, min_sample_s=0.0)


@pytest.mark.benchmark(timer=harness.REPLAY)
@pytest.mark.parametrize("path", ["image-by-image", "batched", "roi-align"])
def test_resample(benchmark, suite, path):
    def make(smoke):
        count = 24 if smoke else 300
        folder = Path(".nad_cache") / f"bench_data_{count}"
        make_folder(folder, count)
        return resample_comparison(folder, 64 if smoke else 224, torch.device("cpu"), None, 8 if smoke else 64)
    suite.record(benchmark, "resample", make, path, rounds=5, warmup=1, min_sample_s=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16, help="images per task batch")
    parser.add_argument("--tasks", type=int, default=16, help="task batches per step")
    parser.add_argument("--repeats", "--rounds", type=int, default=3, help="interleaved passes per path")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=None, help="loader threads (default: one per core, <= 16)")
    parser.add_argument("--paths", nargs="+", default=PATHS, choices=PATHS)
    parser.add_argument("--dir", default=".nad_cache/bench_data")
    parser.add_argument("--threads", type=int, default=None, help="PyTorch intra-op threads (default: PyTorch's)")
    parser.add_argument("--smoke", action="store_true", help="24 images at 64 pixels, one pass per path")
    parser.add_argument("--json", metavar="PATH", help="where the JSON goes (default .benchmarks/bench_data/...)")
    parser.add_argument("--disentangle", metavar="MODEL",
                        help="also run `disentangle` end to end on the folder (fast pipeline, random weights, "
                             "3 epochs) and report the last epoch's images/s and data wait; compare with "
                             "bench_step.py's img/s for MODEL")
    args = parser.parse_args()
    harness.set_threads(args.threads)
    started = harness.load_average()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.smoke:
        args.count, args.size, args.batch, args.tasks, args.dir = 24, 64, 4, 2, args.dir + "_smoke"
    folder = Path(args.dir)
    print(harness.header(device, f"steps of {args.tasks} x {args.batch} images, {args.size}x{args.size}"))
    runs = []
    cmp = pipeline_comparison(folder, args.count, args.size, args.batch, args.tasks, device, args.workers, args.paths)
    results = harness.measure(cmp, rounds=args.repeats, warmup=0, min_sample_s=0.0, smoke=args.smoke)
    print(harness.table(results), flush=True)
    runs.append((cmp, results))
    cmp = resample_comparison(folder, args.size, device, args.workers, 8 if args.smoke else 64)
    results = harness.measure(cmp, rounds=max(args.repeats, 3), warmup=1, min_sample_s=0.0, smoke=args.smoke)
    print(harness.table(results), flush=True)
    runs.append((cmp, results))
    if args.disentangle:
        runs.append(end_to_end(args.disentangle, data.image_folder(folder, "train"), device, args))
    path = harness.write_json(args.json, runs, device, "bench_data.py", args.smoke, started)
    print(f"\nload average {' '.join(map(str, started))} at the start, "
          f"{' '.join(map(str, harness.load_average()))} at the end; JSON: {path}")


def end_to_end(name: str, train, device: torch.device, args):
    """``disentangle`` on the folder through the fast pipeline: the last of 3 epochs, as one result
    (one sample: the epoch's seconds; extra_info: the data wait)."""
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
    images = last["images"]
    res = harness.result(f"disentangle {name} end to end [{device.type}]", "disentangle-fast", [total],
                         baseline="disentangle-fast", baseline_samples=[total], timer="log.json: the last epoch",
                         note="the last of 3 epochs, fast pipeline", items=images, unit="img/s",
                         check="not checked here (a training run; python_tests check it)",
                         extra={"data_wait_s": last["data_wait_s"], "step_s": last["step_s"],
                                "images_per_second_logged": last["images_per_second"]})
    return None, [res]


if __name__ == "__main__":
    main()
