"""Scale-out of `nad disentangle` with torchrun: images per second for 1 and N processes, what
they exchange per epoch, and the file traffic of the epoch commit.

Runs, side by side on a zoo network and the built-in data (the zoo is trained once first, into
--cache):
- baseline: one plain process (no torchrun), with the default threads and with one thread;
- torchrun --nproc-per-node=N for each N of --procs (gloo on the CPU, NCCL with --device cuda),
  one thread per process on the CPU (torchrun's default), each process taking whole step groups.
Reads each run's log.json (epochs after the first): images/s (all images / the slowest rank's
compute time), each rank's rate, the epoch's wall time on rank 0 (compute, the wait for the other
ranks and its commit of the previous epoch), time in collectives, bytes of pickled objects
sent, and the shard bytes that go through the run folder. Then times the commit (the per-epoch
copy, log and bank, each written atomically with fsync, and reading it back) for this bank and
for an ImageNet-sized one (1,000 tasks x ResNet50's 15,168 channels), the numbers the scaling
model in benchmarks/RESULTS.md starts from.

    python benchmarks/bench_scale.py                        # CPU: zoo_residual, 1 and 2 gloo processes
    python benchmarks/bench_scale.py --device cuda --procs 1   # a GPU: 1 NCCL process

Writes its JSON (harness's schema, pytest-benchmark's format) to --json or .benchmarks/bench_scale/:
one case per run, its samples the seconds per image of each epoch after the first (so the
median's inverse is the images/s printed), its ratio paired per epoch with the baseline run's
(1 process, 1 thread on the CPU; 1 process on a GPU); one case per commit timing. The runs are
subprocesses one after another, not interleaved: ratios between them carry the machine's drift.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import harness  # noqa: E402
from nad_ext import data, models  # noqa: E402
from nad_ext.gates import GatePoint  # noqa: E402
from nad_ext.gates import MaskBank, Task  # noqa: E402
from nad_ext.training.rundir import RunDir  # noqa: E402


def launch(argv: list[str], threads: int | None, procs: int | None) -> float:
    """Runs `nad disentangle` (under torchrun when procs is given); returns the wall seconds."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(harness.source_root()), os.environ.get("PYTHONPATH", "")])}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "nad_ext", *argv] if procs is None else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", "-m", "nad_ext",
         *argv]
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=3600)
    if result.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{result.stdout[-4000:]}")
    return time.perf_counter() - start


def summarise(out: Path, channels: int) -> dict:
    epochs = json.loads((out / "log.json").read_text())["epochs"][1:]  # the first one warms up
    rate = statistics.median(e["images_per_second"] for e in epochs)
    row = {"img/s": rate, "epoch s": statistics.median(e["seconds"] for e in epochs),
           "s per image": [1 / e["images_per_second"] for e in epochs]}
    ranks = [e.get("ranks") for e in epochs]
    if ranks[0]:
        row["per rank img/s"] = [statistics.median(r[i]["images_per_second"] for r in ranks) for i in range(len(ranks[0]))]
        row["epoch s"] = statistics.median(r[0]["epoch_seconds"] for r in ranks)  # rank 0's wall time
        row["wait s"] = statistics.median(statistics.mean(x["wait_seconds"] for x in r) for r in ranks)
        row["sent B"] = statistics.median(sum(x["sent_bytes"] for x in r) for r in ranks)
        row["shard B"] = sum(x["tasks"] for x in ranks[0]) * channels * 4
    return row


