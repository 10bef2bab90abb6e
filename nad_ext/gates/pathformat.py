"""The path store's format (``nad-ext.pathstore/1``, docs/DESIGN.md) below the store itself
(:mod:`nad_ext.gates.pathstore`): names and fields, bit packing of the binary paths, the size
estimate and disk-space check, the manifest's checks, verified partial reads of a shard.

Bit order: channel j of a row (all gate points' channels concatenated in gate-point order) is
bit j % 8 (value ``1 << (j % 8)``) of byte j // 8: "little" bit order, numpy's
``packbits(bitorder="little")``; the unused high bits of a row's last byte are 0.
"""
from __future__ import annotations

import errno
import json
import math
import re
import shutil
from pathlib import Path
from typing import Sequence

import torch

from nad_ext._utils.storage import CHECKSUM_KEY, CorruptFileError, crc32_hex, is_temp_name, tensor_bytes
from nad_ext.gates.points import RECORDS, UNITS

FORMAT = "nad-ext.pathstore/1"
MANIFEST = "manifest.json"
SHARD_SIZE = 4096
DISK_MARGIN = 0.10  # check_disk_space asks for the estimate plus this fraction
FIELDS = {"image_index": torch.int64, "label": torch.int64, "target": torch.int64,
          "prediction": torch.int64, "status": torch.int8}
_SHARD_OVERHEAD = 2048  # bytes per shard beyond its tensors: header, metadata, checksums
_SHARD_NAME = re.compile(r"shard-(\d{5})\.safetensors")


def shard_name(index: int) -> str:
    """The file name of shard ``index`` (from 0)."""
    return f"shard-{index:05d}.safetensors"


# ----------------------------------------------------------------------------------------------
# bit packing (the bit order: see the module docstring)


def pack_bits(masks: torch.Tensor) -> torch.Tensor:
    """(N, C) bool -> (N, ceil(C / 8)) uint8, little-endian bit order within each byte."""
    if masks.dim() != 2:
        raise ValueError(f"pack_bits expects an (N, C) tensor, got shape {tuple(masks.shape)}")
    n, c = masks.shape
    nbytes = (c + 7) // 8
    bits = torch.zeros(n, nbytes * 8, dtype=torch.uint8, device=masks.device)
    bits[:, :c] = masks.bool()
    weights = torch.tensor([1 << k for k in range(8)], dtype=torch.uint8, device=masks.device)
    return (bits.view(n, nbytes, 8) * weights).sum(dim=2, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, channels: int, start: int = 0) -> torch.Tensor:
    """Bits ``start .. start + channels - 1`` of each row of a (N, B) uint8 matrix from
    :func:`pack_bits`, as an (N, channels) bool tensor."""
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError(f"unpack_bits expects an (N, B) uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if start < 0 or channels < 0 or start + channels > packed.shape[1] * 8:
        raise ValueError(f"bits {start}..{start + channels} exceed the {packed.shape[1]} bytes of a row")
    first, last = start // 8, (start + channels + 7) // 8
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed[:, first:last].unsqueeze(-1) >> shifts) & 1
    offset = start - 8 * first
    return bits.reshape(packed.shape[0], -1)[:, offset:offset + channels].bool()


# ----------------------------------------------------------------------------------------------
# size


class InsufficientSpaceError(OSError):
    """A path store would not fit on its disk (``errno`` ENOSPC); the message says how much it
    needs and how much is free."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def estimate_bytes(num_images: int, channels_total: int, logits: bool = False, shard_size: int = SHARD_SIZE) -> int:
    """Bytes a store of ``num_images`` paths over ``channels_total`` channels takes on disk: per
    image the packed mask (ceil(C / 8) bytes), four int64 fields and the int8 status, with
    ``logits`` 2 * C bytes of float16; plus each shard's header and the manifest."""
    per_image = (channels_total + 7) // 8 + 4 * 8 + 1 + (2 * channels_total if logits else 0)
    shards = math.ceil(num_images / shard_size)
    return num_images * per_image + shards * (_SHARD_OVERHEAD + 64) + 4096


