"""The per-image path store (nad_ext.gates.pathstore, issue 26): bit packing, shards, resume
after a crash, corruption, disk-space estimate, refusals."""
import json
import shutil
from collections import namedtuple

import numpy as np
import pytest
import torch

from nad_ext._utils import faults
from nad_ext._utils.storage import CorruptFileError, WriteError
from nad_ext.gates import GatePoint
from nad_ext.gates.pathstore import (FORMAT, MANIFEST, InsufficientSpaceError, PathChunk, PathStore,
                                     check_disk_space, estimate_bytes, pack_bits, shard_name, unpack_bits)

POINTS = [GatePoint("conv1", 13), GatePoint("blocks.0", 8, 2), GatePoint("attn", 3, 2, "heads"),
          GatePoint("fc", 21, record="relu")]
META = {"target": "label", "steps": 30, "views": 4, "beta": 0.5}


def chunk(indices, points=POINTS, seed=0):
    g = torch.Generator().manual_seed(seed + (indices[0] if len(indices) else 0))
    n = len(indices)
    idx = torch.as_tensor(indices, dtype=torch.int64)
    return PathChunk(image_index=idx, label=idx % 7, target=idx % 5, prediction=idx % 3,
                     status=(idx % 4).to(torch.int8),
                     logits=[torch.randn(n, p.channels, generator=g) for p in points])


def cat(chunks):
    return PathChunk(*(torch.cat([getattr(c, f) for c in chunks]) for f in
                       ("image_index", "label", "target", "prediction", "status")),
                     logits=[torch.cat(ms) for ms in zip(*(c.logits for c in chunks))])


# --- bits -------------------------------------------------------------------------------------

def test_bit_order_is_pinned():
    # channel j -> byte j // 8, bit j % 8 (value 1 << (j % 8))
    m = torch.zeros(2, 11, dtype=torch.bool)
    m[0, [0, 3, 8]] = True   # 1 + 8, then byte 1 bit 0
    m[1, [7, 10]] = True     # 128, then byte 1 bit 2
    assert pack_bits(m).tolist() == [[9, 1], [128, 4]]
    assert unpack_bits(torch.tensor([[9, 1], [128, 4]], dtype=torch.uint8), 11).equal(m)