def time_commit(tasks: int, channels: list[int], folder: Path, repeats: int = 3) -> tuple[list, list, int]:
    """(commit seconds, load seconds, bank bytes) of a bank of this size in a fresh run folder, one
    value per repeat."""
    bank = MaskBank("bench", [GatePoint(f"g{i}", c) for i, c in enumerate(channels)],
                    [Task(f"t{t}", (t,)) for t in range(tasks)], [torch.randn(tasks, c) for c in channels],
                    {"epochs": 21}, 1)
    commits, loads = [], []
    for r in range(repeats):
        with RunDir.open(folder / f"commit{r}", overwrite=True) as run:
            start = time.perf_counter()
            run.commit(bank, {"epoch": 1, "loss": [0.0] * tasks})
            commits.append(time.perf_counter() - start)
        start = time.perf_counter()
        MaskBank.load(folder / f"commit{r}" / "masks.safetensors")
        loads.append(time.perf_counter() - start)
    return commits, loads, (folder / "commit0" / "masks.safetensors").stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="zoo_residual", help="a zoo network")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per process)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--tasks-per-step", type=int, default=5, help="10 classes: 2 step groups of 5 tasks")
    parser.add_argument("--cache", default=".nad_cache")
    parser.add_argument("--json", metavar="PATH", help="where the JSON goes (default .benchmarks/bench_scale/...)")
    args = parser.parse_args()
    started = harness.load_average()

    train, val = data.generated_shapes("train"), data.generated_shapes("val")
    models.load_zoo(args.cache, train, val, names=[args.model], progress=False)  # trained once, before the timings
    spec = models.get_spec(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        common = ["disentangle", "--model", args.model, "--cache", args.cache, "--epochs", str(args.epochs),
                  "--tasks-per-step", str(args.tasks_per_step), "--device", args.device]
        if args.device == "cpu":
            runs = [("1 process, default threads", None, None), ("1 process, 1 thread", 1, None)]
        else:
            runs = [("1 process", None, None)]
        runs += [(f"torchrun, {n} process{'es' if n > 1 else ''}", 1 if args.device == "cpu" else None, n)
                 for n in args.procs]
        rows = []
        for i, (label, threads, procs) in enumerate(runs):
            out = tmp / f"run{i}"
            wall = launch([*common, "--out", str(out)], threads, procs)
            bank = MaskBank.load(out / "masks.safetensors")
            rows.append((label, wall, summarise(out, sum(bank.layer_sizes))))
        channels = bank.layer_sizes
        commit_small = time_commit(len(bank.tasks), channels, tmp)
        commit_imagenet = time_commit(1000, [15168], tmp, repeats=2)

    print(harness.header(args.device))
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    print(f"{args.model} on {device}, torch {torch.__version__}, {len(train)} training images x {args.epochs} "
          f"epochs, {len(bank.tasks)} tasks, {sum(channels)} channels, {args.tasks_per_step} tasks per step")
    base = rows[1][2]["img/s"] if args.device == "cpu" else rows[0][2]["img/s"]  # 1 process, 1 thread on CPUs
    print(f"{'run':28s} {'img/s':>7s} {'x base':>7s} {'per rank':>15s} {'epoch s':>8s} {'wait s':>7s} "
          f"{'sent B':>7s} {'shard B':>8s} {'wall s':>7s}")
    for label, wall, r in rows:
        per = "/".join(f"{v:.0f}" for v in r.get("per rank img/s", []))
        print(f"{label:28s} {r['img/s']:7.0f} {r['img/s'] / base:7.2f} {per:>15s} {r['epoch s']:8.2f} "
              f"{r.get('wait s', 0):7.3f} {r.get('sent B', 0):7.0f} {r.get('shard B', 0):8.0f} {wall:7.1f}")
    for what, (commit, load, size) in (("this bank", commit_small), ("ImageNet-sized bank", commit_imagenet)):
        print(f"commit of {what} ({size / 1e6:.2f} MB; copy + log + bank, fsynced): "
              f"{statistics.median(commit) * 1e3:.1f} ms; reading it back (with checksums): "
              f"{statistics.median(load) * 1e3:.1f} ms")

    base_label = rows[1][0] if args.device == "cpu" else rows[0][0]
    base_samples = dict((label, r["s per image"]) for label, _, r in rows)[base_label]
    group = f"disentangle {args.model} scale-out [{args.device}]"
    results = [harness.result(group, label, r["s per image"], baseline=base_label, baseline_samples=base_samples,
                              timer="log.json: seconds per image of each epoch after the first", items=1,
                              unit="img/s", note=f"wall {wall:.1f} s", check="not checked here (python_tests/"
                              "test_distributed.py checks the bank against one process)",
                              extra={k: v for k, v in r.items() if k not in ("s per image",)})
               for label, wall, r in rows]
    commits = []
    for what, (commit, load, size) in (("this bank", commit_small), ("ImageNet-sized bank", commit_imagenet)):
        group_c = f"run-folder commit, {what} ({size / 1e6:.2f} MB) [{args.device}]"
        commits += [harness.result(group_c, "commit", commit, baseline="commit", baseline_samples=commit,
                                   timer="time.perf_counter", note="copy + log + bank, each fsynced"),
                    harness.result(group_c, "load", load, baseline="commit", baseline_samples=commit,
                                   timer="time.perf_counter", note="MaskBank.load with checksums")]
    path = harness.write_json(args.json, [(None, results), (None, commits)], args.device, "bench_scale.py", False,
                              started)
    print(f"JSON: {path}")


if __name__ == "__main__":
    main()
