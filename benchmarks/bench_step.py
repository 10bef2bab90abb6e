"""End-to-end NAD step throughput: images per second for one full step (original forward,
masked forward, backward to the gates, normalised-gradient update).

Paths, measured side by side in one run (``harness.measure``: interleaved rounds, medians and
interquartile ranges; CUDA-event times on a GPU):

- ``reference-style``: the reference implementation's loop: gates as forward hooks computing
  sigmoid(m) * x, one task at a time, batch 16, fp32 eager: the baseline;
- ``reference-style-compiled``: the same step function under ``torch.compile`` (Inductor, default
  mode; compilation happens in the warm-up and is reported as ``first_call_s``);
- ``batched``: nad_ext's GatedModel + objective, ``tasks`` tasks x 16 images per step, fp32 eager
  (``nad::task_gate`` gates, per-task losses and updates);
- ``fused``: the trainer's own step (``nad_ext.training.train_step`` on ``GatedModel(fuse=True)``):
  BatchNorm folded, ``nad::masked_conv2d`` where the network allows it, ``nad::gate_mse``, one
  ``nad::normalized_gradient_step_``; float32;
- CUDA only: ``batched-bf16`` (bf16 autocast, channels_last), ``fused-bf16`` and
  ``fused-bf16-graph`` (replayed from a CUDA graph: what ``nad disentangle`` runs on a GPU by
  default; a failed capture fails the benchmark instead of timing the eager step).

Before any timing every path makes one step from the same gate logits of task 0 on the same 16
images, and its update of task 0 is checked against the reference-style loop's (cosine of each
gate point's update). TF32 stays as PyTorch sets it, as in ``nad disentangle`` (the trainer never
changes it): the float32 paths' convolutions run in TF32 on Ampere and later GPUs, their matrix
products do not; the output says which. Labels are the original network's own predictions, so
that every sample counts.

    python benchmarks/bench_step.py --models vgg16 resnet50      # on the GPU machine
    python benchmarks/bench_step.py                              # CPU: zoo_plain, zoo_residual at 64x64
    pytest benchmarks/bench_step.py                              # CPU: both zoo networks, 8 tasks
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from nad_ext import models  # noqa: E402
from nad_ext.training import NADConfig, build_gated_model, train_step  # noqa: E402
from nad_ext.training.objective import nad_loss, normalized_gradient_step  # noqa: E402
from nad_ext.training.step_graph import GraphedSteps  # noqa: E402

CUDA = torch.cuda.is_available()
LR = 0.1
BATCH = 16  # images per task


class Step:
    """One path: ``step()`` (the timed unit), and task 0's gate logits for the check."""

    def __init__(self, step, images: int, task0, set_task0):
        self.step, self.images, self.task0, self.set_task0 = step, images, task0, set_task0


