"""Writes the inputs and expected outputs of the C++ tests (cpp_tests/) as safetensors files.

    python cpp_tests/make_fixtures.py <folder> [--library build-cpp/libnad.so]

Expected values come from pure-PyTorch / NumPy references, so the C++ library is checked
against the Python side's definitions of the operators (one case per operator). The mask bank
follows docs/DESIGN.md. With --library, nad_ext (this checkout) runs on that LibTorch build of the
operators: it writes mask banks with its own MaskBank (head-gated, token-layout, calibrated; the
C++ side reads them, writes them back, and check_banks.py reads those) and packages a small gated
model with torch.export + AOTInductor (nad_ext.gates.export, a .pt2 that examples/cpp/run_pt2
runs) with its expected outputs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
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


def masked_conv2d_case(gen, prefix, x_shape, weight_shape, num_tasks, conv, bias, relu):
    """nad::masked_conv2d: inputs, conv arguments and the reference's y, act and gradients."""
    stride, padding, dilation, groups = conv
    x = torch.randn(*x_shape, generator=gen)
    w = torch.randn(*weight_shape, generator=gen)
    b = torch.randn(weight_shape[0], generator=gen) if bias else None
    logits = torch.randn(num_tasks, weight_shape[0], generator=gen)
    task_ids = torch.randint(0, num_tasks, (x_shape[0],), generator=gen)
    xr, lr = x.double().requires_grad_(), logits.double().requires_grad_()
    act = torch.nn.functional.conv2d(xr, w.double(), None if b is None else b.double(), stride, padding, dilation, groups)
    if relu:
        act = act.relu()
    y = act * torch.sigmoid(lr)[task_ids][:, :, None, None]
    grad_y = torch.randn(*y.shape, generator=gen)
    grad_x, grad_logits = torch.autograd.grad(y, (xr, lr), grad_y.double())
    out = {
        f"{prefix}.x": x, f"{prefix}.weight": w, f"{prefix}.logits": logits, f"{prefix}.task_ids": task_ids,
        f"{prefix}.conv": torch.tensor([*stride, *padding, *dilation, groups, int(relu)], dtype=torch.int64),
        f"{prefix}.grad_y": grad_y, f"{prefix}.y": y.detach().float(), f"{prefix}.act": act.detach().float(),
        f"{prefix}.grad_x": grad_x.float(), f"{prefix}.grad_logits": grad_logits.float(),
    }
    if b is not None:
        out[f"{prefix}.bias"] = b
    return out


def gate_mse_case(gen, prefix):
    """nad::gate_mse: per-task MSE over the counted samples (a task without any is 0)."""
    masked = torch.randn(6, 4, 3, 3, generator=gen)
    original = torch.randn(6, 4, 3, 3, generator=gen)
    counts = torch.tensor([True, False, True, True, False, False])
    task_ids = torch.tensor([0, 1, 1, 2, 2, 3])  # task 3's only sample is not counted
    num_tasks = 5  # task 4 has no sample at all
    m = masked.double().requires_grad_()
    per_sample = ((m - original.double()) ** 2).flatten(1).mean(1) * counts
    k = torch.zeros(num_tasks, dtype=torch.float64).index_add_(0, task_ids, counts.double())
    sums = torch.zeros(num_tasks, dtype=torch.float64).index_add(0, task_ids, per_sample)
    out = torch.where(k > 0, sums / k.clamp_min(1), torch.zeros_like(sums))
    grad = torch.randn(num_tasks, generator=gen)
    (grad_masked,) = torch.autograd.grad(out, (m,), grad.double())
    return {
        f"{prefix}.masked": masked, f"{prefix}.original": original, f"{prefix}.counts": counts,
        f"{prefix}.task_ids": task_ids, f"{prefix}.num_tasks": torch.tensor([num_tasks]),
        f"{prefix}.out": out.detach().float(), f"{prefix}.grad": grad, f"{prefix}.grad_masked": grad_masked.float(),
    }


