"""One run across processes with torchrun on the CPU (gloo): the bank and analyses equal a
single-process run's, bit for bit, also after a killed rank, on two "nodes", and with another
number of processes on resume (nad_ext.distributed).

Each torchrun here is a real one (``python -m torch.distributed.run``), launched in its own
session with a timeout, and its whole process group is killed if anything is left.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nad_ext import cli, data, models
from nad_ext._utils import faults
from nad_ext.distributed import Context, shard_groups
from test_rundir import assert_same_folder

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"circle": 7, "cross": 3, "square": 6, "star": 4, "triangle": 5}  # training images per class
TIMEOUT = 240


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """An ImageFolder tree of 5 classes of different sizes, 32 x 32."""
    root = tmp_path_factory.mktemp("tree")
    for split in ("train", "val"):
        images = data.generated_shapes(split, num_classes=5, images_per_class=7, image_size=32)
        kept = {}
        for i in range(len(images)):
            name = images.classes[images.labels[i]]
            if kept.get(name, 0) < (SIZES[name] if split == "train" else 3):
                kept[name] = kept.get(name, 0) + 1
                (root / split / name).mkdir(parents=True, exist_ok=True)
                Image.fromarray(images.load(i).permute(1, 2, 0).numpy()).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "plain.pt"
    torch.save(models.get_spec("zoo_plain").build(5).state_dict(), path)
    return path


def disentangle_args(tree, weights, out, epochs=2):
    return ["disentangle", "--model", "zoo_plain", "--weights", str(weights), "--data", str(tree), "--out", str(out),
            "--image-size", "32", "--beta", "1.0", "--epochs", str(epochs), "--tasks-per-step", "2"]


def analyze_args(tree, weights, bank, out):
    return ["analyze", "--model", "zoo_plain", "--weights", str(weights), "--data", str(tree), "--bank", str(bank),
            "--out", str(out), "--mosaics", "6", "--image-size", "32"]


def in_process(*argv, fault=None):
    """The CLI in this process, on one thread like each torchrun worker; its exit code."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    faults.configure(fault)
    try:
        return cli.main([str(a) for a in argv])
    finally:
        faults.configure(None)
        torch.set_num_threads(threads)


