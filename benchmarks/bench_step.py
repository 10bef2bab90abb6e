"""End-to-end NAD step throughput: images per second for one full step (original forward,
masked forward, backward to the gates, normalised-gradient update).

Measured side by side in one run (timings on shared machines drift, ratios hold):
- reference-style: the reference implementation's loop: gates as forward hooks computing
  sigmoid(m) * x, one task at a time, batch 16, fp32 eager;
- batched: nad_ext's GatedModel + objective, ``tasks`` tasks x 16 images per step, fp32 eager
  (``nad::task_gate`` gates, per-task losses and updates);
- batched-bf16: the same under bf16 autocast with channels_last (CUDA only);
- fused: the trainer's fast path (``nad_ext.training.train_step`` on a ``GatedModel(fuse=True)``):
  BatchNorm folded, ``nad::masked_conv2d`` where the network allows it, ``nad::gate_mse``,
  one ``nad::normalized_gradient_step_``; float32 here, and bf16 + channels_last on CUDA
  (fused-bf16, what ``nad disentangle`` runs on a GPU by default).

TF32 stays as PyTorch sets it, as in ``nad disentangle`` (the trainer never changes it): the
float32 paths' convolutions run in TF32 on Ampere and later GPUs, their matrix products do not;
the output says which.

Labels are the original network's own predictions, so that every sample counts (random weights
would otherwise classify nothing correctly and the step would skip the MSE work).

Usage (on the GPU machine):  python benchmarks/bench_step.py --models vgg16 resnet50
On a CPU, smaller defaults:   python benchmarks/bench_step.py --models zoo_plain zoo_residual
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from nad_ext import models
from nad_ext.training.objective import nad_loss, normalized_gradient_step
from nad_ext.training.step_graph import GraphedSteps
from nad_ext.training import NADConfig, build_gated_model, train_step


def timed(fn, device, warmup, repeats):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reference_style(model, names, beta, device, size):
    """One task, batch 16, hooks computing sigmoid(m) * x: the reference implementation's step."""
    modules = dict(model.named_modules())
    example = torch.zeros(1, 3, size, size, device=device)
    channels = []
    handles = [modules[n].register_forward_hook(lambda m, i, o: channels.append(o.shape[1])) for n in names]
    with torch.no_grad():
        model(example)
    for h in handles:
        h.remove()
    masks = [torch.randn(c, device=device, requires_grad=True) for c in channels]
    state = {"on": False, "acts": []}

    def gate(index):
        def hook(module, inputs, output):
            if state["on"]:
                output = output * torch.sigmoid(masks[index]).view(1, -1, *([1] * (output.dim() - 2)))
            state["acts"].append(output)
            return output
        return hook

    for i, n in enumerate(names):
        modules[n].register_forward_hook(gate(i))
    x = torch.randn(16, 3, size, size, device=device)
    with torch.no_grad():
        y = model(x).argmax(1)

    def step():
        state["on"], state["acts"] = False, []
        with torch.no_grad():
            out = model(x)
        original = [a.detach() for a in state["acts"]]
        keep = out.argmax(1) == y
        state["on"], state["acts"] = True, []
        masked_out = model(x)
        loss = F.cross_entropy(masked_out, y) + sum(F.mse_loss(a[keep], o[keep]) for a, o in zip(state["acts"], original))
        loss = loss / len(masks) + beta * sum(torch.sigmoid(m).pow(2).mean() for m in masks) / len(masks)
        grads = torch.autograd.grad(loss, masks)
        with torch.no_grad():
            for m, g in zip(masks, grads):
                m -= 0.1 * g / g.norm()
    return step, 16


def batched(model, names, beta, device, size, tasks, bf16=False):
    gated = build_gated_model(model, names, tasks, size, model_id="bench", device=device)
    n = 16 * tasks
    x = torch.randn(n, 3, size, size, device=device)
    if bf16:
        x = x.to(memory_format=torch.channels_last)
        gated.model.to(memory_format=torch.channels_last)
    ids = torch.arange(tasks, device=device).repeat_interleave(16)
    with torch.no_grad():
        y = gated.original(x, record=False)[0].argmax(1)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                out, original = gated.original(x)
            correct = out.argmax(1) == y
            for m in gated.logits:
                m.grad = None
            out, acts = gated(x, ids, record=True)
            terms = nad_loss(out, y, acts, original, correct, ids, list(gated.logits), beta)
        terms.total.backward()
        normalized_gradient_step(list(gated.logits), torch.arange(tasks, device=device), 0.1)
    return step, n


