"""Fault injection for crash tests: kill this process (SIGKILL) or fail a write (ENOSPC) at a
chosen file write or training step, by count rather than by timing.

Set ``NAD_FAULT`` (or call :func:`configure`) to comma-separated ``key=value`` items:

    at=write:N          the N-th write event of this process (counted from 1)
    at=step:E:S         step S (from 1) of epoch E (from 1) of this process's training loop
    action=kill         SIGKILL this process there (default)
    action=enospc       raise OSError(ENOSPC) there instead (write events only): a full disk
    rank=R              only in the process whose RANK (torchrun) is R
    attempt=A           only when TORCHELASTIC_RESTART_COUNT is A (0: torchrun's first attempt)

For example ``NAD_FAULT=at=step:2:3,rank=1,attempt=0`` kills rank 1 in the middle of epoch 2 on
the first attempt only, so that ``torchrun --max-restarts=1`` restarts the run once.

Write events: every atomic write (:func:`nad_ext._utils.storage.atomic_write`) passes three, in order:
``open`` (its empty temporary file exists), ``written`` (the temporary file is complete) and
``renamed`` (the file is in place). A kill at each of them leaves the run directory in each state
a real crash can leave it in. :data:`trace` lists the events this process has passed, so that a
test can enumerate every write point of an uninterrupted run.
"""
from __future__ import annotations

import errno
import os
import signal

ENV = "NAD_FAULT"

trace: list[str] = []  # "write 3 renamed masks_epoch01.safetensors", "step 2:1", ... in order
_spec: dict | None = None
_configured = False
_writes = 0


def parse(text: str | None) -> dict | None:
    """The spec as a dict (``at``: ("write", n) or ("step", e, s)); ValueError naming what is wrong."""
    if not text:
        return None
    spec = {"action": "kill"}
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            raise ValueError(f"{ENV}: expected key=value items, got {item!r}")
        try:
            if key == "at":
                kind, *nums = value.split(":")
                nums = [int(n) for n in nums]
                if (kind, len(nums)) not in (("write", 1), ("step", 2)) or min(nums) < 1:
                    raise ValueError
                spec["at"] = (kind, *nums)
            elif key in ("rank", "attempt"):
                spec[key] = int(value)
            elif key == "action" and value in ("kill", "enospc"):
                spec[key] = value
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"{ENV}: bad item {item!r}; expected at=write:N, at=step:E:S, action=kill|enospc, "
                             f"rank=R or attempt=A") from None
    if "at" not in spec:
        raise ValueError(f"{ENV}={text!r} names no point (at=write:N or at=step:E:S)")
    if spec["action"] == "enospc" and spec["at"][0] != "write":
        raise ValueError(f"{ENV}: action=enospc needs at=write:N")
    return spec


def configure(text: str | None) -> None:
    """Sets the fault spec of this process (None: none) and restarts the counts and the trace."""
    global _spec, _configured, _writes
    _spec, _configured, _writes = parse(text), True, 0
    trace.clear()


def _active() -> dict | None:
    if not _configured:
        configure(os.environ.get(ENV))
    spec = _spec
    if spec is None:
        return None
    if "rank" in spec and int(os.environ.get("RANK", "0")) != spec["rank"]:
        return None
    if "attempt" in spec and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) != spec["attempt"]:
        return None
    return spec


def _fire(spec: dict, where: str) -> None:
    if spec["action"] == "enospc":
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected by {ENV} at {where})")
    os.kill(os.getpid(), signal.SIGKILL)


def write_event(stage: str, path) -> None:
    """Called by the atomic writer at its stages ``open``, ``written`` and ``renamed``."""
    global _writes
    spec = _active()
    _writes += 1
    trace.append(f"write {_writes} {stage} {os.path.basename(str(path))}")
    if spec is not None and spec["at"] == ("write", _writes):
        _fire(spec, trace[-1])


def step_event(epoch: int, step: int) -> None:
    """Called by the training loop before step ``step`` of epoch ``epoch`` (both from 1)."""
    spec = _active()
    if spec is not None and spec["at"] == ("step", epoch, step):
        trace.append(f"step {epoch}:{step}")
        _fire(spec, trace[-1])


def run_with(text: str | None, fn, *args, **kwargs):
    """Test hook: calls ``fn(*args, **kwargs)`` with the fault spec ``text`` active in this
    process; returns the write events it passed (in a child process, a kill ends it instead)."""
    configure(text)
    try:
        fn(*args, **kwargs)
        return list(trace)
    finally:
        configure(None)