def torchrun(*args, env=None, wait=True):
    """``python -m torch.distributed.run ARGS`` in its own session; (returncode, output) or the Popen."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *map(str, args)], env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return finish(proc) if wait else proc


def finish(proc):
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        timed_out, out = True, ""
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # nothing of this launch survives the test
        except ProcessLookupError:
            pass
    proc.wait()
    assert not timed_out, f"torchrun did not finish within {TIMEOUT} s"
    return proc.returncode, out


@pytest.fixture(scope="module")
def reference(tree, weights, tmp_path_factory):
    """A single-process run of the same settings."""
    out = tmp_path_factory.mktemp("single") / "run"
    assert in_process(*disentangle_args(tree, weights, out)) == 0
    return out


def test_groups_are_dealt_largest_first_to_the_least_loaded_rank():
    # 9 -> rank 0; 7 -> 1; 7 -> 1 (7 < 9); 5 -> 0 (9 < 14); 2 -> 0 (14 = 14: the lower rank)
    assert shard_groups([5, 9, 2, 7, 7], 2) == [[0, 1, 2], [3, 4]]
    assert shard_groups([3, 3, 3], 1) == [[0, 1, 2]]
    assert shard_groups([4], 3) == [[0], [], []]
    # Whole step groups of consecutive tasks, in order: the steps of a single process.
    sizes = [SIZES[c] for c in sorted(SIZES)]  # circle, cross, square, star, triangle
    assert Context(rank=0, world_size=2).my_tasks(sizes, 2) == [0, 1, 4]
    assert Context(rank=1, world_size=2).my_tasks(sizes, 2) == [2, 3]
    assert Context().my_tasks(sizes, 2) == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_two_processes_give_the_single_process_bank_and_analyses(tree, weights, reference, tmp_path):
    out = tmp_path / "run"
    code, log = torchrun("--standalone", "--nproc-per-node=2", "-m", "nad_ext", *disentangle_args(tree, weights, out))
    assert code == 0, log
    assert_same_folder(out, reference)  # bank, copies bit-identical; log equal but for timings
    epochs = json.loads((out / "log.json").read_text())["epochs"]
    assert [(r["rank"], r["tasks"], r["images"]) for r in epochs[-1]["ranks"]] == [(0, 3, 15), (1, 2, 10)]
    assert all(r["images_per_second"] > 0 for r in epochs[-1]["ranks"])

    single, shared = tmp_path / "analysis1", tmp_path / "analysis2"
    assert in_process(*analyze_args(tree, weights, reference / "masks.safetensors", single)) == 0
    code, log = torchrun("--standalone", "--nproc-per-node=2", "-m", "nad_ext",
                         *analyze_args(tree, weights, out / "masks.safetensors", shared))
    assert code == 0, log
    for name in ("results.json", "similarity_iou.csv", "similarity_iomin.csv"):
        assert (shared / name).read_text() == (single / name).read_text(), name
    a, b = np.load(shared / "hit_rate_examples.npz"), np.load(single / "hit_rate_examples.npz")
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in b)


@pytest.mark.slow
def test_two_processes_give_the_single_process_bank_with_the_selective_objective(tree, weights, tmp_path):
    # Each task's negatives come from its own generator: the sharding of tasks changes nothing.
    selective = ["--negatives", "0.5", "--negative-weight", "2"]
    single, out = tmp_path / "single", tmp_path / "run"
    assert in_process(*disentangle_args(tree, weights, single), *selective) == 0
    code, log = torchrun("--standalone", "--nproc-per-node=2", "-m", "nad_ext",
                         *disentangle_args(tree, weights, out), *selective)
    assert code == 0, log
    assert_same_folder(out, single)
    epochs = json.loads((out / "log.json").read_text())["epochs"]
    assert len(epochs[-1]["negative"]) == len(SIZES) and any(v > 0 for v in epochs[-1]["negative"])  # logged


@pytest.mark.slow
def test_a_killed_rank_is_restarted_and_the_run_resumes_from_the_last_epoch(tree, weights, reference, tmp_path):
    out = tmp_path / "run"
    code, log = torchrun("--standalone", "--nproc-per-node=2", "--max-restarts=1", "--monitor-interval=0.2",
                         "-m", "nad_ext", *disentangle_args(tree, weights, out), "--resume",
                         env={"NAD_FAULT": "at=step:2:1,rank=1,attempt=0"})  # rank 1 dies in epoch 2, once
    assert code == 0, log
    assert "exitcode: -9" in log  # the agent saw rank 1 killed by SIGKILL, and restarted the group
    assert log.count("starting a new run") == 1  # the first attempt
    assert "continuing " + str(out) + " from its committed epoch 1" in log  # the restart
    assert_same_folder(out, reference)


@pytest.mark.slow
def test_two_nodes_resume_a_run_of_one_process(tree, weights, reference, tmp_path):
    out = tmp_path / "run"
    # A single process stops after epoch 1: its disk is full when epoch 2's copy is written.
    assert in_process(*disentangle_args(tree, weights, out), fault="at=write:10,action=enospc") == 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
              "--rdzv-id=nad-test", "--local-addr=127.0.0.1"]
    argv = ["-m", "nad_ext", *disentangle_args(tree, weights, out), "--resume"]
    first = torchrun(*common, "--rdzv-conf=is_host=1", *argv, wait=False)
    time.sleep(1.0)
    second = torchrun(*common, "--rdzv-conf=is_host=0", *argv, wait=False)
    (code1, log1), (code2, log2) = finish(first), finish(second)
    assert code1 == 0 and code2 == 0, log1 + log2
    assert_same_folder(out, reference)
    ranks = json.loads((out / "log.json").read_text())["epochs"]
    assert "ranks" not in ranks[0] and len(ranks[1]["ranks"]) == 2


@pytest.mark.slow
def test_a_failing_rank_stops_every_rank_with_its_error(tree, weights, tmp_path):
    start = time.monotonic()
    code, log = torchrun("--standalone", "--nproc-per-node=2", "-m", "nad_ext",
                         *disentangle_args(tree, weights, tmp_path / "run"),
                         env={"NAD_FAULT": "at=write:1,action=enospc,rank=1"})  # rank 1's first shard
    assert code != 0
    assert "cannot write" in log and "shards/epoch001-rank00001.safetensors: No space left on device" in log
    assert "error: rank 1 failed in epoch 1: WriteError" in log  # what rank 0 says
    assert time.monotonic() - start < TIMEOUT


@pytest.mark.slow
def test_beta_auto_under_torchrun_is_the_single_process_calibration(tree, weights, tmp_path):
    """beta="auto": every rank runs the calibration's short runs in its own process (no
    collective, no run folder), all take rank 0's beta, and the bank (with its calibration
    record) equals a single process's."""
    args = lambda out: [a if a != "1.0" else "auto" for a in disentangle_args(tree, weights, out, epochs=1)]  # noqa: E731
    single = tmp_path / "single"
    assert in_process(*args(single)) == 0
    out = tmp_path / "run"
    code, log = torchrun("--standalone", "--nproc-per-node=2", "-m", "nad_ext", *args(out))
    assert code == 0, log
    assert log.count("calibrating beta for zoo_plain") == 1  # printed by rank 0 only
    assert_same_folder(out, single)
    from nad_ext.gates import MaskBank

    bank = MaskBank.load(out / "masks.safetensors")
    assert bank.calibration is not None and bank.config["beta"] == bank.calibration["beta"]
