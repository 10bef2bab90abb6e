"""Writes the seed corpus of the fuzz targets (cpp_tests/fuzz/README.md) from real banks:

- corpus/maskbank/: mask banks written by nad_ext's MaskBank (paper and selective objectives,
  gated per attention head, on tokens, calibrated, non-ASCII names, no tasks, no gate points,
  an empty gate point), an old bank without checksums, plain safetensors files of every dtype
  the reader knows, and damaged copies of a bank (each refused for its own reason);
- corpus/json/: the JSON of those files' headers and metadata strings, plus hand-written cases
  (escapes, surrogate pairs, numbers, nesting).

Deterministic (fixed seeds, metadata in sorted order): rerunning it rewrites the same bytes. Run from the repository root
with the Python environment: .venv/bin/python cpp_tests/fuzz/make_corpus.py
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import zlib

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # this checkout's nad_ext

from nad_ext.gates.maskbank import MaskBank, Task  # noqa: E402
from nad_ext.gates.points import GatePoint  # noqa: E402


def banks(gen) -> dict[str, MaskBank]:
    def logits(tasks, *channels):
        return [torch.randn(tasks, c, generator=gen) for c in channels]

    paper = {"beta": 0.5, "epochs": 7, "lr": 0.1}
    return {
        "paper": MaskBank("paper_net", [GatePoint("features.0", 4), GatePoint("features.3", 6, record="relu")],
                          [Task("cat", (0,)), Task("dog", (1,)), Task("car, red", (2, 3))],
                          logits(3, 4, 6), config=paper, epoch=7),
        "selective": MaskBank("selective_net", [GatePoint("layer1.0", 5), GatePoint("fc", 3)],
                              [Task("a", (0,)), Task("b", (1, 2))], logits(2, 5, 3),
                              config={**paper, "negatives": 0.5, "negative_weight": 0.1}, epoch=2),
        "head_gated": MaskBank("vit_heads", [GatePoint("encoder.layers.encoder_layer_0.self_attention", 4, 2, "heads"),
                                             GatePoint("encoder.layers.encoder_layer_1.self_attention", 4, 2, "heads")],
                               [Task("t0", (0,)), Task("t1", (1,))], logits(2, 4, 4), config={"beta": 5.0}, epoch=1),
        "token_layout": MaskBank("vit_tokens", [GatePoint("conv_proj", 6, 1), GatePoint("encoder.layers.encoder_layer_0", 8, 2),
                                                GatePoint("nhwc", 3, 3)],
                                 [Task("x", (0, 1))], logits(1, 6, 8, 3), config={"beta": 1.0}, epoch=0),
        "calibrated": MaskBank("cpp_test_vit", [GatePoint("conv_proj", 6, 1),
                                                GatePoint("encoder.layers.encoder_layer_1.self_attention", 2, 2, "heads", "relu")],
                               [Task("caf\u00e9", (0,)), Task("na\u00efve \u4e8c \U0001F600", (1, 2)), Task('say "hi"\\', (3,))],
                               logits(3, 6, 2), config={"beta": 5.0, "note": "caf\u00e9", "negatives": 0.0}, epoch=3,
                               calibration={"beta": 5.0, "open_ratio": 0.31, "target_open_ratio": 0.3, "method": "bisection",
                                            "curve": [[0.02, 0.9], [5.0, 0.31]], "runs": 2, "converged": True}),
        "no_tasks": MaskBank("empty_tasks", [GatePoint("a", 2)], [], [torch.zeros(0, 2)], config={}, epoch=0),
        "no_gate_points": MaskBank("empty_points", [], [Task("t", (0,))], [], config={}, epoch=0),
        "zero_channels": MaskBank("zero_channels", [GatePoint("a", 0), GatePoint("b", 2)], [Task("t", (0,))],
                                  [torch.zeros(1, 0), torch.ones(1, 2)], config={"beta": 0.5}, epoch=1),
    }


def split(data: bytes):
    n = int.from_bytes(data[:8], "little")
    return n, json.loads(data[8:8 + n]), data[8 + n:]


def canonical(data: bytes) -> bytes:
    """The file with its header's metadata in sorted key order (the safetensors writer emits them
    in hash-map order, which changes from run to run), padded to 8 bytes as safetensors pads it:
    the same bytes on every run."""
    n, header, rest = split(data)
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + rest


def with_header(header: dict, rest: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + rest


def damaged(data: bytes) -> dict[str, bytes]:
    """Copies of a bank, each refused for its own reason (as make_fixtures.py's corrupt_banks)."""
    n, header, rest = split(data)

    def edit(change):
        h = json.loads(json.dumps(header))
        change(h)
        return with_header(h, rest)

    def drop_checksum(h):
        sums = json.loads(h["__metadata__"]["crc32"])
        sums.pop("logits.001")
        h["__metadata__"]["crc32"] = json.dumps(sums)

    begin = 8 + n + header["logits.001"]["data_offsets"][0]
    flipped = bytearray(data)
    flipped[begin + 3:begin + 8] = bytes(b ^ 0x5A for b in flipped[begin + 3:begin + 8])
    return {
        "truncated": data[:-10],
        "bad_header_length": (1 << 40).to_bytes(8, "little") + data[8:],
        "bad_json": data[:8] + data[8:8 + n].replace(b":", b";", 1) + rest,
        "unknown_dtype": edit(lambda h: h["logits.001"].update(dtype="F7")),
        "offsets_out_of_range": edit(lambda h: h["logits.000"]["data_offsets"].__setitem__(1, 4096)),
        "wrong_format": edit(lambda h: h["__metadata__"].update(format="nad-ext.maskbank/99")),
        "channels_mismatch": edit(lambda h: h["__metadata__"].update(channels="[4, 7]")),
        "checksum_missing": edit(drop_checksum),
        "flipped_bytes": bytes(flipped),
    }


def dtype_files(gen) -> dict[str, bytes]:
    """Plain safetensors files (not banks) with every dtype the reader knows, odd shapes too."""
    tensors = {
        "bool": torch.rand(2, 3, generator=gen) > 0.5, "u8": torch.arange(5, dtype=torch.uint8),
        "i8": torch.arange(-2, 2, dtype=torch.int8), "i16": torch.arange(3, dtype=torch.int16).reshape(1, 3),
        "i32": torch.arange(4, dtype=torch.int32).reshape(2, 2, 1), "i64": torch.tensor(7, dtype=torch.int64),
        "f16": torch.randn(3, generator=gen).half(), "bf16": torch.randn(2, generator=gen).bfloat16(),
        "f32_empty": torch.zeros(0, 4), "f64": torch.randn(2, 2, generator=gen, dtype=torch.float64),
    }
    out = {}
    for path in ("all_dtypes",):
        tmp = os.path.join(HERE, f".{path}.tmp")
        save_file(tensors, tmp, metadata={"note": "not a bank", "crc32": json.dumps(
            {k: f"{zlib.crc32(v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()):08x}" for k, v in tensors.items()})})
        out[path] = canonical(open(tmp, "rb").read())
        os.remove(tmp)
    out["empty_header"] = (2).to_bytes(8, "little") + b"{}"
    return out


JSON_CASES = {
    "escapes": r'["\"\\\/\b\f\n\r\t", "\u00e9\u4e8c", "\ud83d\ude00", "\u0000"]',
    "numbers": "[0, -0, 1.5, -2e10, 3E+2, 4.0e-3, 9223372036854775807, -9223372036854775808, 1e400]",
    "nested": '{"a": [1, {"b": [true, false, null]}, []], "c": {}, "d": ""}',
    "deep": "[" * 60 + "1" + "]" * 60,
    "whitespace": ' \t\r\n{ "k" : [ 1 , 2 ] } \n',
    "utf8_raw": '["caf\u00e9", "na\u00efve \u4e8c \U0001F600"]',
    "crc32": '{"logits.000": "0123abcd", "logits.001": "ffffffff"}',
    "task_classes": "[[0], [1, 2], [], [3]]",
}


def write(folder: str, files: dict[str, bytes]) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    for name, data in files.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)