def normalized_step_case(gen, prefix):
    """nad::normalized_gradient_step_: m[t] -= lr * g[t] / ||g[t]|| for the listed tasks (a task
    listed twice once; a zero gradient row unchanged; unlisted tasks unchanged)."""
    logits = [torch.randn(4, 5, generator=gen), torch.randn(4, 3, generator=gen)]
    grads = [torch.randn(4, 5, generator=gen), torch.randn(4, 3, generator=gen)]
    grads[1][2] = 0
    tasks = torch.tensor([2, 0, 2])
    lr = 0.25
    expected = [m.double().clone() for m in logits]
    for m, g in zip(expected, grads):
        for t in sorted(set(tasks.tolist())):
            norm = g[t].double().norm()
            if norm > 0:
                m[t] -= lr * g[t].double() / norm
    out = {f"{prefix}.tasks": tasks, f"{prefix}.lr": torch.tensor([lr], dtype=torch.float64)}
    for i, (m, g, e) in enumerate(zip(logits, grads, expected)):
        out.update({f"{prefix}.logits.{i}": m, f"{prefix}.grads.{i}": g, f"{prefix}.expected.{i}": e.float()})
    return out


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
    # A NaN logit with checksums that match: refused for the NaN, as Python's reader refuses it.
    from safetensors import safe_open

    with safe_open(bank_path, framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    tensors["logits.001"][1, 2] = float("nan")
    meta["crc32"] = json.dumps({k: f"{zlib.crc32(t.contiguous().numpy().tobytes()) & 0xFFFFFFFF:08x}"
                                for k, t in tensors.items()}, sort_keys=True)
    save_file(tensors, os.path.join(folder, "bad_nonfinite.safetensors"), metadata=meta)


def use_library(library: str) -> None:
    """nad_ext (this checkout) on the LibTorch build ``library`` of the operators."""
    os.environ["NAD_EXT_LIBRARY"] = os.path.abspath(library)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def python_banks(folder: str, gen) -> None:
    """Mask banks written by nad_ext's MaskBank (the C++ side reads them, compares every field
    with banks_expected.json, and writes each back as <name>.cpp.safetensors for check_banks.py):
    a ViT bank gated on tokens (channel axis 2), per attention head and on a conv map, calibrated,
    with non-ASCII task names; a conv bank without calibration."""
    import dataclasses

    from nad_ext.gates.maskbank import MaskBank, Task
    from nad_ext.gates.points import GatePoint

    relu = {"record": "relu"} if "record" in {f.name for f in dataclasses.fields(GatePoint)} else {}
    has_fidelity = "fidelity" in {f.name for f in dataclasses.fields(MaskBank)}
    banks = {
        "vit_bank": MaskBank(
            model_id="cpp_test_vit",
            gate_points=[GatePoint("conv_proj", 6, 1), GatePoint("encoder.layers.encoder_layer_0", 8, 2),
                         GatePoint("encoder.layers.encoder_layer_1.self_attention", 2, 2, "heads", **relu)],
            tasks=[Task("caf\u00e9", (0,)), Task("na\u00efve \u4e8c \U0001F600", (1, 2)), Task('say "hi"\\', (3,))],
            logits=[torch.randn(3, c, generator=gen) for c in (6, 8, 2)],
            config={"beta": 5.0, "lr": 0.1, "note": "caf\u00e9", "negatives": 0.0},
            epoch=3,
            calibration={"beta": 5.0, "open_ratio": 0.31, "target_open_ratio": 0.3, "method": "bisection",
                         "curve": [[0.02, 0.9], [5.0, 0.31]], "runs": 2, "converged": True},
            **({"fidelity": {"tasks": ["a", "b", "c"], "constant": [False, True, False], "own_class_accuracy":
                             [1.0, None, 0.5], "flagged": [["b", "constant"]]}} if has_fidelity else {}),
        ),
        "conv_bank": MaskBank(
            model_id="cpp_test_conv", gate_points=[GatePoint("features.0", 4), GatePoint("features.3", 5)],
            tasks=[Task("cat", (0,)), Task("dog", (1,))],
            logits=[torch.randn(2, c, generator=gen) for c in (4, 5)], config={"beta": 0.5}, epoch=0,
        ),
    }
    expected = {}
    for name, bank in banks.items():
        bank.save(os.path.join(folder, f"{name}.safetensors"))
        expected[name] = {
            "model_id": bank.model_id,
            "gate_points": [dataclasses.asdict(p) for p in bank.gate_points],
            "tasks": [{"name": t.name, "classes": list(t.classes)} for t in bank.tasks],
            "config": json.dumps(bank.config, sort_keys=True),
            "epoch": bank.epoch,
            "calibration": None if bank.calibration is None else json.dumps(bank.calibration, sort_keys=True),
            "fidelity": None if getattr(bank, "fidelity", None) is None else json.dumps(bank.fidelity, sort_keys=True),
        }
        save_file({f"logits.{i:03d}": m for i, m in enumerate(bank.logits)},
                  os.path.join(folder, f"{name}_logits.safetensors"))
    with open(os.path.join(folder, "banks_expected.json"), "w") as f:
        json.dump(expected, f, indent=1)


def python_path_store(folder: str, gen) -> None:
    """A path store written by nad_ext's PathStore (the C++ case pathstore_python_written reads it
    and compares it with paths_expected.safetensors): 10 images in shards of 4, 4 and 2, float16
    logits kept, odd channel counts, an orphan shard after the committed ones; and damaged copies
    (paths_bad_<what>) that the C++ reader must refuse."""
    import shutil

    from nad_ext.gates.pathstore import PathChunk, PathStore, pack_bits
    from nad_ext.gates.points import GatePoint

    points = [GatePoint("conv1", 13), GatePoint("blocks.0", 8, 2), GatePoint("attn", 3, 2, "heads"),
              GatePoint("fc", 21, record="relu")]
    meta = {"target": "label", "steps": 30, "beta": 0.5, "note": "caf\u00e9", "views": [1, 2]}
    root = os.path.join(folder, "paths")
    store = PathStore.create(root, points, "cpp_test_paths", meta, logits=True, shard_size=4, overwrite=True)
    idx = torch.arange(100, 110)
    logits = [torch.randn(10, p.channels, generator=gen) for p in points]
    store.append(PathChunk(idx, idx % 7, idx % 5, idx % 3, (idx % 4).to(torch.int8), logits))
    store.close()
    shutil.copy(os.path.join(root, "shard-00000.safetensors"), os.path.join(root, "shard-00003.safetensors"))
    expected = {"image_index": idx, "label": idx % 7, "target": idx % 5, "prediction": idx % 3,
                "status": (idx % 4).to(torch.int8), "packed": pack_bits(torch.cat(logits, dim=1) > 0),
                "logits": torch.cat(logits, dim=1).half(), **{f"masks.{i}": m > 0 for i, m in enumerate(logits)}}
    shard1 = os.path.join(root, "shard-00001.safetensors")
    with open(shard1, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    save_file(expected, os.path.join(folder, "paths_expected.safetensors"),
              metadata={"meta": json.dumps(meta, sort_keys=True), "flipped_tensor": last})

    def damaged(what, change):
        copy = os.path.join(folder, f"paths_bad_{what}")
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(root, copy)
        change(copy)

    def flip(copy):
        path = os.path.join(copy, "shard-00001.safetensors")
        data = bytearray(open(path, "rb").read())
        data[-2] ^= 0xFF  # in the last tensor's bytes
        open(path, "wb").write(bytes(data))

    def manifest(**changes):
        def change(copy):
            path = os.path.join(copy, "manifest.json")
            m = json.load(open(path))
            for key, value in changes.items():
                if key == "rows":
                    m["shards"][1]["images"], m["images"] = value, m["images"] - 4 + value
                else:
                    m[key] = value
            json.dump(m, open(path, "w"))
        return change

    damaged("flipped", flip)
    damaged("missing", lambda copy: os.remove(os.path.join(copy, "shard-00002.safetensors")))
    damaged("format", manifest(format="nad-ext.pathstore/2"))
    damaged("rows", manifest(rows=3))


def export_gated_model(folder: str) -> None:
    """A small gated CNN packaged for C++ (torch.export + AOTInductor, CPU), with a batch of
    another size than at export and the outputs the C++ side must reproduce."""
    from torch import nn

    from nad_ext.gates import GatedModel
    from nad_ext.gates.export import export_gated

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5),
    )
    gated = GatedModel(net, ["1", "3"], num_tasks=3, example_input=torch.randn(2, 3, 8, 8),
                       model_id="cpp_test_convnet")
    start = time.perf_counter()
    export_gated(gated, torch.randn(2, 3, 8, 8), os.path.join(folder, "gated_all.pt2"))
    print(f"gated_all.pt2: exported and compiled in {time.perf_counter() - start:.1f} s")
    x = torch.randn(5, 3, 8, 8)
    task_ids = torch.tensor([0, 2, 1, 1, 0])
    with torch.no_grad():
        expected = {"x": x, "task_ids": task_ids, "y_all": gated(x, task_ids)[0]}
    save_file(expected, os.path.join(folder, "gated_expected.safetensors"))
    if torch.cuda.is_available():  # on a GPU machine, the CUDA package too (pt2_gated_model runs it)
        start = time.perf_counter()
        export_gated(gated.to("cuda"), torch.randn(2, 3, 8, 8, device="cuda"), os.path.join(folder, "gated_cuda.pt2"))
        print(f"gated_cuda.pt2: exported and compiled in {time.perf_counter() - start:.1f} s")