@pytest.mark.parametrize("channels", [1, 7, 8, 9, 15168, 1003])
def test_pack_round_trip_matches_numpy(channels):
    m = torch.rand(6, channels, generator=torch.Generator().manual_seed(channels)) > 0.5
    packed = pack_bits(m)
    assert packed.shape == (6, (channels + 7) // 8) and packed.dtype == torch.uint8
    assert np.array_equal(packed.numpy(), np.packbits(m.numpy(), axis=1, bitorder="little"))
    assert unpack_bits(packed, channels).equal(m)


def test_unpack_slices_of_many_gate_points():
    sizes = [3, 1, 9, 17, 5, 8, 2, 30]  # offsets not on byte boundaries
    parts = [torch.rand(4, c, generator=torch.Generator().manual_seed(c)) > 0.5 for c in sizes]
    packed = pack_bits(torch.cat(parts, dim=1))
    start = 0
    for part in parts:
        assert unpack_bits(packed, part.shape[1], start).equal(part)
        start += part.shape[1]
    with pytest.raises(ValueError, match="exceed"):
        unpack_bits(packed, 2, 8 * packed.shape[1] - 1)


# --- round trip and shards ----------------------------------------------------------------------

@pytest.mark.parametrize("logits", [False, True])
def test_round_trip_across_shard_boundaries(tmp_path, logits):
    store = PathStore.create(tmp_path / "paths", POINTS, "zoo_plain", META, logits=logits, shard_size=5)
    sizes = [3, 4, 1, 7, 2]  # 17 images: straddles the shard size several times
    chunks, start = [], 100
    for n in sizes:
        chunks.append(chunk(list(range(start, start + n))))
        store.append(chunks[-1])
        start += n
    assert store.shard_images == [5, 5, 5] and store.num_images == 15
    store.close()
    assert store.shard_images == [5, 5, 5, 2]
    files = sorted(p.name for p in (tmp_path / "paths").iterdir())
    assert files == [".nad.lock", MANIFEST] + [shard_name(i) for i in range(4)]

    everything = cat(chunks)
    got = PathStore.open(tmp_path / "paths").read()
    assert len(got) == 17
    for f in ("image_index", "label", "target", "prediction", "status"):
        assert getattr(got, f).equal(getattr(everything, f)), f
    assert got.status.dtype == torch.int8 and got.label.dtype == torch.int64
    assert list(got.masks) == [p.name for p in POINTS]
    for p, m in zip(POINTS, everything.logits):
        assert got.masks[p.name].equal(m > 0)
        if logits:
            assert got.logits[p.name].dtype == torch.float16
            assert got.logits[p.name].equal(m.half())
    assert (got.logits is None) == (not logits)

    reopened = PathStore.open(tmp_path / "paths")
    assert reopened.meta == META and reopened.gate_points == POINTS and reopened.model_id == "zoo_plain"
    assert reopened.done_indices() == set(range(100, 117))
    packed = reopened.packed()
    assert packed.shape == (17, (45 + 7) // 8)
    assert packed.equal(pack_bits(torch.cat(everything.masks(), dim=1)))
    assert [len(s["masks"]) for s in reopened.iter_shards(["masks"])] == [5, 5, 5, 2]
    # a subset of gate points and images, in store order
    part = reopened.read(["fc", "attn"], images=[115, 101], logits=False)
    assert part.image_index.tolist() == [101, 115] and list(part.masks) == ["fc", "attn"]
    assert part.masks["fc"].equal(everything.logits[3][[1, 15]] > 0) and part.logits is None
    with pytest.raises(KeyError, match="999"):
        reopened.read(images=[101, 999])
    with pytest.raises(KeyError, match="nope"):
        reopened.read(["nope"])


def test_manifest_says_the_format(tmp_path):
    store = PathStore.create(tmp_path, POINTS, "m", META, shard_size=4)
    store.append(chunk([1, 2, 3, 4, 5]))
    m = json.loads((tmp_path / MANIFEST).read_text())
    assert m["format"] == FORMAT and m["bit_order"] == "little" and m["channels_total"] == 45
    assert m["mask_bytes"] == 6 and m["channels"] == [13, 8, 3, 21] and m["channel_axes"] == [1, 2, 2, 1]
    assert m["units"] == ["channels", "channels", "heads", "channels"] and m["records"][3] == "relu"
    assert m["shards"] == [{"file": "shard-00000.safetensors", "images": 4}] and m["images"] == 4


def test_chunks_are_checked(tmp_path):
    store = PathStore.create(tmp_path, POINTS, "m", shard_size=4)
    store.append(chunk([1, 2]))
    with pytest.raises(ValueError, match="already in path store"):
        store.append(chunk([2, 3]))
    with pytest.raises(ValueError, match="twice"):
        store.append(chunk([5, 5]))
    bad = chunk([7])
    bad.logits[1] = torch.zeros(1, 9)
    with pytest.raises(ValueError, match="'blocks.0'.*expected \\(1, 8\\)"):
        store.append(bad)
    bad = chunk([7])
    bad.status[0] = 9
    with pytest.raises(ValueError, match="unknown codes \\[9\\]"):
        store.append(bad)


# --- resume and crashes ---------------------------------------------------------------------------

def test_resume_skips_committed_images(tmp_path):
    store = PathStore.open_or_create(tmp_path, POINTS, "m", META, shard_size=4)
    store.append(chunk(list(range(10))))  # two shards committed, two images buffered: lost in a crash
    del store
    store = PathStore.open_or_create(tmp_path, POINTS, "m", META, shard_size=4)
    assert store.done_indices() == set(range(8))
    store.append(chunk([8, 9]))
    store.close()
    assert PathStore.open(tmp_path).read().image_index.tolist() == list(range(10))


def test_one_writer_at_a_time(tmp_path):
    import os

    from nad_ext.gates.pathstore import FolderLockedError

    store = PathStore.create(tmp_path / "s", POINTS, "m", META, shard_size=4)
    store.append(chunk([0, 1, 2, 3, 4]))
    for again in (dict(resume=True), dict(overwrite=True)):
        with pytest.raises(FolderLockedError, match=f"path store .* is in use by process {os.getpid()} on "):
            PathStore.create(tmp_path / "s", POINTS, "m", META, **again)
    assert PathStore.open(tmp_path / "s").num_images == 4  # readers take no lock
    store.close()  # the last image committed, the lock released
    with PathStore.open_or_create(tmp_path / "s", POINTS, "m", META) as resumed:
        assert resumed.done_indices() == set(range(5))
    with pytest.raises(ValueError, match="already in path store"):
        with PathStore.open_or_create(tmp_path / "s", POINTS, "m", META) as failing:
            failing.append(chunk([4]))
    PathStore.open_or_create(tmp_path / "s", POINTS, "m", META).close()  # released on the exception too
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [".nad.lock", MANIFEST, shard_name(0), shard_name(1)]


def test_orphan_shard_after_a_crash_is_ignored_and_overwritten(tmp_path):
    store = PathStore.create(tmp_path, POINTS, "m", META, shard_size=3)
    store.append(chunk([0, 1, 2]))
    # the next commit: write events shard open (1), written (2), renamed (3), manifest open (4):
    # the disk fills as the manifest is written, after the shard file is in place
    with pytest.raises(WriteError, match=MANIFEST):
        faults.run_with("at=write:4,action=enospc", store.append, chunk([3, 4, 5]))
    assert (tmp_path / shard_name(1)).is_file()
    reopened = PathStore.open(tmp_path)
    assert reopened.shard_images == [3] and reopened.done_indices() == {0, 1, 2}
    assert reopened.read().image_index.tolist() == [0, 1, 2]
    reopened.append(chunk([10, 11]))
    reopened.close()
    final = PathStore.open(tmp_path).read()
    assert final.image_index.tolist() == [0, 1, 2, 10, 11]
    assert final.masks["fc"].equal(torch.cat([chunk([0, 1, 2]).logits[3], chunk([10, 11]).logits[3]]) > 0)


def test_a_failed_commit_keeps_the_rows_buffered(tmp_path):
    store = PathStore.create(tmp_path, POINTS, "m", shard_size=3)
    store.append(chunk([0]))
    with pytest.raises(WriteError):
        faults.run_with("at=write:1,action=enospc", store.append, chunk([1, 2]))
    store.close()  # the retry writes them
    assert PathStore.open(tmp_path).done_indices() == {0, 1, 2}


# --- errors ---------------------------------------------------------------------------------------

@pytest.fixture
def written(tmp_path):
    store = PathStore.create(tmp_path / "s", POINTS, "m", META, logits=True, shard_size=4)
    store.append(chunk(list(range(6))))
    store.close()
    return tmp_path / "s"


def test_corrupted_shard_names_file_and_tensor(written):
    path = written / shard_name(1)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    store = PathStore.open(written)
    with pytest.raises(CorruptFileError, match=r"shard-00001\.safetensors.*tensor '(\w+)' fails its CRC-32") as err:
        store.read()
    damaged = err.value.args[0].split("tensor '")[1].split("'")[0]
    # the partial reads verify what they read, and do not read the rest
    with pytest.raises(CorruptFileError, match=f"shard-00001.safetensors is corrupted: tensor '{damaged}' fails"):
        list(store.iter_shards([damaged]))
    other = "status" if damaged != "status" else "label"
    assert [len(s[other]) for s in store.iter_shards([other])] == [4, 2]


def test_missing_and_swapped_shards(written):
    (written / shard_name(1)).unlink()
    with pytest.raises(FileNotFoundError, match="shard-00001.safetensors is missing"):
        PathStore.open(written).read()
    shutil.copy(written / shard_name(0), written / shard_name(1))  # shard 0 in shard 1's place
    with pytest.raises(CorruptFileError, match="not shard 1"):
        PathStore.open(written).read()


def test_row_count_and_width_disagreeing_with_the_manifest(written):
    m = json.loads((written / MANIFEST).read_text())
    m["shards"][1]["images"], m["images"] = 3, 7
    (written / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CorruptFileError, match=r"shard-00001.*'image_index' is int64 \(2,\).*\(3,\)"):
        PathStore.open(written).read()
    m["shards"][1]["images"], m["images"] = 2, 6
    m["channels"][0], m["channels_total"], m["mask_bytes"] = 21, 53, 7  # 8 more channels
    (written / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CorruptFileError, match=r"'masks' is uint8 \(4, 6\).*\(4, 7\)"):
        PathStore.open(written).packed()


def test_bad_folders_and_manifests(tmp_path, written):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PathStore.open(tmp_path / "nowhere")
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="not a path store"):
        PathStore.open(tmp_path / "plain")
    m = json.loads((written / MANIFEST).read_text())
    (written / MANIFEST).write_text(json.dumps({**m, "format": "nad-ext.pathstore/2"}))
    with pytest.raises(ValueError, match="unknown path store format 'nad-ext.pathstore/2'"):
        PathStore.open(written)
    (written / MANIFEST).write_text(json.dumps({**m, "mask_bytes": 5}))
    with pytest.raises(CorruptFileError, match="mask_bytes"):
        PathStore.open(written)
    (written / MANIFEST).write_text("{not json")
    with pytest.raises(CorruptFileError, match="manifest"):
        PathStore.open(written)


def test_refusals(tmp_path, written):
    with pytest.raises(FileExistsError, match="overwrite=True"):
        PathStore.create(written, POINTS, "m", META)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty folder nor a path store"):
        PathStore.create(tmp_path / "other", POINTS, "m", META)
    with pytest.raises(ValueError, match="gate point 'conv1' has channels 13 in the store but 14 now"):
        PathStore.open_or_create(written, [GatePoint("conv1", 14)] + POINTS[1:], "m", META, logits=True)
    with pytest.raises(ValueError, match="gate points are"):
        PathStore.open_or_create(written, POINTS[:2], "m", META, logits=True)
    with pytest.raises(ValueError, match="model 'm', not 'n'.*meta 'beta' is 0.5 in the store but 1.0 now"):
        PathStore.open_or_create(written, POINTS, "n", {**META, "beta": 1.0}, logits=True)
    with pytest.raises(ValueError, match="keeps logits"):
        PathStore.open_or_create(written, POINTS, "m", META, logits=False)
    assert PathStore.open_or_create(written, POINTS, "m", META, logits=True).num_images == 6
    with pytest.raises(TypeError, match="meta must be JSON: Out of range float"):
        PathStore.create(tmp_path / "new", POINTS, "m", {"beta": float("nan")})
    fresh = PathStore.create(written, POINTS[:1], "m2", {}, overwrite=True)
    assert fresh.num_images == 0 and sorted(p.name for p in written.iterdir()) == [".nad.lock", MANIFEST]


# --- size -----------------------------------------------------------------------------------------

def test_resnet50_sized_estimate():
    n, c = 10**5, 15168
    masks = estimate_bytes(n, c, logits=False)
    assert 1.89e3 < masks / n < 1.95e3  # about 1.9 KB per image: 1896 mask bytes + 33 of fields
    with_logits = estimate_bytes(n, c, logits=True)
    assert with_logits - masks == n * 2 * c


def test_disk_space_check(tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**12, 0, 10**8))
    need = estimate_bytes(10**5, 15168, True)
    with pytest.raises(InsufficientSpaceError, match=r"need about \d+ bytes.*only 100000000 bytes"):
        check_disk_space(tmp_path / "not" / "yet", 10**5, 15168, logits=True)
    with pytest.raises(OSError, match="100000 images x 15168 channels"):
        PathStore.create(tmp_path / "s", [GatePoint("x", 15168)], "m", logits=True, num_images=10**5)
    assert not (tmp_path / "s").exists()
    assert check_disk_space(tmp_path, 10**4, 15168) < 10**8 < need