def main() -> None:
    gen = torch.Generator().manual_seed(29)
    bank_files, json_files = {}, {}
    tmp = os.path.join(HERE, ".bank.tmp.safetensors")
    for name, bank in banks(gen).items():
        bank.save(tmp)
        bank_files[f"{name}.safetensors"] = canonical(open(tmp, "rb").read())
    os.remove(tmp)
    # A bank as written before checksums existed (loads unverified).
    n, header, rest = split(bank_files["paper.safetensors"])
    del header["__metadata__"]["crc32"]
    bank_files["old_no_checksums.safetensors"] = with_header(header, rest)
    for name, data in damaged(bank_files["selective.safetensors"]).items():
        bank_files[f"bad_{name}.safetensors"] = data
    for name, data in dtype_files(gen).items():
        bank_files[f"{name}.safetensors"] = data

    # JSON: the headers (of the damaged copies, only the one with bad JSON) and the metadata
    # strings of the calibrated bank (the one with every key).
    for name, data in sorted(bank_files.items()):
        stem = name.split(".")[0]
        n = int.from_bytes(data[:8], "little")
        if n > len(data) - 8 or (stem.startswith("bad_") and stem != "bad_bad_json"):
            continue
        json_files[f"header_{stem}.json"] = data[8:8 + n]
        if stem == "calibrated":
            for key, value in json.loads(data[8:8 + n])["__metadata__"].items():
                if len(value) > 2:
                    json_files[f"metadata_{key}.json"] = value.encode()
    for name, text in JSON_CASES.items():
        json_files[f"case_{name}.json"] = text.encode()

    write(os.path.join(HERE, "corpus", "maskbank"), bank_files)
    write(os.path.join(HERE, "corpus", "json"), json_files)
    sizes = [len(d) for d in (*bank_files.values(), *json_files.values())]
    print(f"{len(bank_files)} mask bank seeds, {len(json_files)} JSON seeds, "
          f"{sum(sizes)} bytes in all, largest {max(sizes)}")


if __name__ == "__main__":
    main()