def main(folder: str, library: str | None) -> None:
    os.makedirs(folder, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    tensors.update(task_gate_case(gen, "conv", (6, 3, 4, 5), num_tasks=3))
    tensors.update(task_gate_case(gen, "flat", (5, 7), num_tasks=2))
    save_file(tensors, os.path.join(folder, "task_gate.safetensors"))
    fused = {}
    fused.update(masked_conv2d_case(gen, "mc", (4, 3, 7, 6), (5, 3, 3, 3), 3, ((2, 1), (1, 0), (1, 2), 1), True, True))
    fused.update(masked_conv2d_case(gen, "mcg", (3, 4, 5, 5), (6, 2, 3, 3), 2, ((1, 1), (1, 1), (1, 1), 2), False, False))
    fused.update(gate_mse_case(gen, "mse"))
    fused.update(normalized_step_case(gen, "step"))
    save_file(fused, os.path.join(folder, "fused.safetensors"))

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
        use_library(library)
        python_banks(folder, gen)
        export_gated_model(folder)
    # After use_library: the store imports nad_ext, which loads the operators from the library
    # given (or from nad_ext._C without one, as test_sanitize.sh runs it).
    python_path_store(folder, gen)
    print(f"fixtures written to {folder}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--library", help="libnad.so: also write banks with nad_ext and package a gated model")
    args = parser.parse_args()
    main(args.folder, args.library)