def fused(model, names, beta, device, size, tasks, dtype=torch.float32, graph=False):
    """The trainer's own step on the fused GatedModel (``graph``: replayed from a CUDA graph)."""
    gated = build_gated_model(model, names, tasks, size, model_id="bench", device=device, fuse=True, dtype=dtype)
    n = 16 * tasks
    x = torch.randn(n, 3, size, size, device=device)
    ids = torch.arange(tasks).repeat_interleave(16)
    with torch.no_grad():
        y = gated.original(x, record=False)[0].argmax(1)
    config = NADConfig(beta=beta)
    active = torch.arange(tasks)
    if graph:
        steps = GraphedSteps(gated, lambda g, *batch: train_step(g, *batch, config))
        return (lambda: steps(x, y, ids, active)), n
    return (lambda: train_step(gated, x, y, ids, active, config)), n


def tf32_settings() -> str:
    """TF32 as this process has it: PyTorch's defaults (the trainer changes nothing) are TF32 for
    cuDNN's float32 convolutions, IEEE float32 for matrix products."""
    try:
        conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    except RuntimeError:  # set per operator through PyTorch's newer API
        conv = torch.backends.cudnn.conv.fp32_precision == "tf32"
        matmul = torch.backends.cuda.matmul.fp32_precision == "tf32"
    return f"TF32 {'on' if conv else 'off'} for cuDNN convolutions, {'on' if matmul else 'off'} for matrix products"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet50"] if cuda else ["zoo_plain", "zoo_residual"])
    parser.add_argument("--tasks", type=int, default=16, help="tasks per batched step (x 16 images)")
    parser.add_argument("--size", type=int, default=None, help="input size (default: the model's)")
    parser.add_argument("--repeats", type=int, default=10 if cuda else 3)
    parser.add_argument("--warmup", type=int, default=3 if cuda else 1)
    parser.add_argument("--paths", nargs="+", help="only these paths (the first one is the ratios' base)")
    parser.add_argument("--profile", metavar="PATH", help="after timing, profile 3 steps of this path and "
                        "print the operators by device time (by CPU time without a GPU)")
    args = parser.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, "
          f"{args.tasks} tasks x 16 images per batched step")
    if cuda:
        print(f"float32 paths: {tf32_settings()}, as the trainer runs them (it leaves PyTorch's settings alone)")
    print(f"{'model':14s} {'path':16s} {'img/s':>10s} {'x ref':>7s} {'peak MiB':>9s}")
    for name in args.models:
        spec = models.get_spec(name)
        size = args.size or spec.input_size
        paths = [("reference-style", lambda m, p: reference_style(m, p, spec.beta, device, size)),
                 ("batched", lambda m, p: batched(m, p, spec.beta, device, size, args.tasks)),
                 ("fused", lambda m, p: fused(m, p, spec.beta, device, size, args.tasks))]
        if cuda:
            bf16 = torch.bfloat16
            paths += [("batched-bf16", lambda m, p: batched(m, p, spec.beta, device, size, args.tasks, bf16=True)),
                      ("fused-bf16", lambda m, p: fused(m, p, spec.beta, device, size, args.tasks, bf16)),
                      ("fused-bf16-graph", lambda m, p: fused(m, p, spec.beta, device, size, args.tasks, bf16, True))]
        if args.paths:
            paths = [(label, make) for label, make in paths if label in args.paths]
        ref = None
        for label, make in paths:
            torch.manual_seed(0)
            model = models.load_model(name, num_classes=10).to(device)
            step, images = make(model, spec.gate_points(model))
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            rate = images / timed(step, device, args.warmup, args.repeats)
            ref = ref or rate
            peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
            print(f"{name:14s} {label:16s} {rate:10.0f} {rate / ref:7.2f} {peak:9.0f}", flush=True)
            if label == args.profile:
                profile(step, device)
            del step, model
            if cuda:
                torch.cuda.empty_cache()


def profile(step, device):
    """Where the time of a step goes: operators by self device time (CPU time on a CPU)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(3):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60), flush=True)


if __name__ == "__main__":
    main()
