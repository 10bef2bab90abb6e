"""Micro-benchmarks of the fused NAD ops against their pure-PyTorch references, eager and under
torch.compile.

Each comparison is one training-step use of an op: masked_conv2d forward + backward to x and the
logits; gate_mse forward + backward; one normalised-gradient update of VGG16's 13 gate points;
task_gate forward + backward on ViT-like (N, L, C) tokens. Paths, side by side in one run
(``harness.measure``: interleaved, each checked against the eager reference before timing):

- ``reference``: the op's pure-PyTorch definition (``*_reference`` in nad_ext.ops), eager: the baseline;
- ``reference-compiled``: the same under ``torch.compile`` (Inductor; compilation in the warm-up,
  its time in ``first_call_s``), the first thing to ask of a custom kernel;
- ``fused``: the ``nad::`` op; for tokens ``in-place`` (the (N, C, L) view read in place,
  channels innermost) and ``copied`` (the transposed copy it replaced: copy to contiguous
  (N, C, L), gate, copy back).

CPU sizes are CI-sized; on CUDA one VGG16-like block (conv3_x at batch 64) in bf16 channels_last.

    pytest benchmarks/bench_fused_ops.py                       # pytest-benchmark, JSON autosaved
    python benchmarks/bench_fused_ops.py [--device cuda] [--json PATH]   # the tables
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from nad_ext.ops import (gate_mse, gate_mse_reference, masked_conv2d, masked_conv2d_reference,  # noqa: E402
                         normalized_gradient_step_, normalized_gradient_step_reference, task_gate,
                         task_gate_reference)

CUDA = torch.cuda.is_available()

SHAPES = {
    "cpu": dict(n=16, c_in=32, c_out=32, hw=28, tasks=8, dtype=torch.float32, channels_last=False),
    "cuda": dict(n=64, c_in=256, c_out=256, hw=56, tasks=16, dtype=torch.bfloat16, channels_last=True),
    "smoke": dict(n=4, c_in=8, c_out=8, hw=8, tasks=2, dtype=torch.float32, channels_last=False),
}
TOKENS = {"cpu": dict(n=16, length=65, c=192, tasks=8, dtype=torch.float32),
          "cuda": dict(n=64, length=197, c=768, tasks=16, dtype=torch.bfloat16),
          "smoke": dict(n=4, length=9, c=16, tasks=2, dtype=torch.float32)}
VGG16_WIDTHS = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]


def compiled(fn, smoke: bool):
    """``fn`` under torch.compile: Inductor, or in a smoke run the eager backend (Dynamo's capture
    without code generation: seconds instead of minutes on 2 cores)."""
    return torch.compile(fn, backend="eager" if smoke else "inductor", dynamic=False)


def _tolerance(dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 3e-2


def _same(expected, tol):
    """A check: every tensor of the result close to the eager reference's."""
    def check(got) -> str:
        worst = 0.0
        for e, g in zip(expected, got, strict=True):
            torch.testing.assert_close(g.float(), e.float(), rtol=tol, atol=tol)
            worst = max(worst, (g.float() - e.float()).abs().max().item())
        return f"passed (max abs. error {worst:.1e})"
    return check


def _reference_paths(make, reference, dtype, smoke: bool, eager_note: str = ""):
    """``(paths, check)``: the baselines of an op's comparison, ``reference`` eager and under
    torch.compile (``make(fn)``: the timed call of the workload through ``fn``), and the check of
    every other path against the eager reference's result."""
    name = reference.__name__
    check = _same([t.detach() for t in make(reference)()], _tolerance(dtype))
    return [harness.Path("reference", make(reference), None, eager_note or f"{name}, eager"),
            harness.Path("reference-compiled", make(compiled(reference, smoke)), check,
                         f"{name} under torch.compile")], check