def _frozen(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():  # as GatedModel does: a recorded output must not change afterwards
        if hasattr(m, "inplace"):
            m.inplace = False
    return model


def reference_style(model, specs, beta, device, x, y, compile_backend=None) -> Step:
    """One task, batch 16, hooks computing sigmoid(m) * x: the reference implementation's step
    (the same objective as ``nad_loss`` for one task; a ``:relu`` gate point records relu)."""
    model = _frozen(model)
    modules = dict(model.named_modules())
    names = [s.split(":")[0] for s in specs]
    relu = [s.endswith(":relu") for s in specs]
    channels = []
    handles = [modules[n].register_forward_hook(lambda m, i, o: channels.append(o.shape[1])) for n in names]
    with torch.no_grad():
        model(x[:1])
    for h in handles:
        h.remove()
    masks = [torch.zeros(c, device=device, requires_grad=True) for c in channels]
    state = {"on": False, "acts": []}

    def gate(index):
        def hook(module, inputs, output):
            if state["on"]:
                output = output * torch.sigmoid(masks[index]).view(1, -1, *([1] * (output.dim() - 2)))
            state["acts"].append(torch.relu(output) if relu[index] else output)
            return output
        return hook

    for i, n in enumerate(names):
        modules[n].register_forward_hook(gate(i))

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
                m -= LR * g / g.norm()

    run = torch.compile(step, backend=compile_backend) if compile_backend else step

    def set_task0(init):
        with torch.no_grad():
            for m, v in zip(masks, init):
                m.copy_(v)

    return Step(run, BATCH, lambda: [m.detach().clone() for m in masks], set_task0)


def _gated_task0(gated):
    def task0():
        return [m.detach()[0].clone() for m in gated.logits]

    def set_task0(init):
        with torch.no_grad():
            for m, v in zip(gated.logits, init):
                m[0].copy_(v)
    return task0, set_task0


def batched(model, specs, beta, device, size, tasks, x, y, bf16=False) -> Step:
    gated = build_gated_model(model, specs, tasks, size, model_id="bench", device=device)
    if bf16:
        x = x.to(memory_format=torch.channels_last)
        gated.model.to(memory_format=torch.channels_last)
    ids = torch.arange(tasks, device=device).repeat_interleave(BATCH)
    everyone = torch.arange(tasks, device=device)

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
        normalized_gradient_step(list(gated.logits), everyone, LR)
    return Step(step, len(x), *_gated_task0(gated))


def fused(model, specs, beta, device, size, tasks, x, y, dtype=torch.float32, graph=False) -> Step:
    """The trainer's own step on the fused GatedModel (``graph``: replayed from a CUDA graph)."""
    gated = build_gated_model(model, specs, tasks, size, model_id="bench", device=device, fuse=True, dtype=dtype)
    ids = torch.arange(tasks).repeat_interleave(BATCH)
    config = NADConfig(beta=beta, lr=LR)
    active = torch.arange(tasks)
    if not graph:
        return Step(lambda: train_step(gated, x, y, ids, active, config), len(x), *_gated_task0(gated))
    steps = GraphedSteps(gated, lambda g, *batch: train_step(g, *batch, config))

    def step():
        steps(x, y, ids, active)
        if steps.failed or not steps.graphs:  # GraphedSteps would go on eagerly: not what this path times
            raise RuntimeError("CUDA graph capture failed (see the warning above): this path would time the "
                               "eager step")
    return Step(step, len(x), *_gated_task0(gated))


PATHS_CPU = ["reference-style", "reference-style-compiled", "batched", "fused"]
PATHS_CUDA = PATHS_CPU + ["batched-bf16", "fused-bf16", "fused-bf16-graph"]
TARGETS = {("vgg16", "fused-bf16-graph"): ["step-vgg16-cuda"], ("resnet50", "fused-bf16-graph"): ["step-resnet50-cuda"]}


def comparison(name: str, device: str, tasks: int, size: int | None = None, paths=None, smoke: bool = False
               ) -> harness.Comparison:
    device = torch.device(device)
    spec = models.get_spec(name)
    size = size or spec.input_size
    paths = paths or (PATHS_CUDA if device.type == "cuda" else PATHS_CPU)
    if "reference-style" not in paths:
        paths = ["reference-style", *paths]  # the baseline and the check's reference
    torch.manual_seed(0)
    net = models.load_model(name, num_classes=10).to(device)
    specs = spec.gate_points(net)
    x = torch.randn(BATCH * tasks, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        y = _frozen(net)(x).argmax(1)  # labels: the network's own predictions, every sample counts
    beta = spec.beta if spec.beta is not None else 1.0

    def fresh():
        torch.manual_seed(0)
        return models.load_model(name, num_classes=10).to(device)

    compile_backend = "eager" if smoke else "inductor"
    bf16 = torch.bfloat16
    builders = {
        "reference-style": lambda: reference_style(fresh(), specs, beta, device, x[:BATCH], y[:BATCH]),
        "reference-style-compiled": lambda: reference_style(fresh(), specs, beta, device, x[:BATCH], y[:BATCH],
                                                            compile_backend),
        "batched": lambda: batched(fresh(), specs, beta, device, size, tasks, x, y),
        "fused": lambda: fused(fresh(), specs, beta, device, size, tasks, x, y),
        "batched-bf16": lambda: batched(fresh(), specs, beta, device, size, tasks, x, y, bf16=True),
        "fused-bf16": lambda: fused(fresh(), specs, beta, device, size, tasks, x, y, bf16),
        "fused-bf16-graph": lambda: fused(fresh(), specs, beta, device, size, tasks, x, y, bf16, graph=True),
    }
    steps = {label: builders[label]() for label in paths}
    g = torch.Generator(device).manual_seed(2)
    init = [torch.randn(v.shape, generator=g, device=device) for v in steps["reference-style"].task0()]
    for s in steps.values():
        s.set_task0(init)
    expected = {}

    def check_for(label):
        low = "bf16" in label
        floor = 0.95 if low else 0.999  # bf16 moves the gradient's direction by ~1e-2; TF32 by ~1e-3

        def check(_):
            got = steps[label].task0()
            if label == "reference-style":
                expected["update"] = [g - i for g, i in zip(got, init)]
                return "the reference (reference-style eager, task 0)"
            cosines = [F.cosine_similarity((g - i).flatten().float(), e.flatten().float(), dim=0).item()
                       for g, i, e in zip(got, init, expected["update"])]
            assert min(cosines) >= floor, (f"task 0's update differs from the reference-style loop's: cosine per "
                                           f"gate point {[round(c, 4) for c in cosines]} (at least {floor} expected)")
            return f"passed (task 0's update: min cosine {min(cosines):.5f} over {len(cosines)} gate points)"
        return check

    timed_paths = [harness.Path(label, s.step, check_for(label), label, items=s.images, unit="img/s",
                                targets=TARGETS.get((name, label), ())) for label, s in steps.items()]
    return harness.Comparison(f"NAD step {name} {size}x{size} [{device.type}]", timed_paths, "reference-style",
                              str(device), {"model": name, "image_size": size, "tasks_per_step": tasks,
                                            "images_per_task": BATCH, "beta": beta,
                                            "tf32": harness.tf32_settings()["text"]})


# ---- pytest-benchmark (CPU: the zoo networks at 64x64, 8 tasks per batched step) ----------------

PYTEST_MODELS = {"zoo_plain": 8, "zoo_residual": 8}


@pytest.mark.benchmark(timer=harness.REPLAY)
@pytest.mark.parametrize("model,path", [pytest.param(m, p, id=f"{m}-{p}") for m in PYTEST_MODELS for p in PATHS_CPU])
def test_step(benchmark, suite, model, path):
    def make(smoke):
        if smoke:
            return comparison(model, "cpu", 2, size=32, smoke=True)
        return comparison(model, "cpu", PYTEST_MODELS[model])
    suite.record(benchmark, f"step-{model}", make, path, rounds=7, warmup=2, min_sample_s=0.0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet50"] if CUDA else ["zoo_plain", "zoo_residual"])
    parser.add_argument("--device", default="cuda" if CUDA else "cpu")
    parser.add_argument("--tasks", type=int, default=16, help="tasks per batched step (x 16 images)")
    parser.add_argument("--size", type=int, default=None, help="input size (default: the model's)")
    parser.add_argument("--rounds", "--repeats", type=int, default=10, help="interleaved rounds (default 10)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="per model: no new round after this long (at least 3 rounds)")
    parser.add_argument("--paths", nargs="+", choices=PATHS_CUDA,
                        help="only these paths (reference-style is always measured: the baseline)")
    parser.add_argument("--threads", type=int, default=None, help="PyTorch intra-op threads (default: PyTorch's)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one step per path, eager compile backend")
    parser.add_argument("--json", metavar="PATH", help="where the JSON goes (default .benchmarks/bench_step/...)")
    parser.add_argument("--profile", metavar="PATH", help="after timing, profile 3 steps of this path and "
                        "print the operators by device time (by CPU time without a GPU)")
    args = parser.parse_args(argv)
    harness.set_threads(args.threads)
    started = harness.load_average()
    device = torch.device(args.device)
    tasks, size = (2, 32) if args.smoke else (args.tasks, args.size)
    print(harness.header(device, f"{tasks} tasks x {BATCH} images per batched step"))
    runs, path = [], None
    for name in args.models:
        cmp = comparison(name, args.device, tasks, size, args.paths, smoke=args.smoke)
        step = {p.name: p.run for p in cmp.paths}.get(args.profile)
        results = harness.measure(cmp, rounds=args.rounds, warmup=args.warmup, min_sample_s=0.0,
                                  max_seconds=args.max_seconds, smoke=args.smoke)
        print(harness.table(results), flush=True)
        runs.append((cmp, results))
        # written after each model: a run cut by a time limit keeps the models it finished
        path = harness.write_json(args.json or path, runs, device, "bench_step.py", args.smoke, started)
        if step is not None:
            profile(step, device)
        del cmp, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\nload average {' '.join(map(str, started))} at the start, "
          f"{' '.join(map(str, harness.load_average()))} at the end; JSON: {path}")


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
