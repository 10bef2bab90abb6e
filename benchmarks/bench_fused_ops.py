"""Micro-benchmarks of the fused NAD ops against their unfused PyTorch references.

    python -m pytest benchmarks/bench_fused_ops.py      # pytest-benchmark, CPU (CUDA where present)
    PYTHONPATH=. python benchmarks/bench_fused_ops.py [--device cuda]   # a side-by-side table

Each case is one training-step use of the op: masked_conv2d forward + backward to x and the
logits, gate_mse forward + backward, one normalised-gradient update of all gate points. A second table times
task_gate on ViT-like (N, L, C) tokens read in place (the (N, C, L) view, channels innermost)
against the transposed copy it replaced (copy to contiguous (N, C, L), gate, copy back).
The reference is measured in the same run (ratios hold on shared machines, absolute times
drift). Nothing here asserts timings.
"""
from __future__ import annotations

import argparse
import statistics
import time

import pytest
import torch

from nad_ext.ops import (gate_mse, task_gate, gate_mse_reference, masked_conv2d, masked_conv2d_reference,
                         normalized_gradient_step_, normalized_gradient_step_reference)

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU"))]

# CI-sized on CPU; one VGG16-like block (conv3_x at batch 64) on the GPU.
SHAPES = {
    "cpu": dict(n=16, c_in=32, c_out=32, hw=28, tasks=8, dtype=torch.float32, channels_last=False),
    "cuda": dict(n=64, c_in=256, c_out=256, hw=56, tasks=16, dtype=torch.bfloat16, channels_last=True),
}
# (N, L, C) tokens: a small ViT block on the CPU, ViT-B/16's on the GPU.
TOKENS = {"cpu": dict(n=16, length=65, c=192, tasks=8, dtype=torch.float32),
          "cuda": dict(n=64, length=197, c=768, tasks=16, dtype=torch.bfloat16)}
VGG16_WIDTHS = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def conv_case(device, fused: bool):
    s = SHAPES[device]
    fmt = torch.channels_last if s["channels_last"] else torch.contiguous_format
    x = torch.randn(s["n"], s["c_in"], s["hw"], s["hw"], device=device, dtype=s["dtype"]).to(memory_format=fmt)
    w = (torch.randn(s["c_out"], s["c_in"], 3, 3, device=device) / (3 * s["c_in"] ** 0.5)).to(s["dtype"])
    w = w.to(memory_format=fmt)
    b = torch.randn(s["c_out"], device=device, dtype=s["dtype"])
    logits = torch.randn(s["tasks"], s["c_out"], device=device, requires_grad=True)
    ids = torch.randint(0, s["tasks"], (s["n"],), device=device)
    x.requires_grad_(True)
    grad_y = torch.randn(s["n"], s["c_out"], s["hw"], s["hw"], device=device, dtype=s["dtype"]).to(memory_format=fmt)
    op = masked_conv2d if fused else masked_conv2d_reference

    def run():
        y = op(x, w, b, logits, ids, padding=1)
        torch.autograd.grad(y, (x, logits), grad_y)
        _sync(device)

    return run


def mse_case(device, fused: bool):
    s = SHAPES[device]
    fmt = torch.channels_last if s["channels_last"] else torch.contiguous_format
    shape = (s["n"], s["c_out"], s["hw"], s["hw"])
    masked = torch.randn(shape, device=device, dtype=s["dtype"]).to(memory_format=fmt).requires_grad_(True)
    original = torch.randn(shape, device=device, dtype=s["dtype"]).to(memory_format=fmt)
    counts = torch.rand(s["n"], device=device) > 0.2
    ids = torch.randint(0, s["tasks"], (s["n"],), device=device)
    op = gate_mse if fused else gate_mse_reference

    def run():
        out = op(masked, original, counts, ids, s["tasks"])
        torch.autograd.grad(out.sum(), masked)
        _sync(device)

    return run


def step_case(device, fused: bool):
    tasks = SHAPES[device]["tasks"] * 4
    logits = [torch.randn(tasks, c, device=device, requires_grad=True) for c in VGG16_WIDTHS]
    for m in logits:
        m.grad = torch.randn_like(m)
    selected = torch.arange(0, tasks, 2, device=device)

    def run():
        if fused:
            normalized_gradient_step_(logits, [m.grad for m in logits], selected, 1e-3)
        else:
            normalized_gradient_step_reference(logits, [m.grad for m in logits], selected, 1e-3)
        _sync(device)

    return run


def tokens_case(device, in_place: bool):
    """task_gate fwd+bwd (x and logits) on (N, L, C) tokens, as gates.gate_tensor hands them to the
    op; the next layer reads (N, L, C) back, so the copied path pays a copy there as well."""
    s = TOKENS[device]
    x = torch.randn(s["n"], s["length"], s["c"], device=device, dtype=s["dtype"], requires_grad=True)
    logits = torch.randn(s["tasks"], s["c"], device=device, requires_grad=True)
    ids = torch.randint(0, s["tasks"], (s["n"],), device=device)
    grad_y = torch.randn_like(x)

    def run():
        view = x.movedim(2, 1)
        y = task_gate(view if in_place else view.contiguous(), logits, ids).movedim(1, 2)
        if not in_place:
            y = y.contiguous()
        torch.autograd.grad(y, (x, logits), grad_y)
        _sync(device)

    return run


CASES = {"masked_conv2d fwd+bwd": conv_case, "gate_mse fwd+bwd": mse_case, "normalized_step (13 points)": step_case}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
@pytest.mark.parametrize("case", list(CASES))
def test_bench(benchmark, case, fused, device):
    benchmark.group = f"{case} [{device}]"
    run = CASES[case](device, fused)
    run()  # warm up
    benchmark(run)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("in_place", [True, False], ids=["in_place", "copied"])
def test_bench_tokens(benchmark, in_place, device):
    benchmark.group = f"task_gate on (N, L, C) tokens [{device}]"
    run = tokens_case(device, in_place)
    run()
    benchmark(run)


def _median_ms(run, repeats: int) -> float:
    for _ in range(3):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if CUDA else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    s = SHAPES[args.device]
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} shapes={s}")
    print(f"{'op':<30} {'fused ms':>10} {'reference ms':>13} {'speedup':>8}")
    for name, case in CASES.items():
        fused = _median_ms(case(args.device, True), args.repeats)
        ref = _median_ms(case(args.device, False), args.repeats)
        print(f"{name:<30} {fused:>10.3f} {ref:>13.3f} {ref / fused:>7.2f}x")
    t = TOKENS[args.device]
    print(f"\ntask_gate fwd+bwd on (N, L, C) tokens, shapes={t}")
    print(f"{'path':<30} {'in place ms':>11} {'copied ms':>10} {'speedup':>8}")
    in_place = _median_ms(tokens_case(args.device, True), args.repeats)
    copied = _median_ms(tokens_case(args.device, False), args.repeats)
    print(f"{'channels innermost vs copy':<30} {in_place:>11.3f} {copied:>10.3f} {copied / in_place:>7.2f}x")


if __name__ == "__main__":
    main()
