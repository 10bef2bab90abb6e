"""Per-image routing paths on disk (issue 26): :class:`PathChunk`, the paths of a group of
images as training produces them, and :class:`PathStore`, the folder that keeps them at data-set
scale (10^5 images of a ResNet50-sized network: about 1.9 KB per image).

:class:`PathChunk` is the contract between :mod:`nad_ext.training.paths`, which makes chunks,
and the store, which writes them. The format (``nad-ext.pathstore/1``: a JSON manifest and
safetensors shards of bit-packed masks) is specified in docs/DESIGN.md; the C++ side reads it
too. Shards are written atomically with a CRC-32 per tensor
(:func:`nad_ext._utils.storage.save_safetensors`) and committed by rewriting the manifest after
them, so a crash leaves the last committed state plus at most an orphan shard, ignored when the
store is opened and overwritten by the next shard written.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from nad_ext._utils.storage import (LOCK_FILE, CorruptFileError, FolderLockedError, atomic_write, load_safetensors,
                                    lock_folder, save_safetensors)
from nad_ext.gates.pathformat import (DISK_MARGIN, FIELDS, FORMAT, MANIFEST, SHARD_SIZE, InsufficientSpaceError,
                                      check_disk_space, check_manifest, estimate_bytes, load_tensors, pack_bits,
                                      remove_shards, shard_name, unpack_bits)
from nad_ext.gates.points import GatePoint

__all__ = ["DISK_MARGIN", "FIELDS", "FORMAT", "MANIFEST", "SHARD_SIZE", "STATUS", "FolderLockedError",
           "InsufficientSpaceError", "PathChunk", "PathStore", "StoredPaths", "check_disk_space", "estimate_bytes",
           "pack_bits", "shard_name", "unpack_bits"]

# PathChunk.status codes: why an image's path is or is not meaningful.
STATUS = {
    0: "ok",            # trained: at least one step kept the original network's answer on a view
    1: "misclassified", # target "label" and the original network gets no view of the image right:
                        # the objective has no correct sample (METHOD.md: K empty), the gates stay at init
    2: "no_views",      # every view of the image was unreadable and skipped
    3: "nonfinite",     # a non-finite gate gradient stopped the image's training (on_nonfinite="skip")
}

_FP16_MAX = 65504.0  # logits are clamped to float16's finite range when stored


@dataclass
class PathChunk:
    """The paths of N images, one task each.

    ``image_index`` (N,) int64: the images' indices in their image set; ``label`` (N,) int64,
    their labels; ``target`` (N,) int64, the class each path was trained to keep (the label, or
    the original network's prediction with ``target="prediction"``); ``prediction`` (N,) int64,
    the original network's prediction on the image's evaluation view; ``status`` (N,) int8, a
    key of :data:`STATUS`; ``logits``: per gate point, (N, C_l) float32 gate logits (the binary
    path is ``logits > 0``).
    """

    image_index: torch.Tensor
    label: torch.Tensor
    target: torch.Tensor
    prediction: torch.Tensor
    status: torch.Tensor
    logits: list[torch.Tensor]

    def __len__(self) -> int:
        return int(self.image_index.shape[0])

    def masks(self) -> list[torch.Tensor]:
        """Per gate point, the (N, C_l) bool binary paths (logits > 0)."""
        return [m > 0 for m in self.logits]


# ----------------------------------------------------------------------------------------------
# the store


@dataclass
class StoredPaths:
    """Paths read from a store, rows in store order (the order they were appended): the fields
    of :data:`FIELDS`, ``masks`` {gate point: (N, C_l) bool} and, when the store keeps them,
    ``logits`` {gate point: (N, C_l) float16}."""

    image_index: torch.Tensor
    label: torch.Tensor
    target: torch.Tensor
    prediction: torch.Tensor
    status: torch.Tensor
    masks: dict[str, torch.Tensor]
    logits: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return int(self.image_index.shape[0])


def _normal(meta) -> dict:
    """``meta`` as it reads back from JSON (tuples become lists); TypeError when it cannot be
    stored (not JSON, or a NaN or infinite number, which JSON has no words for)."""
    try:
        meta = json.loads(json.dumps(meta if meta is not None else {}, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise TypeError(f"a path store's meta must be JSON: {err}") from None
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    return meta


def _manifest(model_id: str, gate_points: Sequence[GatePoint], logits: bool, shard_size: int, meta: dict,
              shard_images: Sequence[int]) -> dict:
    """The manifest of a store with committed shards of ``shard_images`` images each."""
    p, channels = gate_points, sum(g.channels for g in gate_points)
    return {"format": FORMAT, "model_id": model_id, "gate_points": [g.name for g in p],
            "channels": [g.channels for g in p], "channel_axes": [g.channel_axis for g in p],
            "units": [g.units for g in p], "records": [g.record for g in p], "channels_total": channels,
            "mask_bytes": (channels + 7) // 8, "bit_order": "little", "logits": logits, "shard_size": shard_size,
            "meta": meta, "images": sum(shard_images),
            "shards": [{"file": shard_name(i), "images": k} for i, k in enumerate(shard_images)]}


class PathStore:
    """A folder of per-image paths: ``manifest.json`` and shards ``shard-00000.safetensors``, ...
    Make one with :meth:`create` (or :meth:`open_or_create` to resume), add :class:`PathChunk`s
    with :meth:`append`, end with :meth:`close`; read with :meth:`read`, :meth:`packed`,
    :meth:`iter_shards`."""

    def __init__(self, folder: Path, manifest: dict):
        self.folder = folder
        self.model_id: str = manifest["model_id"]
        self.gate_points = [GatePoint(n, c, a, u, r) for n, c, a, u, r in zip(
            manifest["gate_points"], manifest["channels"], manifest["channel_axes"], manifest["units"],
            manifest["records"], strict=True)]
        self.meta: dict = manifest["meta"]
        self.logits: bool = manifest["logits"]
        self.shard_size: int = manifest["shard_size"]
        self.shard_images: list[int] = [s["images"] for s in manifest["shards"]]
        self.channels_total = sum(p.channels for p in self.gate_points)
        self.mask_bytes = (self.channels_total + 7) // 8
        self._buffer: list[dict[str, torch.Tensor]] = []
        self._index: list[torch.Tensor | None] = [None] * len(self.shard_images)  # per shard, read lazily
        self._buffered: set[int] = set()
        self._done: set[int] | None = None  # done_indices(), read when first asked for
        self._lock_fd: int | None = None  # a writer's lock (create), released by close()

    # --- making and opening --------------------------------------------------------------
    @classmethod
    def create(cls, folder: str | Path, gate_points: Sequence[GatePoint], model_id: str, meta: dict | None = None,
               *, logits: bool = False, shard_size: int = SHARD_SIZE, overwrite: bool = False,
               resume: bool = False, num_images: int | None = None) -> "PathStore":
        """A new, empty store in ``folder``. An existing store is refused unless ``overwrite``
        (its shards are deleted) or ``resume`` (it is opened, keeping its ``shard_size``, and
        refused unless it was made for the same gate points, model, ``meta`` and ``logits``; an
        orphan shard and temporary files left by a crash are deleted); a non-empty folder that is
        not a store is refused. With ``num_images`` (the images of the run; on resume those not yet
        committed count), :func:`check_disk_space` runs first. The writer holds the folder's lock
        (``.nad.lock``) until :meth:`close`: a second writer of the same store gets
        :class:`~nad_ext._utils.storage.FolderLockedError`, naming the first."""
        folder = Path(folder)
        gate_points = list(gate_points)
        meta = _normal(meta)
        if not gate_points or not all(isinstance(p, GatePoint) for p in gate_points):
            raise ValueError("a path store needs a non-empty list of GatePoints")
        if type(shard_size) is not int or shard_size < 1:
            raise ValueError(f"shard_size must be an integer >= 1, got {shard_size!r}")
        if folder.exists() and (not folder.is_dir() or not (folder / MANIFEST).is_file()
                                and {p.name for p in folder.iterdir()} - {LOCK_FILE}):
            raise FileExistsError(f"{folder} exists and is not an empty folder nor a path store; "
                                  "refusing to write a path store there")
        if num_images is not None and not (folder / MANIFEST).is_file():  # before the folder is made
            check_disk_space(folder, num_images, sum(p.channels for p in gate_points), logits, shard_size=shard_size)
        folder.mkdir(parents=True, exist_ok=True)
        lock, _ = lock_folder(folder, f"path store {folder}")
        try:
            store = cls._create_locked(folder, gate_points, model_id, meta, logits, shard_size, overwrite, resume,
                                       num_images)
        except BaseException:
            if lock is not None:
                os.close(lock)
            raise
        store._lock_fd = lock
        return store

    @classmethod
    def _create_locked(cls, folder: Path, gate_points, model_id, meta, logits, shard_size, overwrite, resume,
                       num_images) -> "PathStore":
        if (folder / MANIFEST).is_file():
            if resume:
                store = cls.open(folder)
                store.check_matches(gate_points, model_id, meta, logits)
                remove_shards(folder, keep=len(store.shard_images))  # orphans and temporary files
                if num_images is not None:
                    check_disk_space(folder, max(num_images - store.num_images, 0), store.channels_total, logits)
                return store
            if not overwrite:
                raise FileExistsError(f"path store {folder} exists; pass overwrite=True to replace it "
                                      "or resume=True to continue it")
            remove_shards(folder)  # the new manifest replaces the old one after them: a crash
                                    # between leaves a store with missing shards, refused on reading
        if num_images is not None and overwrite:  # a new store was checked before its folder was made
            check_disk_space(folder, num_images, sum(p.channels for p in gate_points), logits, shard_size=shard_size)
        manifest = _manifest(model_id, gate_points, bool(logits), shard_size, meta, [])
        check_manifest(manifest)
        store = cls(folder, manifest)
        store._write_manifest(store.shard_images)
        return store

    @classmethod
    def open_or_create(cls, folder: str | Path, gate_points: Sequence[GatePoint], model_id: str,
                       meta: dict | None = None, **kwargs) -> "PathStore":
        """:meth:`create` with ``resume=True``: a new store, or the one there if it matches."""
        return cls.create(folder, gate_points, model_id, meta, resume=True, **kwargs)

    @classmethod
    def open(cls, folder: str | Path) -> "PathStore":
        """An existing store, its manifest verified (shards are verified as they are read)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"path store {folder} does not exist")
        path = folder / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is not a path store (it has no {MANIFEST})")
        try:
            manifest = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise CorruptFileError(f"path store manifest {path} is corrupted: {err}") from err
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        if fmt != FORMAT:
            raise ValueError(f"{path}: unknown path store format {fmt!r} (this nad-ext reads {FORMAT!r})")
        try:
            check_manifest(manifest)
        except (KeyError, TypeError, ValueError) as err:
            raise CorruptFileError(f"path store manifest {path} is corrupted: {err}") from None
        return cls(folder, manifest)

    def mismatch(self, gate_points: Sequence[GatePoint], model_id: str, meta: dict | None = None,
                 logits: bool | None = None) -> list[str]:
        """What differs between this store and a run (empty when they match)."""
        problems = []
        if model_id != self.model_id:
            problems.append(f"the store is for model {self.model_id!r}, not {model_id!r}")
        if [p.name for p in gate_points] != [p.name for p in self.gate_points]:
            problems.append(f"the store's gate points are {[p.name for p in self.gate_points]}, "
                            f"not {[p.name for p in gate_points]}")
        else:
            for a, b in zip(self.gate_points, gate_points):
                problems += [f"gate point {a.name!r} has {k} {getattr(a, k)!r} in the store but {getattr(b, k)!r} now"
                             for k in ("channels", "channel_axis", "units", "record") if getattr(a, k) != getattr(b, k)]
        if meta is not None:
            meta = _normal(meta)
            for key in sorted(self.meta.keys() | meta.keys()):
                if self.meta.get(key, "<absent>") != meta.get(key, "<absent>"):
                    problems.append(f"meta {key!r} is {json.dumps(self.meta.get(key, '<absent>'))} in the "
                                    f"store but {json.dumps(meta.get(key, '<absent>'))} now")
        if logits is not None and bool(logits) != self.logits:
            problems.append(f"the store {'keeps' if self.logits else 'does not keep'} logits")
        return problems

    def check_matches(self, gate_points, model_id, meta=None, logits=None) -> None:
        problems = self.mismatch(gate_points, model_id, meta, logits)
        if problems:
            raise ValueError(f"path store {self.folder} was made for another run: " + "; ".join(problems))

    # --- writing -------------------------------------------------------------------------
    def append(self, chunk: PathChunk) -> None:
        """Buffers a chunk's rows; writes and commits every full shard of ``shard_size`` rows."""
        n = len(chunk)
        rows = {}
        for name in FIELDS:
            t = getattr(chunk, name)
            if t.shape != (n,) or t.dtype.is_floating_point or t.dtype.is_complex:
                raise ValueError(f"PathChunk.{name} is {t.dtype} {tuple(t.shape)}, expected integers ({n},)")
            rows[name] = t.detach().to("cpu", torch.int64)
        if len(chunk.logits) != len(self.gate_points):
            raise ValueError(f"PathChunk has logits for {len(chunk.logits)} gate points, the store has "
                             f"{len(self.gate_points)}")
        for p, m in zip(self.gate_points, chunk.logits):
            if m.shape != (n, p.channels):
                raise ValueError(f"PathChunk logits of gate point {p.name!r} have shape {tuple(m.shape)}, "
                                 f"expected ({n}, {p.channels})")
        bad = sorted(set(rows["status"].tolist()) - STATUS.keys())
        if bad:
            raise ValueError(f"PathChunk.status holds unknown codes {bad} (known: {sorted(STATUS)})")
        rows["status"] = rows["status"].to(torch.int8)
        new = rows["image_index"].tolist()
        unique = set(new)
        again = (unique & self.done_indices()) | (unique & self._buffered)
        if len(unique) < n:
            seen = set()
            again |= {i for i in new if i in seen or seen.add(i)}
        if again:
            raise ValueError(f"images already in path store {self.folder} or twice in the chunk: {sorted(again)[:10]}")
        logits = torch.cat([m.detach().to("cpu", torch.float32) for m in chunk.logits], dim=1)
        rows["masks"] = pack_bits(logits > 0)
        if self.logits:
            rows["logits"] = logits.clamp(-_FP16_MAX, _FP16_MAX).half()
        self._buffer.append(rows)
        self._buffered.update(new)
        while sum(len(b["status"]) for b in self._buffer) >= self.shard_size:
            self._write_shard(self.shard_size)

    def flush(self) -> None:
        """Writes and commits the buffered rows as one (partial) shard."""
        if self._buffer:
            self._write_shard(sum(len(b["status"]) for b in self._buffer))

    def close(self) -> None:
        """Writes and commits the buffered rows (:meth:`flush`) and releases the writer's lock."""
        try:
            self.flush()
        finally:
            self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __del__(self) -> None:  # a writer dropped without close() (a crash, in-process) frees the folder
        self._unlock()

    def __enter__(self) -> "PathStore":
        return self

    def __exit__(self, kind, *_) -> None:  # on an exception the buffered rows are dropped
        if kind is None:
            self.close()
        else:
            self._unlock()

    def _write_shard(self, n: int) -> None:
        rows = {k: torch.cat([b[k] for b in self._buffer]) for k in self._buffer[0]}
        index = len(self.shard_images)
        save_safetensors({k: v[:n] for k, v in rows.items()}, self.folder / shard_name(index),
                         {"format": FORMAT, "shard": str(index), "images": str(n)})
        self._write_manifest(self.shard_images + [n])  # the commit; a failure keeps the rows buffered
        self.shard_images.append(n)
        self._index.append(rows["image_index"][:n].clone())
        if self._done is not None:
            self._done.update(self._index[-1].tolist())
        rest = {k: v[n:] for k, v in rows.items()}
        self._buffer = [rest] if len(rest["status"]) else []
        self._buffered = set(rest["image_index"].tolist())

    def _write_manifest(self, shard_images: list[int]) -> None:
        manifest = _manifest(self.model_id, self.gate_points, self.logits, self.shard_size, self.meta, shard_images)
        text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
        atomic_write(self.folder / MANIFEST, lambda tmp: Path(tmp).write_text(text))

    # --- reading -------------------------------------------------------------------------
    @property
    def num_images(self) -> int:
        """Images in committed shards."""
        return sum(self.shard_images)

    def _shard(self, i: int, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Shard ``i``'s tensors (``names``, or all), checksums verified, shapes checked."""
        path = self.folder / shard_name(i)
        if not path.is_file():
            raise FileNotFoundError(f"path store {self.folder}: shard {path.name} is missing "
                                    f"(the manifest lists {len(self.shard_images)} shards)")
        if names is None:
            tensors, meta, verified = load_safetensors(path, "path store shard")
            if not verified:
                raise CorruptFileError(f"path store shard {path} has no checksums")
        else:
            tensors, meta = load_tensors(path, names)
        n = self.shard_images[i]
        shapes = {**{k: ((n,), d) for k, d in FIELDS.items()}, "masks": ((n, self.mask_bytes), torch.uint8)}
        if self.logits:
            shapes["logits"] = ((n, self.channels_total), torch.float16)
        if meta.get("format") != FORMAT or meta.get("shard") != str(i):
            raise CorruptFileError(f"path store shard {path} is not shard {i} of a {FORMAT} store")
        for k in names if names is not None else shapes:
            if k not in tensors:
                raise CorruptFileError(f"path store shard {path} is corrupted: it has no tensor {k!r}")
            t = tensors[k]
            if (tuple(t.shape), t.dtype) != shapes[k]:
                raise CorruptFileError(
                    f"path store shard {path}: tensor {k!r} is {str(t.dtype)[6:]} {tuple(t.shape)}, but the "
                    f"manifest says {str(shapes[k][1])[6:]} {shapes[k][0]} ({n} images, {self.channels_total} channels)")
        return tensors

    def image_indices(self) -> torch.Tensor:
        """(N,) int64: the committed images' indices, in store order."""
        for i, known in enumerate(self._index):
            if known is None:
                self._index[i] = self._shard(i, ["image_index"])["image_index"]
        return torch.cat(self._index) if self._index else torch.zeros(0, dtype=torch.int64)

    def done_indices(self) -> set[int]:
        """The image indices already committed (a resumed run skips them). The store's own set:
        do not change it."""
        if self._done is None:
            self._done = set(self.image_indices().tolist())
        return self._done

    def iter_shards(self, fields: Sequence[str] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Each committed shard's tensors (``fields`` of ``image_index``, ``label``, ``target``,
        ``prediction``, ``status``, ``masks`` (packed), ``logits``; default all), verified."""
        for i in range(len(self.shard_images)):
            yield self._shard(i, fields)

    def packed(self) -> torch.Tensor:
        """(N, ceil(C_total / 8)) uint8: every committed path, packed, in store order."""
        out = torch.empty(self.num_images, self.mask_bytes, dtype=torch.uint8)
        row = 0
        for shard in self.iter_shards(["masks"]):
            out[row:row + len(shard["masks"])] = shard["masks"]
            row += len(shard["masks"])
        return out

    def read(self, gate_points: Sequence[str] | None = None, images=None, logits: bool = True) -> StoredPaths:
        """The committed paths of the gate points named (default all) for the image indices
        ``images`` (default all; KeyError for one not in the store), unpacked, in store order;
        ``logits`` False skips the float16 logits."""
        names = [p.name for p in self.gate_points] if gate_points is None else list(gate_points)
        where, start = {}, 0
        for p in self.gate_points:
            where[p.name], start = (start, p.channels), start + p.channels
        unknown = [n for n in names if n not in where]
        if unknown:
            raise KeyError(f"path store {self.folder} has no gate points {unknown}")
        index = self.image_indices()
        keep = torch.ones(len(index), dtype=torch.bool)
        if images is not None:
            wanted = torch.as_tensor(list(images), dtype=torch.int64)
            keep = torch.isin(index, wanted)
            missing = sorted(set(wanted.tolist()) - set(index[keep].tolist()))
            if missing:
                raise KeyError(f"images {missing[:10]} are not in path store {self.folder}")
        total = int(keep.sum())
        with_logits = logits and self.logits
        out = StoredPaths(*(torch.empty(total, dtype=d) for d in FIELDS.values()),
                          masks={n: torch.empty(total, where[n][1], dtype=torch.bool) for n in names},
                          logits={n: torch.empty(total, where[n][1], dtype=torch.float16) for n in names}
                          if with_logits else None)
        row = begin = 0
        for i, n in enumerate(self.shard_images):
            sel = keep[begin:begin + n]
            begin += n
            k = int(sel.sum())
            if not k:
                continue
            shard = self._shard(i, [*FIELDS, "masks", *(["logits"] if with_logits else [])])
            for f in FIELDS:
                getattr(out, f)[row:row + k] = shard[f][sel]
            packed = shard["masks"][sel]
            for name in names:
                s, c = where[name]
                out.masks[name][row:row + k] = unpack_bits(packed, c, s)
                if with_logits:
                    out.logits[name][row:row + k] = shard["logits"][sel, s:s + c]
            row += k
        return out
