"""Benchmarks of nad::mask_overlap (all-pairs layer-wise IoU of binary sub-architectures).

Workload of the performance brief (shared/PERFORMANCE.md beside the repository): T tasks vs
T tasks, VGG16's 13 gate points (4,224 channels), random masks with 30-50% of the channels
open, mean IoU over layers. Baselines measured in the
same run: a NumPy float32 matrix product per layer, and (small T) a reference-style Python
double loop over pairs. Every implementation is checked against the float64 reference first.

    pytest benchmarks/bench_overlap.py          # pytest-benchmark micro-benchmarks
    python benchmarks/bench_overlap.py          # table: median ms of each, ratios
"""
from __future__ import annotations

import os
import pathlib
import statistics
import sys
import time

import numpy as np
import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout
from nad_ext.ops import mask_overlap, mask_overlap_reference  # noqa: E402

VGG16 = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
CUDA = torch.cuda.is_available()


def random_masks(t: int, sizes=VGG16, seed: int = 0, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    density = 0.3 + 0.2 * torch.rand(t, 1, generator=g)
    return (torch.rand(t, sum(sizes), generator=g) < density).to(device)


def numpy_matmul_iou(a: np.ndarray, b: np.ndarray, sizes=VGG16) -> np.ndarray:
    """Mean layer-wise IoU with a float32 matrix product per layer (the NumPy baseline)."""
    total = np.zeros((a.shape[0], b.shape[0]), dtype=np.float32)
    start = 0
    for size in sizes:
        al = a[:, start : start + size].astype(np.float32)
        bl = b[:, start : start + size].astype(np.float32)
        start += size
        inter = al @ bl.T
        union = al.sum(1)[:, None] + bl.sum(1)[None, :] - inter
        total += np.where(union > 0, inter / np.maximum(union, 1), np.float32(1))
    return total / len(sizes)


def python_double_loop_iou(a: torch.Tensor, b: torch.Tensor, sizes=VGG16) -> torch.Tensor:
    """Reference-style: a Python loop over pairs, then over layers (the original analysis)."""
    out = torch.empty(a.shape[0], b.shape[0])
    bounds = np.cumsum([0] + list(sizes))
    for i in range(a.shape[0]):
        for j in range(b.shape[0]):
            ious = []
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                x, y = a[i, lo:hi], b[j, lo:hi]
                union = (x | y).sum().item()
                ious.append((x & y).sum().item() / union if union else 1.0)
            out[i, j] = sum(ious) / len(ious)
    return out


def check(result, a, b, sizes=VGG16, atol=1e-5):
    ref = mask_overlap_reference(a.cpu(), b.cpu(), sizes, "iou").numpy()
    result = result.cpu().numpy() if isinstance(result, torch.Tensor) else result
    np.testing.assert_allclose(result, ref, rtol=0, atol=atol)


# ---- pytest-benchmark -------------------------------------------------------------------

@pytest.fixture(scope="module")
def masks_1000():
    return random_masks(1000, seed=1), random_masks(1000, seed=2)


def test_op_cpu_t1000(benchmark, masks_1000):
    a, b = masks_1000
    check(mask_overlap(a, b, VGG16), a, b)
    benchmark(mask_overlap, a, b, VGG16)


def test_numpy_matmul_t1000(benchmark, masks_1000):
    a, b = (m.numpy() for m in masks_1000)
    check(numpy_matmul_iou(a, b), *masks_1000)
    benchmark(numpy_matmul_iou, a, b)


def test_python_double_loop_t100(benchmark):
    a, b = random_masks(100, seed=1), random_masks(100, seed=2)
    check(python_double_loop_iou(a[:5], b[:5]), a[:5], b[:5])
    benchmark.pedantic(python_double_loop_iou, args=(a, b), rounds=1, iterations=1)


def test_op_cpu_t100(benchmark):
    a, b = random_masks(100, seed=1), random_masks(100, seed=2)
    check(mask_overlap(a, b, VGG16), a, b)
    benchmark(mask_overlap, a, b, VGG16)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("t", [1000, 20000])
def test_op_cuda(benchmark, t):
    a, b = random_masks(t, seed=1, device="cuda"), random_masks(t, seed=2, device="cuda")
    if t <= 2000:
        check(mask_overlap(a, b, VGG16), a, b)

    def run():
        out = mask_overlap(a, b, VGG16)
        torch.cuda.synchronize()
        return out

    run()
    benchmark(run)


# ---- table ---------------------------------------------------------------------------------

def median_ms(fn, *args, repeat=20, warmup=2) -> float:
    for _ in range(warmup):
        fn(*args)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main():
    load_before = os.getloadavg()
    rows = []
    a, b = random_masks(1000, seed=1), random_masks(1000, seed=2)
    an, bn = a.numpy(), b.numpy()
    check(mask_overlap(a, b, VGG16), a, b)
    check(numpy_matmul_iou(an, bn), a, b)
    op = median_ms(mask_overlap, a, b, VGG16, repeat=50)
    npm = median_ms(numpy_matmul_iou, an, bn, repeat=10)
    rows += [("nad::mask_overlap, CPU", 1000, op, 1.0),
             ("NumPy float32 matmul per layer", 1000, npm, npm / op)]

    a1, b1 = a[:100], b[:100]
    check(python_double_loop_iou(a1[:5], b1[:5]), a1[:5], b1[:5])
    op100 = median_ms(mask_overlap, a1, b1, VGG16, repeat=200)
    loop = median_ms(python_double_loop_iou, a1, b1, repeat=1, warmup=0)
    rows += [("nad::mask_overlap, CPU", 100, op100, 1.0),
             ("Python double loop over pairs", 100, loop, loop / op100)]

    if CUDA:
        for t in (1000, 20000):
            ac, bc = random_masks(t, seed=1, device="cuda"), random_masks(t, seed=2, device="cuda")
            if t <= 2000:
                check(mask_overlap(ac, bc, VGG16), ac, bc)

            def run():
                mask_overlap(ac, bc, VGG16)
                torch.cuda.synchronize()

            ms = median_ms(run, repeat=50, warmup=5)
            rows.append(("nad::mask_overlap, CUDA", t, ms, float("nan")))

    load_after = os.getloadavg()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name()}" if CUDA else ", no GPU")
          + f"; 1-min load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print(f"{'implementation':<34} {'T':>6} {'median ms':>11} {'x slower than op':>17}")
    for name, t, ms, ratio in rows:
        print(f"{name:<34} {t:>6} {ms:>11.3f} {ratio:>17.1f}")
    # The CPU targets at T = 1,000 (see benchmarks/RESULTS.md).
    print(f"targets at T=1000: <= 10 ms: {'met' if op <= 10 else 'missed'} ({op:.2f} ms); "
          f">= 5x NumPy: {'met' if npm / op >= 5 else 'missed'} ({npm / op:.1f}x)")


if __name__ == "__main__":
    main()
