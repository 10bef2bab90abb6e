"""The run folder across the ranks of a torchrun run: every rank writes its shard of an epoch,
rank 0 assembles the shards and commits the epoch with :class:`~nad_ext.training.rundir.RunDir`.

After every epoch each rank writes its shard (its tasks' logits and loss terms, format
``nad-ext.shard/1``) atomically to ``<out>/shards/``; one collective later every shard is in
place, and rank 0 checks and assembles them and commits the epoch in a thread while every rank
(rank 0 too) goes on with the next epoch. A failed commit is reported to every rank at the next
epoch's end. The run folder must be on a file system every rank sees; :meth:`SharedRun.open`
checks that at the start (through the lock file's session token). In a world of one process a
:class:`SharedRun` is the :class:`RunDir` itself: each epoch is committed at once.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from nad_ext._utils.storage import load_safetensors, save_safetensors
from nad_ext.distributed import Context
from nad_ext.gates.maskbank import MaskBank
from nad_ext.training import fidelity
from nad_ext.training.rundir import BANK_FILE, SHARD_DIR, RunDir

SHARD_FORMAT = "nad-ext.shard/1"
PER_TASK = ("skipped_batches", "nonfinite_steps", "ce", "mse", "sparse", "loss")  # the log's per-task lists
# The selective objective's term, in its runs' logs only; the fidelity check's figures, in the
# last epoch's entry only (nad_ext.training.fidelity).
OPTIONAL_PER_TASK = ("negative",) + tuple(fidelity.LOG_PREFIX + k for k in fidelity.FIGURES)


class SharedRun:
    """This rank's view of the run folder (``folder``: the committed state, ``bank`` and
    ``log``) and the state of the commit that runs on rank 0 while the next epoch trains."""

    def __init__(self, ctx: Context, folder: RunDir):
        self.ctx, self.folder = ctx, folder
        self.pending: BaseException | None = None  # rank 0: a failed commit, reported at the next agree()
        self.committer: threading.Thread | None = None  # rank 0: the commit of the last epoch, running
        self.epoch_start = time.perf_counter()  # when this rank's epoch began

    @property
    def bank(self) -> MaskBank | None:
        """The committed bank (None for a new run)."""
        return self.folder.bank

    def file(self, name: str) -> Path:
        return self.folder.file(name)

    @classmethod
    def open(cls, ctx: Context, out_dir, **kwargs) -> "SharedRun":
        """:meth:`RunDir.open` on rank 0; the other ranks get its committed state, after checking
        that they see the same folder (``kwargs``: resume, overwrite, keep_every_epoch)."""
        if not ctx.distributed:
            return cls(ctx, RunDir.open(out_dir, **kwargs))
        if out_dir is None:
            raise ValueError("a distributed run needs out_dir (--out), a folder every rank sees")
        run, error = None, None
        start = time.perf_counter()
        if ctx.rank == 0:
            try:
                run = RunDir.open(out_dir, **kwargs)
            except Exception as err:  # noqa: BLE001 - shared with the other ranks, then re-raised
                error = err
        ctx.agree(error, "opening the run folder")
        try:
            state = ctx.broadcast((run.bank, run.log, run.token) if ctx.rank == 0 else None)
            error = None
            if ctx.rank != 0:
                run = RunDir.follower(out_dir, *state)
                if run.lock_token() != run.token:
                    error = ValueError(f"{Path(out_dir).resolve()} on this node is not the folder rank 0 opened: "
                                       "a distributed run's --out must be on a file system every node shares")
            ctx.agree(error, "checking the run folder")
        except BaseException:
            if ctx.rank == 0:
                run.close()
            raise
        shared = cls(ctx, run)
        shared.epoch_start = start
        return shared

    def commit_epoch(self, bank: MaskBank, stats: dict, tasks: list[int], keep_every_epoch: bool) -> None:
        """Commits the epoch of ``bank`` (``stats``: the epoch's log entry from this process's
        ``tasks``). Distributed: every rank writes its shard; rank 0 assembles and commits."""
        ctx = self.ctx
        if not ctx.distributed:
            self.folder.commit(bank, stats, keep_every_epoch)
            return
        self._join()
        error, self.pending = self.pending, None
        shard = self.folder.shard_path(bank.epoch, ctx.rank)
        if error is None:
            try:
                record = {k: [stats[k][t] for t in tasks] for k in PER_TASK + OPTIONAL_PER_TASK if k in stats}
                # Since the last shard: the collectives, and the epoch's wall time (with rank 0's commit).
                record.update(images=stats["images"], seconds=stats["seconds"], wait_seconds=ctx.wait_seconds,
                              data_pipeline=stats.get("data_pipeline"), data_wait_s=stats.get("data_wait_s", 0.0),
                              step_s=stats.get("step_s", 0.0), bad_images=stats.get("bad_images", 0),
                              bad_image_files=stats.get("bad_image_files", []),
                              sent_bytes=ctx.sent_bytes, epoch_seconds=time.perf_counter() - self.epoch_start)
                ctx.wait_seconds, ctx.sent_bytes = 0.0, 0
                save_safetensors({f"logits.{i:03d}": m[tasks] for i, m in enumerate(bank.logits)}, shard, {
                    "format": SHARD_FORMAT, "epoch": str(bank.epoch), "rank": str(ctx.rank),
                    "world_size": str(ctx.world_size), "tasks": json.dumps(tasks), "stats": json.dumps(record)})
            except Exception as err:  # noqa: BLE001 - shared with the other ranks, then re-raised
                error = err
        ctx.agree(error, f"in epoch {bank.epoch}")  # every shard of the epoch is in place
        if ctx.rank == 0:  # assembles and commits while this rank, too, goes on with the next epoch
            self.committer = threading.Thread(target=self._commit, args=(bank, keep_every_epoch), name="nad-commit")
            self.committer.start()
        self.epoch_start = time.perf_counter()

    def _commit(self, bank: MaskBank, keep_every_epoch: bool) -> None:
        try:
            full, entry = assemble(self.ctx.world_size, self.folder, bank)
            self.folder.commit(full, entry, keep_every_epoch)
            for r in range(self.ctx.world_size):
                self.folder.shard_path(bank.epoch, r).unlink(missing_ok=True)
        except Exception as err:  # noqa: BLE001 - reported to every rank at the next agree()
            self.pending = err

    def _join(self) -> None:
        if self.committer is not None:
            self.committer.join()
            self.committer = None

    def close(self) -> None:
        """Waits for a running commit, then releases the run folder (also when the run failed)."""
        self._join()
        self.folder.close()

    def finish(self) -> MaskBank | None:
        """Waits for the last commit; returns the committed bank (None when nothing was committed)."""
        ctx, run = self.ctx, self.folder
        if ctx.distributed:
            self._join()
            error, self.pending = self.pending, None
            ctx.agree(error, "committing the last epoch")
            if ctx.rank == 0 and run.path is not None:
                try:
                    run.file(SHARD_DIR).rmdir()  # empty now; a folder like a single process's
                except OSError:
                    pass
            if ctx.rank != 0 and run.path is not None and run.file(BANK_FILE).exists():
                return MaskBank.load(run.file(BANK_FILE))
        return run.bank


def assemble(world_size: int, run: RunDir, bank: MaskBank) -> tuple[MaskBank, dict]:
    """The full bank and log entry of ``bank.epoch`` from every rank's shard (rank 0)."""
    logits = [m.clone() for m in bank.logits]
    T = len(bank.tasks)
    per_task = {k: [None] * T for k in PER_TASK}
    optional = []  # per-task lists that this run logs beyond PER_TASK (from rank 0's shard)
    ranks, bad_images, bad_files, pipeline = [], 0, [], None
    for r in range(world_size):
        path = run.shard_path(bank.epoch, r)
        tensors, meta, _ = load_safetensors(path, f"shard of rank {r}")
        expected = {"format": SHARD_FORMAT, "epoch": str(bank.epoch), "rank": str(r), "world_size": str(world_size)}
        wrong = {k: meta.get(k) for k, v in expected.items() if meta.get(k) != v}
        if wrong:
            raise ValueError(f"{path} is not the shard expected ({expected}): it has {wrong}")
        ids, record = json.loads(meta["tasks"]), json.loads(meta["stats"])
        if r == 0:
            optional = [k for k in OPTIONAL_PER_TASK if k in record]
            per_task.update({k: [None] * T for k in optional})
        for i, m in enumerate(logits):
            m[ids] = tensors[f"logits.{i:03d}"]
        for k in PER_TASK + tuple(optional):
            for t, v in zip(ids, record[k], strict=True):
                per_task[k][t] = v
        ranks.append({"rank": r, "tasks": len(ids), "images": record["images"], "seconds": record["seconds"],
                      "images_per_second": record["images"] / max(record["seconds"], 1e-9),
                      "wait_seconds": record["wait_seconds"], "sent_bytes": record["sent_bytes"],
                      "epoch_seconds": record["epoch_seconds"], "data_wait_s": record["data_wait_s"],
                      "step_s": record["step_s"]})
        bad_images += record["bad_images"]
        bad_files += record["bad_image_files"]
        pipeline = record["data_pipeline"]
    missing = [t for t in range(T) if per_task["loss"][t] is None]
    if missing:
        raise ValueError(f"the shards of epoch {bank.epoch} lack tasks {missing[:10]}")
    images, seconds = sum(r["images"] for r in ranks), max(r["seconds"] for r in ranks)
    entry = {"epoch": bank.epoch, "images_per_second": images / max(seconds, 1e-9),
             # The slowest rank's share of waiting for data sets the pace.
             "data_pipeline": pipeline, "data_wait_s": max(r["data_wait_s"] for r in ranks),
             "step_s": max(r["step_s"] for r in ranks), "bad_images": bad_images, "bad_image_files": bad_files,
             **per_task, "images": images, "seconds": seconds, "ranks": ranks}
    full = MaskBank(bank.model_id, bank.gate_points, bank.tasks, logits, bank.config, bank.epoch, bank.calibration)
    if bank.fidelity is not None:  # rank 0's record, its figures now every rank's
        full.fidelity = fidelity.complete_record(bank.fidelity, entry)
    return full, entry
