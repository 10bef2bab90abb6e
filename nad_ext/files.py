"""Writing output files: atomically, and with the permissions the user's umask gives.

``tempfile.mkstemp`` creates its file with mode 0600 (private); a file renamed from it into
place would keep that mode, unlike a file written with ``open(path, "w")``. Mask banks,
analyses, reports and the zoo cache are meant to be shared like any other output, so the
temporary file gets ``0666 & ~umask`` before it is renamed into place.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


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


def atomic_write(path: str | Path, write) -> None:
    """Calls ``write(tmp_path)`` on a temporary file beside ``path``, then renames it over
    ``path``: readers see the old file or the new one, never half of one. The file gets the
    mode ``open()`` would give it (0666 minus the umask); the temporary is removed on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # after writing: some writers (safetensors) replace the file with a new 0600 one
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