def conv_comparison(device: str, smoke: bool) -> harness.Comparison:
    s = SHAPES["smoke" if smoke else device]
    fmt = torch.channels_last if s["channels_last"] else torch.contiguous_format
    g = torch.Generator().manual_seed(0)
    x = torch.randn(s["n"], s["c_in"], s["hw"], s["hw"], generator=g).to(device, s["dtype"]).to(memory_format=fmt)
    w = (torch.randn(s["c_out"], s["c_in"], 3, 3, generator=g) / (3 * s["c_in"] ** 0.5)).to(device, s["dtype"])
    w = w.to(memory_format=fmt)
    b = torch.randn(s["c_out"], generator=g).to(device, s["dtype"])
    logits = torch.randn(s["tasks"], s["c_out"], generator=g).to(device).requires_grad_(True)
    ids = torch.randint(0, s["tasks"], (s["n"],), generator=g).to(device)
    x.requires_grad_(True)
    grad_y = torch.randn(s["n"], s["c_out"], s["hw"], s["hw"], generator=g).to(device, s["dtype"])
    grad_y = grad_y.to(memory_format=fmt)

    def make(op):
        def run():
            y = op(x, w, b, logits, ids, padding=1)
            return (y, *torch.autograd.grad(y, (x, logits), grad_y))
        return run

    paths, check = _reference_paths(make, masked_conv2d_reference, s["dtype"], smoke)
    paths.append(harness.Path("fused", make(masked_conv2d), check, "nad::masked_conv2d"))
    return harness.Comparison(f"masked_conv2d fwd+bwd [{device}]", paths, "reference", device, _info(s))


def mse_comparison(device: str, smoke: bool) -> harness.Comparison:
    s = SHAPES["smoke" if smoke else device]
    fmt = torch.channels_last if s["channels_last"] else torch.contiguous_format
    g = torch.Generator().manual_seed(1)
    shape = (s["n"], s["c_out"], s["hw"], s["hw"])
    masked = torch.randn(shape, generator=g).to(device, s["dtype"]).to(memory_format=fmt).requires_grad_(True)
    original = torch.randn(shape, generator=g).to(device, s["dtype"]).to(memory_format=fmt)
    counts = (torch.rand(s["n"], generator=g) > 0.2).to(device)
    ids = torch.randint(0, s["tasks"], (s["n"],), generator=g).to(device)

    def make(op):
        def run():
            out = op(masked, original, counts, ids, s["tasks"])
            return (out, *torch.autograd.grad(out.sum(), masked))
        return run

    paths, check = _reference_paths(make, gate_mse_reference, s["dtype"], smoke)
    paths.append(harness.Path("fused", make(gate_mse), check, "nad::gate_mse"))
    return harness.Comparison(f"gate_mse fwd+bwd [{device}]", paths, "reference", device, _info(s))


def step_comparison(device: str, smoke: bool) -> harness.Comparison:
    s = SHAPES["smoke" if smoke else device]
    tasks = s["tasks"] * 4
    g = torch.Generator().manual_seed(2)
    widths = VGG16_WIDTHS[:3] if smoke else VGG16_WIDTHS
    logits = [torch.randn(tasks, c, generator=g).to(device) for c in widths]
    grads = [torch.randn(tasks, c, generator=g).to(device) for c in widths]
    selected = torch.arange(0, tasks, 2, device=device)

    initial = [m.clone() for m in logits]  # the timed paths update ``logits`` in place

    def updated(op) -> list[torch.Tensor]:  # one update of copies of the initial logits: what is checked
        copies = [m.clone() for m in initial]
        op(copies, grads, selected, 1e-3)
        return copies

    expected = updated(normalized_gradient_step_reference)
    ref_compiled = compiled(normalized_gradient_step_reference, smoke)
    checks = {"reference-compiled": lambda _: _same(expected, 1e-6)(updated(ref_compiled)),
              "fused": lambda _: _same(expected, 1e-6)(updated(normalized_gradient_step_))}
    paths = [harness.Path("reference", lambda: normalized_gradient_step_reference(logits, grads, selected, 1e-3),
                          None, "normalized_gradient_step_reference (one layer at a time), eager"),
             harness.Path("reference-compiled", lambda: ref_compiled(logits, grads, selected, 1e-3),
                          checks["reference-compiled"], "the reference under torch.compile"),
             harness.Path("fused", lambda: normalized_gradient_step_(logits, grads, selected, 1e-3), checks["fused"],
                          "nad::normalized_gradient_step_ (all gate points in one launch)")]
    return harness.Comparison(f"normalized_step ({len(widths)} points) [{device}]", paths, "reference", device,
                              {"tasks": tasks, "updated": len(selected), "widths": widths})


