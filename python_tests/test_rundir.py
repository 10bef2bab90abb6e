"""The run folder after crashes, full disks and damage (nad_ext.training.rundir,
nad_ext._utils.storage, nad_ext._utils.faults).

Crashes are real: the run goes to a child process (forked from a server that has imported
nad_ext, so that a child starts in milliseconds) that SIGKILLs itself at the n-th write event or
training step (nad_ext._utils.faults); the resumed run must give the files of an uninterrupted one.
"""
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from nad_ext._utils import faults
from nad_ext.data import ImageSet
from nad_ext.gates import MaskBank
from nad_ext.training.rundir import RunDir, RunLockedError
from nad_ext._utils.storage import WriteError
from nad_ext.training import NADConfig, Network, disentangle

CONFIG = NADConfig(beta=1.0, epochs=2, image_size=16, batch_size=8, tasks_per_step=2)
TIMINGS = ("images_per_second", "seconds", "ranks", "data_wait_s", "step_s")


def images(per_class=(10, 6, 8)):
    """Class c: a uniform image whose colour channel c is bright, with a little noise."""
    gen = torch.Generator().manual_seed(0)
    out, labels = [], []
    for c, n in enumerate(per_class):
        base = torch.zeros(n, 3, 16, 16)
        base[:, c] = 0.8
        out.append(((base + 0.1 * torch.rand(n, 3, 16, 16, generator=gen)).clamp(0, 1) * 255).to(torch.uint8))
        labels += [c] * n
    return ImageSet([f"c{c}" for c in range(len(per_class))], labels, "colours", images=torch.cat(out))


def model():
    """Channels 2c, 2c+1 respond to class c; the classifier reads them (so most samples count)."""
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].bias.fill_(-5.0)
        net[4].weight.zero_()
        net[4].bias.zero_()
        for c in range(3):
            net[0].weight[2 * c: 2 * c + 2, c] = 1.0
            net[0].bias[2 * c: 2 * c + 2] = 0.0
            net[4].weight[c, 2 * c: 2 * c + 2] = 2.0
    return net.eval()


def train(out, resume=False, config=CONFIG, fault=None, **kwargs):
    """``disentangle`` with the fault spec ``fault`` in this process; returns the write events.
    One thread: fast on a busy machine, and the same arithmetic in every process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return faults.run_with(fault, disentangle, Network(model(), ["1"], "known"), images(), config=config,
                               out_dir=out, resume=resume, progress=False, **kwargs)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def child():
    """``child(fn, *args)``: runs fn in a fresh child process; its result, or None if it was killed."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["nad_ext.training", "nad_ext.models"])

    def run(fn, *args, **kwargs):
        with ProcessPoolExecutor(1, mp_context=ctx) as pool:
            try:
                return pool.submit(fn, *args, **kwargs).result(timeout=300)
            except BrokenProcessPool:
                return None
    return run


def read_folder(folder: Path) -> dict:
    """Everything a run folder says: file names, banks (tensors and metadata), the log minus timings."""
    out = {"files": sorted(p.name for p in folder.iterdir())}
    for p in sorted(folder.glob("*.safetensors")):
        with safe_open(str(p), framework="pt") as f:
            out[p.name] = ({k: f.get_tensor(k) for k in f.keys()}, f.metadata())
    if (folder / "log.json").exists():
        log = json.loads((folder / "log.json").read_text())
        log["epochs"] = [{k: v for k, v in e.items() if k not in TIMINGS} for e in log["epochs"]]
        out["log.json"] = log
    return out


def assert_same_folder(actual: Path, expected: Path) -> None:
    a, e = read_folder(actual), read_folder(expected)
    assert a["files"] == e["files"]
    for name in e:
        if name.endswith(".safetensors"):
            (ta, ma), (te, me) = a[name], e[name]
            assert ma == me, name
            assert ta.keys() == te.keys() and all(torch.equal(ta[k], te[k]) for k in te), name  # bit-identical
    assert a["log.json"] == e["log.json"]


@pytest.fixture(scope="module")
def reference(child, tmp_path_factory):
    """An uninterrupted run, in a child like the crashed ones: (folder, its write events)."""
    folder = tmp_path_factory.mktemp("reference") / "run"
    return folder, child(train, folder)


def test_an_epoch_commits_copy_then_log_then_bank(reference):
    folder, events = reference
    files = [e.split()[3] for e in events if e.split()[2] == "renamed"]
    assert files == ["masks_epoch01.safetensors", "log.json", "masks.safetensors"] + \
                   ["masks_epoch02.safetensors", "log.json", "masks.safetensors"]
    assert len(events) == 18  # open, written, renamed for each of the 6 writes
    assert read_folder(folder)["files"] == [".nad.lock", "log.json", "masks.safetensors",
                                            "masks_epoch01.safetensors", "masks_epoch02.safetensors"]


def committed_epoch(events: list[str], point: str) -> int:
    """The epoch committed when the fault ``point`` killed the run: the bank renames at or before
    a killed write event (the kill comes after the event), or those before a step of epoch E."""
    kind, *nums = point.removeprefix("at=").split(":")
    if kind == "write":
        return sum(1 for e in events[:int(nums[0])] if e.endswith("renamed masks.safetensors"))
    return int(nums[0]) - 1