def test_killed_between_shard_and_manifest(tmp_path):
    # a real crash (SIGKILL) in a child process, at the manifest's write after the second shard
    import os
    import subprocess
    import sys
    script = ("import sys; sys.path.insert(0, sys.argv[2]); import torch\n"
              "from python_tests.test_pathstore import POINTS, META, chunk\n"
              "from nad_ext.gates.pathstore import PathStore\n"
              "s = PathStore.create(sys.argv[1], POINTS, 'm', META, shard_size=2)\n"
              "s.append(chunk([0, 1])); s.append(chunk([2, 3]))\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # write events: manifest 1-3, shard 0 4-6, manifest 7-9, shard 1 10-12, manifest open 13
    env = {**os.environ, "NAD_FAULT": "at=write:13"}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "s"), root], env=env, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert names[0].startswith(f".{MANIFEST}.") and names[1:] == [".nad.lock", MANIFEST, shard_name(0), shard_name(1)]
    store = PathStore.open_or_create(tmp_path / "s", POINTS, "m", META)  # clears the orphan and the temporary
    assert store.done_indices() == {0, 1}
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [".nad.lock", MANIFEST, shard_name(0)]
    store.append(chunk([2, 3]))
    assert PathStore.open(tmp_path / "s").read().image_index.tolist() == [0, 1, 2, 3]


def test_resnet50_sized_rows_on_disk(tmp_path):
    # ResNet50 gated at the stem and the 16 bottleneck outputs: 15,168 channels
    sizes = [64] + [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3
    points = [GatePoint(f"p{i}", c) for i, c in enumerate(sizes)]
    assert sum(sizes) == 15168
    store = PathStore.create(tmp_path, points, "resnet50", META, shard_size=256)
    c = chunk(list(range(300)), points)
    store.append(c)
    store.close()
    on_disk = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert on_disk <= estimate_bytes(300, 15168, shard_size=256)
    assert 1.9e3 < on_disk / 300 < 2.0e3
    got = PathStore.open(tmp_path).read(images=range(250, 300))
    assert all(got.masks[p.name].equal(m[250:] > 0) for p, m in zip(points, c.logits))
