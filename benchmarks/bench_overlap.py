"""nad::mask_overlap (all-pairs layer-wise IoU of binary sub-architectures) against its baselines.

Workload of the performance brief (benchmarks/TARGETS.md): T tasks vs T tasks, VGG16's 13 gate
points (4,224 channels), random masks with 30-50% of the channels open, mean IoU over layers.
Paths, measured side by side in one run (``harness.measure``: interleaved, each checked against
the float64 reference ``mask_overlap_reference`` before it is timed):

- ``python-loop``: reference-style, a Python double loop over pairs, then over layers (T = 100 only,
  one sample: ~10,000 pairs take seconds);
- ``numpy``: a float32 matrix product per layer (NumPy's BLAS);
- ``scipy``: ``scipy.spatial.distance.cdist(..., "jaccard")`` per layer (only where SciPy is installed);
- ``torch-float32`` / ``torch-bf16``: the same matrix-product formulation in PyTorch, per layer
  (bf16 inputs with float32 accumulation and output on CUDA: exact for these counts);
- ``op``: ``nad::mask_overlap`` (CPU: bit-packed AVX2 popcount; CUDA: one launch over all layers).

CUDA times are CUDA-event times.

    pytest benchmarks/bench_overlap.py                  # pytest-benchmark, JSON autosaved
    python benchmarks/bench_overlap.py [--json PATH]    # the tables; JSON to .benchmarks/bench_overlap/
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from nad_ext.ops import mask_overlap, mask_overlap_reference  # noqa: E402

VGG16 = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
CUDA = torch.cuda.is_available()
try:
    from scipy.spatial.distance import cdist
except ImportError:  # not a dependency: the scipy path is measured where it is installed
    cdist = None


def random_masks(t: int, sizes=VGG16, seed: int = 0, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    density = 0.3 + 0.2 * torch.rand(t, 1, generator=g)
    return (torch.rand(t, sum(sizes), generator=g) < density).to(device)


def numpy_matmul_iou(a: np.ndarray, b: np.ndarray, sizes=VGG16) -> np.ndarray:
    """Mean layer-wise IoU with a float32 matrix product per layer (the NumPy baseline)."""
    total = np.zeros((a.shape[0], b.shape[0]), dtype=np.float32)
    start = 0
    for size in sizes:
        al = a[:, start: start + size].astype(np.float32)
        bl = b[:, start: start + size].astype(np.float32)
        start += size
        inter = al @ bl.T
        union = al.sum(1)[:, None] + bl.sum(1)[None, :] - inter
        total += np.where(union > 0, inter / np.maximum(union, 1), np.float32(1))
    return total / len(sizes)


def torch_matmul_iou(a: torch.Tensor, b: torch.Tensor, dtype=torch.float32, sizes=VGG16) -> torch.Tensor:
    """The same formulation in PyTorch, a matrix product per layer; bf16 inputs accumulate and
    return float32 (``torch.mm(..., out_dtype=torch.float32)``, CUDA), so the counts are exact."""
    total = torch.zeros(a.shape[0], b.shape[0], device=a.device)
    start = 0
    for size in sizes:
        al, bl = a[:, start: start + size].to(dtype), b[:, start: start + size].to(dtype)
        start += size
        inter = torch.mm(al, bl.T, out_dtype=torch.float32) if dtype == torch.bfloat16 else al @ bl.T
        union = al.sum(1, dtype=torch.float32)[:, None] + bl.sum(1, dtype=torch.float32)[None, :] - inter
        total += torch.where(union > 0, inter / union.clamp(min=1), 1.0)
    return total / len(sizes)


def scipy_iou(a: np.ndarray, b: np.ndarray, sizes=VGG16) -> np.ndarray:
    """SciPy's Jaccard distance per layer (1 - IoU; two empty rows have distance 0)."""
    total = np.zeros((a.shape[0], b.shape[0]))
    start = 0
    for size in sizes:
        total += 1.0 - cdist(a[:, start: start + size], b[:, start: start + size], "jaccard")
        start += size
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


def checker(a: torch.Tensor, b: torch.Tensor, rows: int | None = None, atol: float = 1e-5):
    """Compares a result (or its first ``rows`` rows) with the float64 reference."""
    a_ref = a[:rows].cpu() if rows else a.cpu()
    expected = mask_overlap_reference(a_ref, b.cpu(), VGG16, "iou").numpy()

    def check(result) -> str:
        got = result.cpu().numpy() if isinstance(result, torch.Tensor) else np.asarray(result)
        got = got[: len(expected)]
        np.testing.assert_allclose(got, expected, rtol=0, atol=atol)
        return f"passed (max abs. error {np.abs(got - expected).max():.1e}" + (
            f", first {len(expected)} rows)" if rows else ")")

    return check