def assert_rolled_back(out: Path, reference: Path, epoch: int, point: str) -> None:
    """Opening the killed run's folder for resume (as ``disentangle(resume=True)`` does, before any
    training) brings it to the committed ``epoch``: no later epoch copies or log entries, the
    bank that epoch's, no temporary files; the resumed training then overwrites nothing stale."""
    expected = read_folder(reference)
    with RunDir.open(out, resume=True) as run:
        assert run.epoch == epoch, point
        opened = read_folder(out)
    copies = [f"masks_epoch{e:02d}.safetensors" for e in range(1, epoch + 1)]
    committed = ["log.json", "masks.safetensors"] if epoch else []
    assert opened["files"] == sorted([".nad.lock", *copies, *committed]), point
    if epoch == 0:
        return
    tensors, meta = opened["masks.safetensors"]
    ref_tensors, ref_meta = expected[copies[-1]]  # the uninterrupted run's bank after that epoch
    assert meta == ref_meta and tensors.keys() == ref_tensors.keys(), point
    assert all(torch.equal(tensors[k], ref_tensors[k]) for k in ref_tensors), point
    assert opened["log.json"]["epochs"] == expected["log.json"]["epochs"][:epoch], point
    assert [e.get("epoch") for e in run.log] == list(range(1, epoch + 1)), point


@pytest.mark.slow
def test_sigkill_at_every_write_and_mid_epoch_then_resume_gives_the_uninterrupted_run(child, reference, tmp_path):
    folder, events = reference
    points = [f"at=write:{n}" for n in range(1, len(events) + 1)] + ["at=step:2:2"]
    temp_files_seen = 0
    for point in points:
        out = tmp_path / point.replace(":", "_").replace("=", "_")
        assert child(train, out, fault=point) is None, f"{point}: the child was not killed"
        # What a crash leaves: the bank is absent or a complete earlier epoch, never a partial file.
        if (out / "masks.safetensors").exists():
            assert MaskBank.load(out / "masks.safetensors").epoch in (1, 2)
        temp_files_seen += len(list(out.glob(".*.tmp")))
        assert_rolled_back(out, folder, committed_epoch(events, point), point)
        train(out, resume=True)
        assert_same_folder(out, folder)
        assert not list(out.glob(".*.tmp")), f"{point}: temporary files survived the resume"
    assert temp_files_seen >= 12  # the kills at 'open' and 'written' each left one


def test_a_full_disk_names_the_file_keeps_the_last_epoch_and_resumes(reference, tmp_path):
    folder, _ = reference
    out = tmp_path / "run"
    # Event 14: log.json of epoch 2 is complete in its temporary file but not yet renamed.
    with pytest.raises(WriteError) as caught:
        train(out, fault="at=write:14,action=enospc")
    message = str(caught.value)
    assert f"cannot write {out / 'log.json'}: No space left on device" in message
    assert "intact at its last committed epoch 1" in message and "--resume" in message
    assert MaskBank.load(out / "masks.safetensors").epoch == 1
    assert not list(out.glob(".*.tmp"))
    train(out, resume=True)
    assert_same_folder(out, folder)


def test_resume_without_a_bank_says_it_starts_a_new_run(tmp_path, capfd):
    train(tmp_path / "run", resume=True, config=NADConfig(**{**CONFIG.__dict__, "epochs": 1}))
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "has no mask bank yet: starting a new run" in err
    with pytest.raises(FileNotFoundError, match="cannot resume: .* has no mask bank"):
        train(tmp_path / "other", resume="strict")


def test_a_second_writer_is_refused_with_the_holders_pid(child, tmp_path):
    out = tmp_path / "run"
    with RunDir.open(out):
        with pytest.raises(RunLockedError, match=f"in use by process {os.getpid()} on "):
            train(out)
        with pytest.raises(RunLockedError, match=f"in use by process {os.getpid()} on "):  # from another process
            child(RunDir.open, out)
    train(out)  # released
    assert MaskBank.load(out / "masks.safetensors").epoch == 2


def test_a_corrupted_bank_is_named_and_not_resumed(tmp_path):
    out = tmp_path / "run"
    train(out, config=NADConfig(**{**CONFIG.__dict__, "epochs": 1}))
    bank = out / "masks.safetensors"
    raw = bytearray(bank.read_bytes())
    raw[-6:-1] = bytes(b ^ 0x5A for b in raw[-6:-1])  # five bytes of the last (only) tensor
    bank.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"tensor 'logits.000' \(gate point '1'\) fails its CRC-32 check.*"
                                         r"masks_epoch01.safetensors may hold the same epoch"):
        train(out, resume=True)


def test_a_folder_of_the_old_protocol_is_repaired(reference, tmp_path):
    """Before the commit protocol the bank was saved first: a kill then left the bank at epoch N
    without its copy, and a log ending at N - 1; and banks had no checksums."""
    from safetensors.torch import save_file

    out = tmp_path / "run"
    train(out)
    (out / "masks_epoch02.safetensors").unlink()
    log = json.loads((out / "log.json").read_text())
    (out / "log.json").write_text(json.dumps({**log, "epochs": log["epochs"][:1]}))
    with safe_open(str(out / "masks.safetensors"), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    del meta["crc32"]
    save_file(tensors, str(out / "masks.safetensors"), metadata=meta)
    with pytest.warns(UserWarning, match="has no checksums"):
        train(out, resume=True)
    repaired = read_folder(out)
    expected = read_folder(reference[0])
    assert repaired["files"] == expected["files"]
    assert torch.equal(repaired["masks_epoch02.safetensors"][0]["logits.000"],
                       expected["masks_epoch02.safetensors"][0]["logits.000"])
    assert repaired["log.json"]["epochs"][1] == {"epoch": 2, "lost": True}


def test_fault_specs_are_checked():
    for bad in ("at=write", "at=write:0", "at=step:1", "action=kill", "at=step:1:1,action=enospc", "when=now"):
        with pytest.raises(ValueError, match="NAD_FAULT"):
            faults.parse(bad)
    assert faults.parse("at=step:2:3,rank=1,attempt=0") == {"action": "kill", "at": ("step", 2, 3), "rank": 1,
                                                             "attempt": 0}