def check_disk_space(folder: str | Path, num_images: int, channels_total: int, logits: bool = False,
                     margin: float = DISK_MARGIN, shard_size: int = SHARD_SIZE) -> int:
    """Raises :class:`InsufficientSpaceError` when ``num_images`` more paths (plus ``margin``)
    would not fit on the disk that holds ``folder`` (which need not exist yet); returns the bytes
    needed. Call it before training starts."""
    need = int(estimate_bytes(num_images, channels_total, logits, shard_size) * (1 + margin))
    where = Path(folder).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if need > free:
        raise InsufficientSpaceError(
            errno.ENOSPC,
            f"path store {folder}: {num_images} images x {channels_total} channels "
            f"({'with' if logits else 'without'} float16 logits) need about {need} bytes "
            f"({need / 2**30:.2f} GiB, {margin:.0%} margin included), but only {free} bytes "
            f"({free / 2**30:.2f} GiB) are free on the disk of {where}")
    return need


# ----------------------------------------------------------------------------------------------
# files


def load_tensors(path: Path, names: Sequence[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors ``names`` of a safetensors file and its metadata, each tensor's CRC-32
    verified; the rest of the file is not read."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in names if k in f.keys()}
        sums = json.loads(meta[CHECKSUM_KEY])
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        raise CorruptFileError(f"path store shard {path} is corrupted or has no checksums: {err}") from err
    for k, t in tensors.items():
        actual = crc32_hex(tensor_bytes(t))
        if sums.get(k) != actual:
            raise CorruptFileError(f"path store shard {path} is corrupted: tensor {k!r} fails its CRC-32 check "
                                   f"(stored {sums.get(k)}, computed {actual})")
    return tensors, meta


def check_manifest(m: dict) -> None:
    """A manifest's fields and their types (KeyError, TypeError or ValueError saying which)."""
    names = m["gate_points"]
    lists = [m[k] for k in ("gate_points", "channels", "channel_axes", "units", "records")]
    if not all(isinstance(v, list) and len(v) == len(names) for v in lists) or not names:
        raise ValueError("gate_points, channels, channel_axes, units and records must be lists of one length")
    if not all(isinstance(n, str) and n for n in names) or len(set(names)) < len(names):
        raise ValueError("gate_points must be distinct non-empty strings")
    if not all(type(c) is int and c >= 1 for c in m["channels"] + m["channel_axes"]):
        raise ValueError("channels and channel_axes must be integers >= 1")
    if not set(m["units"]) <= set(UNITS) or not set(m["records"]) <= set(RECORDS):
        raise ValueError(f"units must be in {UNITS} and records in {RECORDS}")
    total = sum(m["channels"])
    if m["channels_total"] != total or m["mask_bytes"] != (total + 7) // 8 or m["bit_order"] != "little":
        raise ValueError("channels_total, mask_bytes or bit_order disagree with the gate points")
    if not isinstance(m["model_id"], str) or not isinstance(m["meta"], dict) or type(m["logits"]) is not bool:
        raise TypeError("model_id must be a string, meta an object and logits a boolean")
    if type(m["shard_size"]) is not int or m["shard_size"] < 1:
        raise ValueError("shard_size must be an integer >= 1")
    shards = m["shards"]
    for i, s in enumerate(shards):
        if not isinstance(s, dict) or s.get("file") != shard_name(i) or type(s.get("images")) is not int or not 1 <= s["images"] <= m["shard_size"]:
            raise ValueError(f"shard entry {i} must be {{'file': {shard_name(i)!r}, 'images': 1..shard_size}}, got {s}")
    if m["images"] != sum(s["images"] for s in shards):
        raise ValueError("images is not the sum of the shards' images")


def remove_shards(folder: Path, keep: int = 0) -> None:
    """Deletes a store's shard files from number ``keep`` on (orphans of a crash, or all) and
    the atomic writer's temporary files of the manifest and shards."""
    for f in folder.iterdir():
        m = _SHARD_NAME.fullmatch(f.name)
        if (m and int(m.group(1)) >= keep) or is_temp_name(f.name, lambda t: t == MANIFEST or bool(_SHARD_NAME.fullmatch(t))):
            f.unlink()
