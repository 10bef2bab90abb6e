"""Per-image routing paths (issue 26): image-paths per second of
:func:`nad_ext.training.paths.learn_paths`, many images per step against one image at a time.

Paths, measured side by side in one run (``harness.measure``: interleaved rounds, medians and
interquartile ranges; CUDA-event times on a GPU), each learning the paths of the same images
with the same settings (steps, views per step, seed) from the same initial gates:

- ``one-at-a-time``: ``images_per_step=1``: each image's steps on its own views alone, the way
  CDRP and DNND optimise one image at a time: the baseline;
- ``batched-32``, ``batched-64`` (and on CUDA ``batched-256``): ``images_per_step`` images per
  step through the batched trainer (``train_step``, one task per image).

Before any timing each path's binary paths are checked against the baseline's (an image's path
does not depend on the images it is trained with: ``nad_ext.training.paths``): the share of
gates that agree must be at least 99.9% (float32; 99% under bf16 on a GPU), and the statuses
must be equal. The network has random weights (speed does not depend on them) and the target is
the network's own prediction (``target="prediction"``), so that every image trains.

With ``--fold`` the script compares, instead, batched paths of the zoo's four CNNs with the
network as written (``fuse="off"``) against the CPU's fast path (``fuse="fold"``: BatchNorm
folded, channels_last), checked to agree on at least 99.9% of the gates.

The issue's targets, printed after the tables (not rows of TARGETS.md): on the CPU the batched
trainer >= 5x the one-at-a-time loop in image-paths per second; on one H200, 10^5 images
(ResNet50 at 224x224) in under 30 minutes, i.e. >= 56 image-paths/s at the default steps and
views. The CUDA case runs only where there is a GPU (skipped, visibly, without one).

    python benchmarks/bench_paths.py                         # CPU: zoo_residual at 64x64, 64 images
    python benchmarks/bench_paths.py --cases cuda-resnet50   # the GPU machine: ResNet50 at 224x224
    python benchmarks/bench_paths.py --precision bfloat16    # CPU in bfloat16 (native on AVX512-BF16 / AMX CPUs)
    python benchmarks/bench_paths.py --fold                  # the zoo's CNNs: fuse off against the CPU's fuse fold
    pytest benchmarks/bench_paths.py                         # CPU: zoo_residual, 32 images, 5 steps
    pytest benchmarks/bench_paths.py --smoke                 # CI: tiny sizes, each path checked and run once
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from nad_ext import data, models  # noqa: E402
from nad_ext.training import Network  # noqa: E402
from nad_ext.training.paths import PathSettings, learn_paths  # noqa: E402

CUDA = torch.cuda.is_available()
ISSUE_CPU_SPEEDUP = 5.0  # issue 26: batched >= 5x one image at a time on the CPU
ISSUE_CUDA_IMAGES, ISSUE_CUDA_SECONDS = 100_000, 30 * 60  # issue 26: 10^5 images in 30 minutes on one H200


@dataclasses.dataclass
class Case:
    """One comparison: a network at a size, ``images`` images, the settings of every path, and
    the images per step of the batched paths (the baseline's is 1)."""

    device: str
    model: str
    size: int
    images: int
    steps: int
    views: int
    batched: tuple[int, ...]
    baseline_rounds: int | None = 1  # one-at-a-time is slow: timed by its checked call by default
    precision: str = "auto"  # PathSettings.precision of every path (bfloat16 on a CPU with native bf16: --precision)

    def smoke(self) -> "Case":
        """Tiny sizes, the same paths (each batched one then trains all 4 images in one step)."""
        return dataclasses.replace(self, size=min(self.size, 32), images=4, steps=2, views=2)


CASES = {
    "cpu-zoo_residual": Case("cpu", "zoo_residual", 64, 64, PathSettings.steps, PathSettings.views, (32, 64)),
    "cuda-resnet50": Case("cuda", "resnet50", 224, 256, PathSettings.steps, PathSettings.views, (32, 64, 256), 2),
}
PYTEST_CASES = {  # pytest's CPU run: fewer images and steps than the script's, the same ratio measured
    "cpu-zoo_residual": dataclasses.replace(CASES["cpu-zoo_residual"], images=32, steps=5, batched=(32,), baseline_rounds=2),
    "cuda-resnet50": CASES["cuda-resnet50"],
}


def image_set(case: Case):
    """``case.images`` generated images (all classes alike) at the case's size."""
    per_class = math.ceil(case.images / 10)
    return data.generated_shapes("val", images_per_class=per_class, image_size=max(case.size, 64))


def workload(case: Case):
    """The case's random-weight network, images and image indices, and a function of
    (images_per_step, fuse) that learns their paths."""
    device = torch.device(case.device)
    torch.manual_seed(0)
    net = models.load_model(case.model, num_classes=10)
    network = Network(net, case.model, case.model)
    images = image_set(case)
    indices = torch.randperm(len(images), generator=torch.Generator().manual_seed(1))[:case.images].tolist()
    spec = models.get_spec(case.model)
    beta = spec.beta if spec.beta is not None else 1.0

    def runner(per_step: int, fuse: str = "auto"):
        settings = PathSettings(steps=case.steps, views=case.views, images_per_step=per_step, chunk_size=case.images,
                                target="prediction", beta=beta, image_size=case.size, seed=0, device=str(device),
                                precision=case.precision, fuse=fuse)

        def run():
            with warnings.catch_warnings():  # images none of whose views the random network gets right
                warnings.simplefilter("ignore")
                return learn_paths(network, images, indices=indices, settings=settings, progress=False)
        return run
    return beta, runner


def agreement(chunk, ref) -> tuple[float, float]:
    """The share of gates whose binary paths agree between two runs, and the largest logit difference."""
    assert torch.equal(chunk.image_index, ref.image_index), "the images differ"
    assert torch.equal(chunk.status, ref.status), f"statuses differ: {chunk.status.tolist()} vs {ref.status.tolist()}"
    same = sum(int(((a > 0) == (b > 0)).sum()) for a, b in zip(chunk.logits, ref.logits))
    total = sum(a.numel() for a in chunk.logits)
    return same / total, max(float((a - b).abs().max()) for a, b in zip(chunk.logits, ref.logits))


def comparison(case: Case, name: str = "", smoke: bool = False) -> harness.Comparison:
    case = case.smoke() if smoke else case
    device = torch.device(case.device)
    beta, runner = workload(case)

    expected = {}
    # bf16 (the GPU default; fp32 gate logits): the batched and the one-image convolutions may
    # round differently, and gates near 0 may flip.
    low = device.type == "cuda" or case.precision == "bfloat16"
    floor = 0.99 if low else 0.999

    def check(label):
        def check_paths(chunk):
            if label == "one-at-a-time":
                expected["chunk"] = chunk
                return (f"the reference ({len(chunk)} images, {int((chunk.status == 0).sum())} with status ok, "
                        f"one image per step)")
            share, diff = agreement(chunk, expected["chunk"])
            assert share >= floor, (f"binary paths agree with one-at-a-time's on {share:.4%} of the gates (at "
                                    f"least {floor:.1%} expected); max logit difference {diff:.3g}")
            return f"passed (binary paths agree on {share:.4%} of gates; max logit difference {diff:.2g})"
        return check_paths

    labels = [("one-at-a-time", 1)] + [(f"batched-{b}", min(b, case.images)) for b in case.batched]
    paths = [harness.Path(label, runner(per_step), check(label),
                          f"images_per_step={per_step}" + (" (CDRP/DNND style)" if per_step == 1 else ""),
                          items=case.images, unit="image-paths/s",
                          max_rounds=case.baseline_rounds if per_step == 1 else None)
             for label, per_step in labels]
    group = (name or f"learn_paths {case.model} {case.size}x{case.size}") + f" [{device.type}]"
    return harness.Comparison(group, paths, "one-at-a-time", str(device), {
        "model": case.model, "image_size": case.size, "images": case.images, "steps": case.steps,
        "views": case.views, "images_per_step": [1, *case.batched], "beta": beta, "target": "prediction",
        "precision": case.precision,
        "weights": "random (load_model, seed 0)", "tf32": harness.tf32_settings()["text"]})


FOLD_MODELS = ("zoo_plain", "zoo_residual", "zoo_dense", "zoo_nas")


def fold_comparison(model: str, smoke: bool = False) -> harness.Comparison:
    """Batched paths (64 images per step, 3 steps) of the network as written (fuse "off") against
    the CPU's fast path (fuse "fold": BatchNorm folded, channels_last, float32): the same paths up
    to float32 rounding (at least 99.9% of the gates agree), checked before timing."""
    case = Case("cpu", model, 64, 64, 3, PathSettings.views, (64,))
    case = case.smoke() if smoke else case
    beta, runner = workload(case)
    expected = {}

    def check(fuse):
        def check_paths(chunk):
            if fuse == "off":
                expected["chunk"] = chunk
                return "the reference (the network as written)"
            share, diff = agreement(chunk, expected["chunk"])
            assert share >= 0.999, (f"binary paths agree with the unfolded network's on {share:.4%} of the gates "
                                    f"(at least 99.9% expected); max logit difference {diff:.3g}")
            return f"passed (binary paths agree on {share:.4%} of gates; max logit difference {diff:.2g})"
        return check_paths

    paths = [harness.Path(f"fuse-{fuse}", runner(case.images, fuse), check(fuse), what, items=case.images,
                          unit="image-paths/s")
             for fuse, what in (("off", "the network as written"), ("fold", "BatchNorm folded, channels_last"))]
    return harness.Comparison(f"learn_paths {model} {case.size}x{case.size}, fuse off vs fold [cpu]", paths,
                              "fuse-off", "cpu", {
                                  "model": model, "image_size": case.size, "images": case.images, "steps": case.steps,
                                  "views": case.views, "images_per_step": case.images, "beta": beta,
                                  "target": "prediction", "weights": "random (load_model, seed 0)"})


def issue_targets(case: Case, results: list[harness.Result], smoke: bool) -> list[str]:
    """The issue's targets against the results: lines to print (not TARGETS.md rows)."""
    if smoke:
        return ["issue 26 targets: not evaluated (smoke run, tiny sizes)"]
    lines = []
    for r in results[1:]:
        if case.device == "cpu":
            state = "met" if r.ratio >= ISSUE_CPU_SPEEDUP else "missed"
            lines.append(f"issue 26, CPU: {r.name} >= {ISSUE_CPU_SPEEDUP:g}x one-at-a-time in image-paths/s: "
                         f"{state} ({r.ratio:.3g}x, IQR {r.ratio_q1:.3g}-{r.ratio_q3:.3g})")
        else:
            seconds = ISSUE_CUDA_IMAGES / r.rate
            state = "met" if seconds <= ISSUE_CUDA_SECONDS else "missed"
            lines.append(f"issue 26, GPU: {ISSUE_CUDA_IMAGES:,} images at {r.rate:,.1f} image-paths/s ({r.name}) take "
                         f"{seconds / 60:.1f} min (target 30 min): {state}")
    return lines


# ---- pytest-benchmark ------------------------------------------------------------------------------

def _cases():
    for key, case in PYTEST_CASES.items():
        marks = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")] if case.device == "cuda" else []
        for label in ["one-at-a-time"] + [f"batched-{b}" for b in case.batched]:
            yield pytest.param(key, label, id=f"{key}-{label}", marks=marks)


@pytest.mark.benchmark(timer=harness.REPLAY)
@pytest.mark.parametrize("key,path", list(_cases()))
def test_paths(benchmark, suite, key, path):
    case = PYTEST_CASES[key]
    suite.record(benchmark, f"paths-{key}", lambda smoke: comparison(case, smoke=smoke), path, rounds=3, warmup=0,
                 min_sample_s=0.0)


@pytest.mark.benchmark(timer=harness.REPLAY)
@pytest.mark.parametrize("path", ["fuse-off", "fuse-fold"])
def test_fold(benchmark, suite, path):
    suite.record(benchmark, "paths-fold-zoo_residual", lambda smoke: fold_comparison("zoo_residual", smoke=smoke),
                 path, rounds=3, warmup=0, min_sample_s=0.0)


# ---- table -----------------------------------------------------------------------------------------

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), help="comparisons to run (default: all this "
                        "machine can: the CUDA one where there is a GPU)")
    parser.add_argument("--images", type=int, default=None, help="images per path (default: the case's)")
    parser.add_argument("--steps", type=int, default=None, help="steps per image (default: PathSettings')")
    parser.add_argument("--views", type=int, default=None, help="views per step (default: PathSettings')")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--baseline-rounds", type=int, default=None,
                        help="samples of the one-at-a-time path (default: the case's; 1: timed by its checked call)")
    parser.add_argument("--precision", choices=["auto", "float32", "bfloat16"], default=None,
                        help="PathSettings.precision of every path (default: the case's, auto: float32 on a CPU)")
    parser.add_argument("--threads", type=int, default=None, help="PyTorch intra-op threads (default: PyTorch's)")
    parser.add_argument("--fold", action="store_true", help="instead of the cases: batched paths of the zoo's CNNs "
                        "with the network as written (fuse off) against the CPU's fast path (fuse fold)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one call per path")
    parser.add_argument("--json", metavar="PATH", help="where the JSON goes (default .benchmarks/bench_paths/...)")
    args = parser.parse_args(argv)
    harness.set_threads(args.threads)
    started = harness.load_average()
    keys = args.cases or [k for k, c in CASES.items() if c.device == "cpu" or CUDA]
    print(harness.header("cuda" if CUDA else "cpu"))
    runs, path, notes = [], args.json, []
    if args.fold:
        for model in FOLD_MODELS:
            cmp = fold_comparison(model, smoke=args.smoke)
            results = harness.measure(cmp, rounds=args.rounds, warmup=1, min_sample_s=0.0, smoke=args.smoke)
            print(harness.table(results), flush=True)
            runs.append((cmp, results))
            path = harness.write_json(path, runs, "cpu", "bench_paths.py", args.smoke, started)
        print(f"\nload average {' '.join(map(str, started))} at the start, "
              f"{' '.join(map(str, harness.load_average()))} at the end; JSON: {path}")
        return
    for key in keys:
        case = CASES[key]
        if case.device == "cuda" and not CUDA:
            notes.append(f"{key}: not run (needs a CUDA GPU)")
            print(f"\n{key}: SKIPPED, no CUDA GPU here", flush=True)
            continue
        overrides = {k: v for k, v in (("images", args.images), ("steps", args.steps), ("views", args.views),
                                        ("baseline_rounds", args.baseline_rounds),
                                        ("precision", args.precision)) if v is not None}
        case = dataclasses.replace(case, **overrides)
        cmp = comparison(case, smoke=args.smoke)
        results = harness.measure(cmp, rounds=args.rounds, warmup=0, min_sample_s=0.0, smoke=args.smoke)
        print(harness.table(results), flush=True)
        for line in issue_targets(case, results, args.smoke):
            print(line, flush=True)
            for r in results:
                r.extra.setdefault("issue_targets", []).append(line)
        runs.append((cmp, results))
        # written after each case: a run cut by a time limit keeps the cases it finished
        path = harness.write_json(path, runs, case.device, "bench_paths.py", args.smoke, started)
        if case.device == "cuda":
            torch.cuda.empty_cache()
    if not CUDA and not args.cases:
        print("\ncuda-resnet50: not run (no CUDA GPU here); run it on the GPU machine: "
              "python benchmarks/bench_paths.py --cases cuda-resnet50")
    print(f"\nload average {' '.join(map(str, started))} at the start, "
          f"{' '.join(map(str, harness.load_average()))} at the end; JSON: {path}")


if __name__ == "__main__":
    main()
