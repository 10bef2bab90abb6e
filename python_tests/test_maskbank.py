import errno
import json
import struct
import zlib

import pytest
import torch

from nad_ext.gates import GatePoint
from nad_ext.gates import MaskBank, Task
from nad_ext._utils.storage import WriteError


def make_bank(tasks=3, epoch=4):
    torch.manual_seed(0)
    points = [GatePoint("features.1", 4), GatePoint("features.4", 1), GatePoint("avgpool", 7)]
    return MaskBank(
        model_id="zoo_plain",
        gate_points=points,
        tasks=[Task(f"class{t}", (t,)) for t in range(tasks - 1)] + [Task("pair", (0, 1))],
        logits=[torch.randn(tasks, p.channels) for p in points],
        config={"beta": 4.5, "lr": 0.1},
        epoch=epoch,
    )


def test_round_trip(tmp_path):
    bank = make_bank()
    bank.save(tmp_path / "b.safetensors")
    loaded = MaskBank.load(tmp_path / "b.safetensors")
    assert loaded.model_id == "zoo_plain" and loaded.epoch == 4
    assert loaded.gate_points == bank.gate_points and loaded.tasks == bank.tasks
    assert loaded.config == bank.config
    for a, b in zip(loaded.logits, bank.logits):
        torch.testing.assert_close(a, b)
    assert loaded.layer_sizes == [4, 1, 7]
    binary = loaded.binary()
    assert binary.shape == (3, 12) and binary.dtype == torch.bool
    assert torch.equal(binary[:, 4], bank.logits[1][:, 0] > 0)
    torch.testing.assert_close(loaded.open_ratio()[:, 2], (bank.logits[2] > 0).float().mean(1))


def test_file_follows_the_documented_format(tmp_path):
    make_bank().save(tmp_path / "b.safetensors")
    raw = (tmp_path / "b.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert sorted(k for k in header if k != "__metadata__") == ["logits.000", "logits.001", "logits.002"]
    assert header["logits.002"]["dtype"] == "F32" and header["logits.002"]["shape"] == [3, 7]
    meta = header["__metadata__"]
    assert meta["format"] == "nad-ext.maskbank/1"
    assert json.loads(meta["gate_points"]) == ["features.1", "features.4", "avgpool"]
    assert json.loads(meta["channels"]) == [4, 1, 7]
    assert json.loads(meta["task_classes"]) == [[0], [1], [0, 1]]


def test_mismatch_says_what_differs():
    bank = make_bank()
    other = [GatePoint("features.1", 4), GatePoint("features.4", 2), GatePoint("classifier", 7)]
    problems = bank.mismatch(other, model_id="vgg16")
    text = "; ".join(problems)
    assert "for model 'zoo_plain', not 'vgg16'" in text
    assert "'features.4' has 1 channels in the bank but 2 in the model" in text
    assert "'avgpool' is in the bank but not in the model" in text
    assert "'classifier' is in the model but not in the bank" in text
    with pytest.raises(ValueError, match="mask bank does not match the model"):
        bank.check_matches(other)
    bank.check_matches(list(bank.gate_points), "zoo_plain")


def test_bad_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors does not exist"):
        MaskBank.load(tmp_path / "missing.safetensors")
    path = tmp_path / "b.safetensors"
    make_bank().save(path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="corrupted"):
        MaskBank.load(path)
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="corrupted or not a safetensors file"):
        MaskBank.load(path)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="is not a nad-ext mask bank"):
        MaskBank.load(path)


