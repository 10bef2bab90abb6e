"""Writes the inputs and expected outputs of the C++ tests (cpp_tests/) as safetensors files.

    python cpp_tests/make_fixtures.py <folder> [--library build-cpp/libnad.so]

Expected values come from pure-PyTorch / NumPy references, so the C++ library is checked
against the Python side's definitions of the operators. The mask bank follows docs/DESIGN.md.
With --library, nad_ext (this checkout) runs on that LibTorch build of the operators and a small
gated model is exported to TorchScript (nad_ext.export) with its expected outputs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import zlib

import numpy as np
import torch
from safetensors.torch import save_file

FORMAT = "nad-ext.maskbank/1"


def task_gate_reference(x, logits, task_ids):
    gate = torch.sigmoid(logits)[task_ids]
    return x * gate.reshape(*gate.shape, *([1] * (x.dim() - 2)))


def task_gate_case(gen, prefix, x_shape, num_tasks):
    x = torch.randn(*x_shape, generator=gen)
    logits = torch.randn(num_tasks, x_shape[1], generator=gen)
    task_ids = torch.randint(0, num_tasks, (x_shape[0],), generator=gen)
    grad_y = torch.randn(*x_shape, generator=gen)
    xr, lr = x.clone().requires_grad_(), logits.clone().requires_grad_()
    y = task_gate_reference(xr, lr, task_ids)
    grad_x, grad_logits = torch.autograd.grad(y, (xr, lr), grad_y)
    return {
        f"{prefix}.x": x, f"{prefix}.logits": logits, f"{prefix}.task_ids": task_ids,
        f"{prefix}.grad_y": grad_y, f"{prefix}.y": y.detach(),
        f"{prefix}.grad_x": grad_x, f"{prefix}.grad_logits": grad_logits,
    }


def overlap_reference(a: np.ndarray, b: np.ndarray, layer_sizes, metric: str, per_layer: bool):
    """nad::mask_overlap in NumPy: all-pairs overlap of boolean masks a (Ta, K) and b (Tb, K)
    per layer (iou, iomin with 0/0 = 1, or intersection); the mean over layers unless
    per_layer."""
    def one(a, b):
        a, b = a.astype(np.int64), b.astype(np.int64)
        inter = a @ b.T
        if metric == "intersection":
            return inter.astype(np.float64)
        na, nb = a.sum(1)[:, None], b.sum(1)[None, :]
        den = na + nb - inter if metric == "iou" else np.minimum(na, nb)
        return np.where(den == 0, 1.0, inter / np.maximum(den, 1))
    bounds = np.cumsum([0, *layer_sizes])
    layers = np.stack([one(a[:, lo:hi], b[:, lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])])
    return layers if per_layer else layers.mean(0)


def crc32_metadata(tensors):
    """The "crc32" metadata of docs/DESIGN.md: zlib's CRC-32 of each tensor's bytes."""
    return json.dumps({k: f"{zlib.crc32(v.contiguous().view(torch.uint8).numpy()):08x}" for k, v in tensors.items()})


def write_bank(path, gen):
    gate_points = ["features.0", "features.3", "classifier.1"]
    channels = [4, 6, 3]
    tasks = ["cat", "dog", "car, red", "ship"]  # a comma: CSV quoting is exercised too
    logits = {}
    for i, c in enumerate(channels):
        m = torch.randn(len(tasks), c, generator=gen)
        m[:, 0] = m[:, 0].abs() + 0.1  # every task keeps a channel open at every gate point
        logits[f"logits.{i:03d}"] = m
    metadata = {
        "format": FORMAT,
        "model_id": "cpp_test_net",
        "gate_points": json.dumps(gate_points),
        "channels": json.dumps(channels),
        "tasks": json.dumps(tasks),
        "task_classes": json.dumps([[0], [1], [2, 3], [4]]),
        "config": json.dumps({"beta": 0.5, "epochs": 7, "note": "caf\u00e9"}),
        "epoch": "7",
    }
    # The same bank as written before checksums existed: it loads, unverified.
    save_file(logits, os.path.join(os.path.dirname(path), "old_bank.safetensors"), metadata=metadata)
    save_file(logits, path, metadata={**metadata, "crc32": crc32_metadata(logits)})
    binary = torch.cat([logits[f"logits.{i:03d}"] for i in range(len(channels))], 1) > 0
    return binary, channels, logits


def corrupt_banks(folder, bank_path):
    """Damaged copies of the bank, each refused for its own reason."""
    data = open(bank_path, "rb").read()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])

    def with_header(h):
        text = json.dumps(h).encode()
        return len(text).to_bytes(8, "little") + text + data[8 + n:]

    bad_dtype = json.loads(json.dumps(header))
    bad_dtype["logits.001"]["dtype"] = "F7"
    bad_offsets = json.loads(json.dumps(header))
    bad_offsets["logits.002"]["data_offsets"][1] += 4096
    bad_format = json.loads(json.dumps(header))
    bad_format["__metadata__"]["format"] = "nad-ext.maskbank/99"
    bad_shape = json.loads(json.dumps(header))
    bad_shape["__metadata__"]["channels"] = "[4, 6, 5]"
    no_checksum = json.loads(json.dumps(header))
    sums = json.loads(no_checksum["__metadata__"]["crc32"])
    del sums["logits.002"]
    no_checksum["__metadata__"]["crc32"] = json.dumps(sums)
    # Five bytes flipped in the data of logits.001 (the corruption a checksum exists for).
    begin = 8 + n + header["logits.001"]["data_offsets"][0]
    flipped = bytearray(data)
    flipped[begin + 3: begin + 8] = bytes(b ^ 0x5A for b in flipped[begin + 3: begin + 8])
    cases = {
        "truncated": data[: len(data) - 10],
        "tiny": data[:5],
        "bad_header_length": (1 << 40).to_bytes(8, "little") + data[8:],
        "bad_json": data[:8] + data[8:8 + n].replace(b":", b";", 1) + data[8 + n:],
        "unknown_dtype": with_header(bad_dtype),
        "offsets_out_of_range": with_header(bad_offsets),
        "wrong_format": with_header(bad_format),
        "channels_mismatch": with_header(bad_shape),
        "flipped_bytes": bytes(flipped),
        "checksum_missing": with_header(no_checksum),
    }
    for name, blob in cases.items():
        with open(os.path.join(folder, f"bad_{name}.safetensors"), "wb") as f:
            f.write(blob)


def export_gated_model(folder: str, library: str) -> None:
    os.environ["NAD_EXT_LIBRARY"] = os.path.abspath(library)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from torch import nn

    from nad_ext.gates.export import export_gated, export_task
    from nad_ext.gates import GatedModel

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5),
    )
    gated = GatedModel(net, ["1", "3"], num_tasks=3, example_input=torch.randn(2, 3, 8, 8),
                       model_id="cpp_test_convnet")
    export_gated(gated, torch.randn(2, 3, 8, 8), os.path.join(folder, "gated_all.pt"))
    export_task(gated, 1, torch.randn(2, 3, 8, 8), os.path.join(folder, "gated_task1.pt"))
    # Another batch size than at tracing: the exports must not have frozen it.
    x = torch.randn(5, 3, 8, 8)
    task_ids = torch.tensor([0, 2, 1, 1, 0])
    with torch.no_grad():
        expected = {
            "x": x, "task_ids": task_ids,
            "y_all": gated(x, task_ids)[0],
            "y_task1": gated(x, torch.ones(5, dtype=torch.int64), binary=True)[0],
        }
    save_file(expected, os.path.join(folder, "gated_expected.safetensors"))


def main(folder: str, library: str | None) -> None:
    os.makedirs(folder, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    tensors.update(task_gate_case(gen, "conv", (6, 3, 4, 5), num_tasks=3))
    tensors.update(task_gate_case(gen, "flat", (5, 7), num_tasks=2))
    save_file(tensors, os.path.join(folder, "task_gate.safetensors"))

    bank_path = os.path.join(folder, "bank.safetensors")
    binary, channels, _ = write_bank(bank_path, gen)
    corrupt_banks(folder, bank_path)
    masks = binary.numpy()
    expected = {
        "binary": binary,
        "layer_sizes": torch.tensor(channels, dtype=torch.int64),
        "similarity_iou": torch.from_numpy(overlap_reference(masks, masks, channels, "iou", False)),
        "similarity_iomin": torch.from_numpy(overlap_reference(masks, masks, channels, "iomin", False)),
    }
    # mask_overlap on masks of different task counts, with empty layers (0/0 = 1).
    sizes = [5, 3, 8]
    rng = np.random.default_rng(1)
    a, b = rng.random((3, sum(sizes))) > 0.5, rng.random((5, sum(sizes))) > 0.4
    a[0, 5:8] = False
    b[1, 5:8] = False
    b[2, :5] = False
    expected.update({"overlap.a": torch.from_numpy(a), "overlap.b": torch.from_numpy(b),
                     "overlap.layer_sizes": torch.tensor(sizes, dtype=torch.int64)})
    for metric in ("iou", "iomin", "intersection"):
        for per_layer in (False, True):
            key = f"overlap.{metric}.{'per_layer' if per_layer else 'all'}"
            expected[key] = torch.from_numpy(overlap_reference(a, b, sizes, metric, per_layer))
    save_file(expected, os.path.join(folder, "bank_expected.safetensors"))
    if library:
        export_gated_model(folder, library)
    print(f"fixtures written to {folder}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--library", help="libnad.so: also export a gated model (TorchScript)")
    args = parser.parse_args()
    main(args.folder, args.library)
