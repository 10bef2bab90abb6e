"""A run folder that is consistent after any crash: the epoch commit protocol, the folder's
lock, and the clean-up and repair on resume.

The files of a run (``disentangle(out_dir=...)``, ``nad disentangle --out``):

    masks.safetensors          the bank after the last committed epoch: the commit record
    masks_epochNN.safetensors  a copy of the bank after each epoch (``keep_every_epoch``)
    log.json                   per-epoch loss terms and throughput
    .nad.lock                  the advisory lock (flock) of the process writing the folder: its
                               PID, host, start time and a session token
    shards/                    the ranks' shards of the running epoch (distributed runs)

Epoch N commits in this order, each file written atomically: the copy ``masks_epochNN``, then
``log.json`` with N entries, then ``masks.safetensors`` at epoch N. The bank's rename is the
commit; its ``epoch`` metadata names the committed epoch. Whatever a crash leaves before that
rename is uncommitted: on resume (and before a new run) the folder is rolled back to the
committed epoch (later copies and log entries removed, temporary files of our naming and stale
shards deleted), and what the committed epoch lacks is rebuilt (its copy, for folders written
before this protocol, whose bank was saved first). So a run killed at any moment and resumed
ends with the files of an uninterrupted run. A folder without a bank but with copies of later
epochs than the first was not left so by a crash (the bank was lost some other way): it is
refused rather than rolled back, which would delete those copies.

Symbolic links: the folder itself may be a link to a folder (it is followed). Links inside it
are never written through: files are replaced by atomic renames (which replace a link, not its
target), rolled-back files are unlinked (the link, not its target), a ``shards/`` link is
removed, and a ``.nad.lock`` that is a link is refused (opened with O_NOFOLLOW).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

from nad_ext._utils.storage import LOCK_FILE, FolderLockedError, WriteError, atomic_write, is_temp_name, lock_folder
from nad_ext.gates.maskbank import MaskBank

BANK_FILE = "masks.safetensors"
LOG_FILE = "log.json"
SHARD_DIR = "shards"
_EPOCH_COPY = re.compile(r"masks_epoch(\d+)\.safetensors")


class RunLockedError(FolderLockedError):
    """Another process holds the run folder's lock."""


def note(message: str) -> None:
    """One line on stderr for things a user should know but that do not stop the run."""
    print(f"note: {message}", file=sys.stderr, flush=True)


def epoch_file(epoch: int) -> str:
    return f"masks_epoch{epoch:02d}.safetensors"


def _ours(name: str) -> bool:
    return name in (BANK_FILE, LOG_FILE) or _EPOCH_COPY.fullmatch(name) is not None