# ---- the comparisons -----------------------------------------------------------------------------

# key: (device, T, T in a smoke run, path names, baseline)
SPECS = {
    "cpu-t100": ("cpu", 100, 6, ["python-loop", "numpy", "torch-float32", "op"], "python-loop"),
    "cpu-t1000": ("cpu", 1000, 24, ["numpy", "torch-float32"] + (["scipy"] if cdist else []) + ["op"], "numpy"),
    "cuda-t1000": ("cuda", 1000, 24, ["torch-bf16", "torch-float32", "op"], "torch-bf16"),
    "cuda-t20000": ("cuda", 20000, 300, ["torch-bf16", "op"], "torch-bf16"),
}


def comparison(key: str, smoke: bool) -> harness.Comparison:
    device, t, t_smoke, names, baseline = SPECS[key]
    t = t_smoke if smoke else t
    a, b = random_masks(t, seed=1, device=device), random_masks(t, seed=2, device=device)
    check = checker(a, b, rows=256 if t > 2000 else None)
    an, bn = a.cpu().numpy(), b.cpu().numpy()
    targets = {"cpu-t1000": ["overlap-cpu-t1000", "overlap-cpu-t1000-numpy"] + (["overlap-cpu-t1000-scipy"]
                                                                                  if cdist else []),
               "cuda-t1000": ["overlap-cuda-t1000"], "cuda-t20000": ["overlap-cuda-t20000"]}.get(key, [])
    make = {
        "python-loop": lambda: harness.Path("python-loop", lambda: python_double_loop_iou(a, b), check,
                                            "reference-style: Python loop over pairs and layers", max_rounds=1),
        "numpy": lambda: harness.Path("numpy", lambda: numpy_matmul_iou(an, bn), check,
                                      "NumPy float32 matrix product per layer", cuda=False),
        "scipy": lambda: harness.Path("scipy", lambda: scipy_iou(an, bn), check, "SciPy cdist jaccard per layer",
                                      max_rounds=3, cuda=False),
        "torch-float32": lambda: harness.Path("torch-float32", lambda: torch_matmul_iou(a, b), check,
                                              "PyTorch float32 matrix product per layer"),
        "torch-bf16": lambda: harness.Path("torch-bf16", lambda: torch_matmul_iou(a, b, torch.bfloat16), check,
                                           "PyTorch bf16 matrix product per layer, float32 accumulation and output"),
        "op": lambda: harness.Path("op", lambda: mask_overlap(a, b, VGG16), check, "nad::mask_overlap",
                                   targets=targets),
    }
    return harness.Comparison(f"mask_overlap T={t:,} [{device}]", [make[n]() for n in names], baseline, device,
                              {"workload": f"{t} x {t} masks, VGG16's 13 gate points (4,224 channels), mean IoU",
                               "T": t})


# ---- pytest-benchmark ----------------------------------------------------------------------------

def _cases():
    for key, (device, *_, names, _baseline) in SPECS.items():
        marks = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")] if device == "cuda" else []
        for name in names:
            yield pytest.param(key, name, id=f"{key}-{name}", marks=marks)


@pytest.mark.benchmark(timer=harness.REPLAY)
@pytest.mark.parametrize("key,path", list(_cases()))
def test_overlap(benchmark, suite, key, path):
    suite.record(benchmark, key, lambda smoke: comparison(key, smoke), path, rounds=15, min_sample_s=0.05)


# ---- table -----------------------------------------------------------------------------------------

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", nargs="+", choices=list(SPECS), help="comparisons to run (default: all this "
                        "machine can: the CUDA ones where there is a GPU)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per comparison")
    parser.add_argument("--threads", type=int, default=None, help="PyTorch intra-op threads (default: PyTorch's)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one call per path")
    parser.add_argument("--json", metavar="PATH", help="where the JSON goes (default .benchmarks/bench_overlap/...)")
    args = parser.parse_args(argv)
    harness.set_threads(args.threads)
    started = harness.load_average()
    device = "cuda" if CUDA else "cpu"
    keys = args.keys or [k for k, spec in SPECS.items() if spec[0] == "cpu" or CUDA]
    print(harness.header(device))
    runs = []
    for key in keys:
        cmp = comparison(key, args.smoke)
        results = harness.measure(cmp, rounds=args.rounds, min_sample_s=0.05, smoke=args.smoke)
        print(harness.table(results), flush=True)
        runs.append((cmp, results))
    path = harness.write_json(args.json, runs, device, "bench_overlap.py", args.smoke, started)
    print(f"\nload average {' '.join(map(str, started))} at the start, "
          f"{' '.join(map(str, harness.load_average()))} at the end; JSON: {path}")


if __name__ == "__main__":
    main()