def test_shapes_are_checked_on_construction():
    bank = make_bank()
    with pytest.raises(ValueError, match=r"must have shape \(3, 4\)"):
        MaskBank(bank.model_id, bank.gate_points, bank.tasks, [torch.zeros(2, 4)] + bank.logits[1:])


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "b.safetensors"
    make_bank(epoch=1).save(path)

    import safetensors.torch

    def broken(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(WriteError, match=r"cannot write .*b\.safetensors: No space left on device"):
        make_bank(epoch=2).save(path)
    assert MaskBank.load(path).epoch == 1  # the earlier bank is intact
    assert [p.name for p in tmp_path.iterdir()] == ["b.safetensors"]  # no temporary left


def test_channel_axes_units_and_calibration_round_trip(tmp_path):
    bank = make_bank()
    bank.gate_points[1:] = [GatePoint("blocks.0", 1, 2), GatePoint("blocks.0.attn", 7, 3, "heads")]
    bank.calibration = {"beta": 0.4, "curve": [[0.02, 0.6], [0.4, 0.31]], "method": "bisection in log(beta)"}
    bank.save(tmp_path / "b.safetensors")
    loaded = MaskBank.load(tmp_path / "b.safetensors")
    assert loaded.gate_points == bank.gate_points and loaded.calibration == bank.calibration
    problems = "; ".join(loaded.mismatch([GatePoint("features.1", 4), GatePoint("blocks.0", 1, 1),
                                          GatePoint("blocks.0.attn", 7, 3)]))
    assert "'blocks.0' gates axis 2 in the bank but axis 1 in the model" in problems
    assert "'blocks.0.attn' gates heads in the bank but channels in the model" in problems


def test_banks_without_channel_axes_read_as_axis_one(tmp_path):
    """A bank written before channel axes existed (no channel_axes / units metadata)."""
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    make_bank().save(tmp_path / "b.safetensors")
    with safe_open(str(tmp_path / "b.safetensors"), framework="pt") as f:
        meta = dict(f.metadata())
    for key in ("channel_axes", "units"):
        meta.pop(key)
    save_file(load_file(str(tmp_path / "b.safetensors")), str(tmp_path / "old.safetensors"), metadata=meta)
    loaded = MaskBank.load(tmp_path / "old.safetensors")
    assert [(p.channel_axis, p.units) for p in loaded.gate_points] == [(1, "channels")] * 3
    assert loaded.calibration is None


def test_gate_point_records_round_trip_and_older_banks_compare_outputs(tmp_path):
    """``records`` (what each gate point hands to the objective: "output" or "relu") is saved;
    a bank written before it existed reads as "output" everywhere, as it was trained. The gates
    fit a model whose gate points record otherwise (apply_to, for the analyses); a resumed run
    compares the records (python_tests/test_trainer.py)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    bank = make_bank()
    bank.gate_points[2] = GatePoint("avgpool", 7, record="relu")
    bank.save(tmp_path / "b.safetensors")
    loaded = MaskBank.load(tmp_path / "b.safetensors")
    assert [p.record for p in loaded.gate_points] == ["output", "output", "relu"]
    assert loaded.gate_points[2].spec == "avgpool:relu"
    with safe_open(str(tmp_path / "b.safetensors"), framework="pt") as f:
        meta = dict(f.metadata())
    assert json.loads(meta["records"]) == ["output", "output", "relu"]
    del meta["records"]
    save_file(load_file(str(tmp_path / "b.safetensors")), str(tmp_path / "old.safetensors"), metadata=meta)
    old = MaskBank.load(tmp_path / "old.safetensors")
    assert [p.record for p in old.gate_points] == ["output"] * 3
    assert old.mismatch(loaded.gate_points) == []
    meta["records"] = json.dumps(["output", "output", "sqrt"])
    save_file(load_file(str(tmp_path / "b.safetensors")), str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"corrupted: .*unknown gate-point records \['sqrt'\]"):
        MaskBank.load(tmp_path / "bad.safetensors")


def _flip(path, offset_from_end, count=5):
    raw = bytearray(path.read_bytes())
    for i in range(count):
        raw[len(raw) - offset_from_end + i] ^= 0x5A
    path.write_bytes(bytes(raw))


def test_checksums_are_stored_and_verified(tmp_path):
    path = tmp_path / "b.safetensors"
    bank = make_bank()
    bank.save(path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    sums = json.loads(header["__metadata__"]["crc32"])
    assert sorted(sums) == ["logits.000", "logits.001", "logits.002"]
    for name, info in header.items():
        if name != "__metadata__":
            begin, end = info["data_offsets"]
            assert sums[name] == f"{zlib.crc32(raw[8 + n + begin: 8 + n + end]):08x}"
    # Five bytes of the last tensor (avgpool, 3 x 7 float32 at the end of the file) flipped.
    _flip(path, 12)
    with pytest.raises(ValueError, match=r"tensor 'logits.002' \(gate point 'avgpool'\) fails its CRC-32 check"):
        MaskBank.load(path)


def test_bank_without_checksums_loads_with_a_note(tmp_path):
    from safetensors.torch import save_file

    bank = make_bank()
    path = tmp_path / "old.safetensors"
    bank.save(path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    meta = json.loads(raw[8 : 8 + n])["__metadata__"]
    del meta["crc32"]
    save_file({f"logits.{i:03d}": m for i, m in enumerate(bank.logits)}, str(path), metadata=meta)  # as /1 did
    with pytest.warns(UserWarning, match="has no checksums"):
        old = MaskBank.load(path)
    for a, b in zip(old.logits, bank.logits):
        assert torch.equal(a, b)