class RunDir:
    """One run folder: ``bank`` and ``log`` hold its committed state (None and [] for a new
    run); :meth:`commit` adds an epoch. A folder without a path (``RunDir(None)``) keeps
    nothing and commits nothing."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None
        self.bank: MaskBank | None = None
        self.log: list[dict] = []
        self.token: str | None = None  # identifies this session in the lock file
        self._lock_fd: int | None = None
        self._follower = False

    @classmethod
    def follower(cls, path: str | Path, bank: MaskBank | None, log: list[dict], token: str | None) -> "RunDir":
        """The folder as a rank other than 0 of a distributed run sees it: the committed state
        that rank 0 opened (no lock, no commits)."""
        run = cls(path)
        run.bank, run.log, run.token, run._follower = bank, list(log), token, True
        return run

    @property
    def epoch(self) -> int:
        """The last committed epoch (0 before the first)."""
        return self.bank.epoch if self.bank is not None else 0

    def file(self, name: str) -> Path:
        return self.path / name

    def shard_path(self, epoch: int, rank: int) -> Path:
        return self.path / SHARD_DIR / f"epoch{epoch:03d}-rank{rank:05d}.safetensors"

    # --- opening --------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path | None, *, resume: bool | str = False, overwrite: bool = False,
             keep_every_epoch: bool = True) -> "RunDir":
        """Locks the folder and brings it to its last committed epoch.

        ``resume``: continue the committed run (True), starting a new one with a note when there
        is none, or refusing to (``"strict"``). Without ``resume``, an existing bank is refused
        unless ``overwrite``, which deletes the earlier run's files first.
        """
        run = cls(path)
        if run.path is None:
            return run
        if resume not in (False, True, "strict"):
            raise ValueError(f"resume must be True, False or 'strict', got {resume!r}")
        try:
            run.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise WriteError(err.errno, f"cannot create the run folder {run.path}: {err.strerror or err}") from err
        run._lock()
        try:
            run._prepare(resume, overwrite, keep_every_epoch)
        except BaseException:
            run.close()
            raise
        return run

    def _prepare(self, resume, overwrite: bool, keep_every_epoch: bool) -> None:
        self._remove_temp_files()
        shards = self.file(SHARD_DIR)
        if shards.is_symlink():  # never followed: the link goes, not what it points to
            shards.unlink()
        shutil.rmtree(shards, ignore_errors=True)  # shards of an epoch never committed
        bank_path = self.file(BANK_FILE)
        if not bank_path.exists() and not overwrite:
            self._refuse_uncommitted_history()
        if bank_path.exists() and not (resume or overwrite):
            raise FileExistsError(f"{bank_path} exists: pass resume=True (--resume) to continue it or overwrite=True "
                                  "(--overwrite) to replace the run")
        if bank_path.exists() and resume and not overwrite:
            try:
                self.bank = MaskBank.load(bank_path)
            except ValueError as err:
                copy = self.file(epoch_file(_epoch_of(bank_path)))
                hint = f"; {copy.name} may hold the same epoch" if copy.exists() else ""
                raise ValueError(f"cannot resume: {err}{hint}") from err
            self.log = self._read_log(self.bank.epoch)
            self._roll_back(self.bank.epoch)
            if keep_every_epoch and self.bank.epoch > 0 and not self.file(epoch_file(self.bank.epoch)).exists():
                self.bank.save(self.file(epoch_file(self.bank.epoch)))
                note(f"rebuilt {epoch_file(self.bank.epoch)} from {BANK_FILE} (committed epoch {self.bank.epoch})")
            note(f"resume: continuing {self.path} from its committed epoch {self.bank.epoch}")
            return
        if resume and not bank_path.exists():
            if resume == "strict":
                raise FileNotFoundError(f"cannot resume: {self.path} has no mask bank ({BANK_FILE})")
            note(f"resume: {self.path} has no mask bank yet: starting a new run")
        if overwrite and bank_path.exists():
            bank_path.unlink()  # first: the folder then holds no committed run
        self._roll_back(0)

    def _refuse_uncommitted_history(self) -> None:
        """A folder without a bank holds at most what a crash in the first epoch leaves (its copy
        ``masks_epoch01``, a log of one entry). Later copies mean the bank was lost some other way
        (a truncated copy of the folder, a deleted file): rolling back to no epoch would delete
        them, so the folder is refused instead."""
        later = sorted(int(m.group(1)) for p in self.path.iterdir() if (m := _EPOCH_COPY.fullmatch(p.name)))
        if later and later[-1] > 1:
            last = epoch_file(later[-1])
            raise FileNotFoundError(
                f"run folder {self.path} has no mask bank ({BANK_FILE}) but epoch copies up to {last}: it was not "
                f"left so by a crash, and starting over would delete them; copy {last} to {BANK_FILE} to resume "
                "from that epoch, or pass --overwrite (overwrite=True) to discard them")

    def _read_log(self, epoch: int) -> list[dict]:
        path = self.file(LOG_FILE)
        entries = []
        if path.exists():
            try:
                entries = json.loads(path.read_text())["epochs"]
                if not isinstance(entries, list):
                    raise ValueError("'epochs' is not a list")
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"cannot resume: {path} is damaged ({err}); move it away to resume without "
                                 "the loss history of the epochs done") from err
        entries = entries[:epoch]
        if len(entries) < epoch:  # a folder written before the commit protocol (bank saved first)
            lost = [e for e in range(len(entries) + 1, epoch + 1)]
            note(f"{path} lacks epochs {lost} of the committed run (written by an earlier nad-ext): "
                 "their loss terms are lost")
            entries += [{"epoch": e, "lost": True} for e in lost]
        return entries

    def _roll_back(self, epoch: int) -> None:
        """Removes what was written after the committed ``epoch``."""
        for p in self.path.iterdir():
            m = _EPOCH_COPY.fullmatch(p.name)
            if m and int(m.group(1)) > epoch:
                p.unlink()
        log = self.file(LOG_FILE)
        if epoch == 0:
            log.unlink(missing_ok=True)
        elif log.exists() and len(json.loads(log.read_text())["epochs"]) != epoch:
            self._write_log(self.log)

    def _remove_temp_files(self) -> None:
        """Temporary files of our atomic writes that a crash left behind (we hold the lock, so no
        writer of ours is running)."""
        for p in self.path.iterdir():
            if p.is_file() and is_temp_name(p.name, _ours):
                p.unlink(missing_ok=True)

    # --- the lock -------------------------------------------------------------------------------
    def _lock(self) -> None:
        self._lock_fd, self.token = lock_folder(self.path, f"run folder {self.path}", RunLockedError)

    def close(self) -> None:
        """Releases the lock (the lock file stays: removing it would race with a new holder)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def lock_token(self) -> str | None:
        """The session token in the lock file, as another process (a rank on another node) sees it."""
        try:
            return json.loads(self.file(LOCK_FILE).read_text()).get("token")
        except (OSError, ValueError, AttributeError):
            return None

    # --- committing -----------------------------------------------------------------------------
    def _write_log(self, entries: list[dict], bank: MaskBank | None = None) -> None:
        bank = bank or self.bank
        payload = json.dumps({"model_id": bank.model_id, "tasks": bank.task_names, "epochs": entries}, indent=1)
        atomic_write(self.file(LOG_FILE), lambda tmp: Path(tmp).write_text(payload))

    def commit(self, bank: MaskBank, entry: dict, keep_every_epoch: bool = True) -> None:
        """Commits ``bank`` (epoch ``bank.epoch``) with its log ``entry``: the per-epoch copy, the
        log, then the bank. A write error names the file and how to resume."""
        if self.path is None:
            self.bank, self.log = bank, self.log + [entry]
            return
        if self._follower:
            raise RuntimeError("only the process that opened the run folder (rank 0) commits to it")
        entries = self.log + [entry]
        try:
            if keep_every_epoch:
                bank.save(self.file(epoch_file(bank.epoch)))
            self._write_log(entries, bank)
            bank.save(self.file(BANK_FILE))
        except WriteError as err:
            done = f"epoch {self.epoch}" if self.epoch else "no epoch yet (nothing to resume; rerun to start again)"
            raise WriteError(err.errno, f"{err}\nThe run in {self.path} is intact at its last committed {done}. "
                             "Free space (or fix the cause) and rerun the same command with --resume to continue "
                             "from there.") from err
        self.bank, self.log = bank, entries


def _epoch_of(bank_path: Path) -> int:
    """The epoch in a bank's metadata without verifying it (for hints about damaged banks)."""
    try:
        raw = bank_path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        return int(json.loads(raw[8:8 + n])["__metadata__"]["epoch"])
    except Exception:  # noqa: BLE001 - a hint only
        return 0