def tokens_comparison(device: str, smoke: bool) -> harness.Comparison:
    """task_gate fwd+bwd (x and logits) on (N, L, C) tokens, as gates.gate_tensor hands them to the
    op; the next layer reads (N, L, C) back, so the copied path pays a copy there as well."""
    s = TOKENS["smoke" if smoke else device]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(s["n"], s["length"], s["c"], generator=g).to(device, s["dtype"]).requires_grad_(True)
    logits = torch.randn(s["tasks"], s["c"], generator=g).to(device).requires_grad_(True)
    ids = torch.randint(0, s["tasks"], (s["n"],), generator=g).to(device)
    grad_y = torch.randn(x.shape, generator=g).to(device, s["dtype"])

    def make(op, copy=False):
        def run():
            view = x.movedim(2, 1)
            y = op(view.contiguous() if copy else view, logits, ids).movedim(1, 2)
            if copy:
                y = y.contiguous()
            return (y, *torch.autograd.grad(y, (x, logits), grad_y))
        return run

    paths, check = _reference_paths(make, task_gate_reference, s["dtype"], smoke,
                                    "task_gate_reference on the view, eager")
    paths += [harness.Path("copied", make(task_gate, copy=True), check,
                           "nad::task_gate on a contiguous (N, C, L) copy, copied back"),
              harness.Path("in-place", make(task_gate), check, "nad::task_gate reading the (N, C, L) view in place")]
    return harness.Comparison(f"task_gate on (N, L, C) tokens fwd+bwd [{device}]", paths, "reference", device,
                              {k: str(v) for k, v in s.items()})


def _info(s: dict) -> dict:
    return {k: str(v) for k, v in s.items()}


COMPARISONS = {"masked_conv2d": (conv_comparison, ["reference", "reference-compiled", "fused"]),
               "gate_mse": (mse_comparison, ["reference", "reference-compiled", "fused"]),
               "normalized_step": (step_comparison, ["reference", "reference-compiled", "fused"]),
               "tokens": (tokens_comparison, ["reference", "reference-compiled", "copied", "in-place"])}
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")])]


def _cases():
    for device in DEVICES:
        dev = device if isinstance(device, str) else device.values[0]
        marks = [] if isinstance(device, str) else list(device.marks)
        for key, (_, names) in COMPARISONS.items():
            for name in names:
                yield pytest.param(dev, key, name, id=f"{key}-{dev}-{name}", marks=marks)


@pytest.mark.benchmark(timer=harness.REPLAY)
@pytest.mark.parametrize("device,key,path", list(_cases()))
def test_fused_ops(benchmark, suite, device, key, path):
    make = COMPARISONS[key][0]
    suite.record(benchmark, f"{key}-{device}", lambda smoke: make(device, smoke), path, rounds=15, warmup=3)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if CUDA else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--ops", nargs="+", choices=list(COMPARISONS), default=list(COMPARISONS))
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per comparison")
    parser.add_argument("--threads", type=int, default=None, help="PyTorch intra-op threads (default: PyTorch's)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one call per path, eager compile backend")
    parser.add_argument("--json", metavar="PATH", help="where the JSON goes (default .benchmarks/bench_fused_ops/...)")
    args = parser.parse_args(argv)
    harness.set_threads(args.threads)
    started = harness.load_average()
    print(harness.header(args.device))
    runs = []
    for key in args.ops:
        cmp = COMPARISONS[key][0](args.device, args.smoke)
        results = harness.measure(cmp, rounds=args.rounds, warmup=3, smoke=args.smoke)
        print(harness.table(results), flush=True)
        runs.append((cmp, results))
    path = harness.write_json(args.json, runs, args.device, "bench_fused_ops.py", args.smoke, started)
    print(f"\nload average {' '.join(map(str, started))} at the start, "
          f"{' '.join(map(str, harness.load_average()))} at the end; JSON: {path}")


if __name__ == "__main__":
    main()
