"""Durable files: atomic writes with readable errors, and safetensors files whose tensors carry
CRC-32 checksums.

Atomic writes go to a temporary file ``.<name>.<random>.tmp`` in the target's folder, which is
flushed to disk and renamed over the target; so a reader (or a crash) sees the old file or the
new one, never a mix. A failed write (a full disk, say) raises :class:`WriteError` naming the
file, and leaves the old file as it was.

Checksums: the metadata key ``crc32`` holds a JSON object {tensor name: 8 hex digits}, the
CRC-32 (zlib's, ISO-HDLC polynomial) of each tensor's bytes as stored in the file. CRC-32 because
it is in Python's standard library (``zlib.crc32``, ~1.5 GB/s here, several times faster than
hashlib's BLAKE2), is a 20-line table in C++ for the LibTorch reader (csrc/maskbank/), and
detects every burst error up to 32 bits and any other corruption with probability 1 - 2^-32:
the files need protection against flipped bytes, not against an adversary.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import tempfile
import time
import zlib
from pathlib import Path

import torch
from safetensors import SafetensorError

from nad_ext._utils import faults

CHECKSUM_KEY = "crc32"


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux's
    /proc/self/status); elsewhere by setting and restoring it."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class WriteError(OSError):
    """A file could not be written; the message names it and the cause (``errno`` is the cause's)."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class CorruptFileError(ValueError):
    """A file is damaged: unreadable, or a tensor whose bytes fail their checksum."""


LOCK_FILE = ".nad.lock"  # a writer's advisory lock in the folder it writes (run folders, path stores)


class FolderLockedError(RuntimeError):
    """Another process holds the writer's lock of a folder."""


def lock_folder(folder: Path, what: str,
                error: type[FolderLockedError] = FolderLockedError) -> tuple[int | None, str]:
    """Takes the exclusive advisory lock (flock) of ``folder``'s :data:`LOCK_FILE` for this
    process's writer and records who holds it (PID, host, start, a session token); returns the
    open descriptor (closing it releases the lock; None where the OS has no flock) and the token.
    ``error`` (a :class:`FolderLockedError`) names ``what`` (e.g. "run folder x") and the holder
    when another process has it. A lock file that is a symbolic link is refused (O_NOFOLLOW), not
    written through."""
    token = secrets.token_hex(8)
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks
        return None, token
    path = folder / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as err:
        if path.is_symlink():
            raise WriteError(err.errno, f"cannot lock the {what}: {LOCK_FILE} is a symbolic link "
                             f"(to {os.readlink(path)}), which is not followed for writing; remove it") from None
        raise WriteError(err.errno, f"cannot write {path}: {err.strerror or err}") from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise error(f"{what} is in use by {lock_holder(path)}: two runs must not write it; wait for that one "
                    "to finish, stop it, or choose another output folder") from None
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "token": token,
                         "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
    except OSError as err:
        os.close(fd)
        raise WriteError(err.errno, f"cannot write {path}: {err.strerror or err}") from err
    return fd, token


def lock_holder(lock_path: Path) -> str:
    """Who holds the lock of ``lock_path``, as its file says."""
    try:
        info = json.loads(lock_path.read_text())
        return f"process {info['pid']} on {info['host']} (since {info['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def is_temp_name(name: str, targets) -> bool:
    """Whether ``name`` is an atomic writer's temporary file for one of the file names ``targets``
    (a callable name -> bool, or a collection of names)."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return False
    target = name[1:-4].rpartition(".")[0]  # strip the leading dot, the random part and ".tmp"
    return targets(target) if callable(targets) else target in targets


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform or file system that cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write) -> None:
    """Calls ``write(tmp_path)``, flushes the temporary file to disk and renames it over ``path``.

    Raises :class:`WriteError` (naming ``path``) when any of it fails; ``path`` is then unchanged
    and the temporary file removed.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        faults.write_event("open", path)
        write(tmp)
        # As open() would create it, not mkstemp's 0600; after writing, since some writers
        # replace the file with a new one.
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        faults.write_event("written", path)
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
        faults.write_event("renamed", path)
    except (OSError, SafetensorError) as err:
        if isinstance(err, WriteError):
            raise
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise WriteError(getattr(err, "errno", None), f"cannot write {path}: {reason}") from err
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


# ----------------------------------------------------------------------------------------------
# safetensors with checksums


def crc32_hex(data) -> str:
    return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"


def tensor_bytes(t: torch.Tensor):
    """A tensor's bytes as safetensors stores them (little-endian, row-major), as a buffer."""
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy() if t.numel() else b""


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """Writes ``tensors`` atomically with ``metadata`` plus the ``crc32`` checksum of each."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    sums = {k: crc32_hex(tensor_bytes(v)) for k, v in tensors.items()}
    metadata = {**metadata, CHECKSUM_KEY: json.dumps(sums, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_safetensors(path: str | Path, what: str = "file", describe=None) -> tuple[dict[str, torch.Tensor], dict[str, str], bool]:
    """Reads a safetensors file: ``(tensors, metadata, verified)``.

    When the metadata has checksums, every tensor's bytes are checked against them and a
    mismatch raises :class:`CorruptFileError` naming the tensor; ``verified`` is False for files
    without checksums (written before they existed, or by other tools). ``what`` names the
    file in messages ("mask bank", ...); ``describe(name, metadata)`` may add words about a
    tensor to them (" (gate point ...)"). A missing file raises FileNotFoundError.
    """
    from safetensors.torch import load as load_bytes

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    data = path.read_bytes()
    try:
        if len(data) < 8:
            raise ValueError(f"{len(data)} bytes, too short for a header")
        n = int.from_bytes(data[:8], "little")
        if n > len(data) - 8:
            raise ValueError(f"header length {n} exceeds the file ({len(data)} bytes)")
        header = json.loads(data[8:8 + n])
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        tensors = load_bytes(data)
    except (ValueError, SafetensorError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{what} {path} is corrupted or not a safetensors file: {err}") from err
    if CHECKSUM_KEY not in metadata:
        return tensors, metadata, False
    try:
        sums = json.loads(metadata[CHECKSUM_KEY])
        if not isinstance(sums, dict):
            raise ValueError
    except ValueError:
        raise CorruptFileError(f"{what} {path} is corrupted: its metadata {CHECKSUM_KEY!r} is not a JSON object") from None
    body = memoryview(data)[8 + n:]
    for name, info in header.items():
        about = f"tensor {name!r}" + (describe(name, metadata) if describe else "")
        if name not in sums:
            raise CorruptFileError(f"{what} {path} is corrupted: {about} has no checksum")
        begin, end = info["data_offsets"]
        actual = crc32_hex(body[begin:end])
        if actual != sums[name]:
            raise CorruptFileError(f"{what} {path} is corrupted: {about} fails its CRC-32 check "
                                   f"(stored {sums[name]}, computed {actual})")
    missing = sorted(set(sums) - set(header))
    if missing:
        raise CorruptFileError(f"{what} {path} is corrupted: tensor {missing[0]!r} is missing")
    return tensors, metadata, True
