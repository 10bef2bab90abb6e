"""One run across many processes with torch.distributed, launched by torchrun.

Under torchrun (RANK, WORLD_SIZE and LOCAL_RANK set) :func:`setup` joins the process group:
NCCL when the processes use CUDA (each takes ``cuda:LOCAL_RANK``), gloo on the CPU (the processes
share the CPU; torchrun gives each one thread unless OMP_NUM_THREADS says otherwise). Every
collective has the group's timeout, so a rank that hangs stops the run instead of blocking it;
a rank that fails tells the others (:meth:`Context.agree`), and every rank stops with its error.
Without torchrun the context is a world of one process and nothing here communicates.

Training (``trainer.disentangle``): the tasks are cut into the steps' groups of
``tasks_per_step`` consecutive tasks, exactly as one process would run them, and the groups are
dealt to the ranks by their number of training images, largest first, each to the least loaded
rank (:func:`shard_groups`). A rank runs the same steps as a single process would for those
tasks, and a task's gates depend only on (seed, task): the assembled bank is bit-identical to a
single-process run. After every epoch each rank writes its shard (its tasks' logits and loss
terms) atomically to ``<out>/shards/``; rank 0 checks and assembles them and commits the epoch
with :class:`~nad_ext.rundir.RunDir` in a thread, while every rank (rank 0 too) goes on with the
next epoch (a failed commit stops every rank at the next epoch's end). The run folder must be on a file system every
rank sees; that is checked at the start. A restarted run (``torchrun --max-restarts``, or
``--resume`` later with any number of processes) continues from the last committed epoch.

Analyses (``analysis.run_all(map_units=...)``): :meth:`Context.map_units` deals the units of work
(the batches a single process would run) to the ranks and returns every result, in order, on
every rank, so the results equal a single-process run's.
"""
from __future__ import annotations

import json
import os
import pickle
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch

from nad_ext.maskbank import MaskBank
from nad_ext.rundir import SHARD_DIR, RunDir
from nad_ext.storage import load_safetensors, save_safetensors

DEFAULT_TIMEOUT_S = 1800
SHARD_FORMAT = "nad-ext.shard/1"
PER_TASK = ("skipped_batches", "ce", "mse", "sparse", "loss")  # the log's per-task lists
OPTIONAL_PER_TASK = ("negative",)  # the selective objective's term, in its runs' logs only


class PeerError(RuntimeError):
    """Another rank failed; the message names it and its error."""


@dataclass
class Context:
    """This process's place in the run: rank, world size and device; counters of what it
    exchanged (``wait_seconds`` in collectives, ``sent_bytes`` of pickled objects)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    distributed: bool = False
    wait_seconds: float = 0.0
    sent_bytes: int = 0
    pending: BaseException | None = None  # rank 0: a failed commit, reported at the next agree()
    committer: threading.Thread | None = None  # rank 0: the commit of the last epoch, running
    epoch_start: float = field(default_factory=time.perf_counter)  # when this rank's epoch began

    # --- collectives --------------------------------------------------------------------------
    def _collective(self, fn, obj):
        start = time.perf_counter()
        self.sent_bytes += len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
        try:
            return fn(obj)
        finally:
            self.wait_seconds += time.perf_counter() - start

    def gather_all(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        def run(o):
            out = [None] * self.world_size
            dist.all_gather_object(out, o)
            return out
        return self._collective(run, obj)

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        def run(o):
            box = [o]
            dist.broadcast_object_list(box, src=0)
            return box[0]
        return self._collective(run, obj if self.rank == 0 else None)

    def agree(self, error: BaseException | None, doing: str = "") -> None:
        """Raises on every rank when any rank had an error: its own error on that rank, a
        :class:`PeerError` naming the first failed rank on the others."""
        if not self.distributed:
            if error is not None:
                raise error
            return
        reports = self.gather_all(None if error is None else f"{type(error).__name__}: {error}")
        failed = [(r, msg) for r, msg in enumerate(reports) if msg is not None]
        if error is not None:
            raise error
        if failed:
            rank, msg = failed[0]
            raise PeerError(f"rank {rank} failed{' ' + doing if doing else ''}: {msg}")

    # --- work sharing -------------------------------------------------------------------------
    def my_tasks(self, task_images: list[int], group: int) -> list[int]:
        """This rank's tasks, in order: whole step groups of ``group`` consecutive tasks, dealt by
        :func:`shard_groups` on their training images (``task_images[t]`` for task t)."""
        starts = range(0, len(task_images), group)
        groups = [list(range(s, min(s + group, len(task_images)))) for s in starts]
        owned = shard_groups([sum(task_images[t] for t in g) for g in groups], self.world_size)[self.rank]
        return [t for g in owned for t in groups[g]]

    def map_units(self, fn, n: int) -> list:
        """``[fn(0), ..., fn(n - 1)]`` on every rank, each rank computing units rank, rank +
        world_size, ... An error in any unit stops every rank (see :meth:`agree`)."""
        if not self.distributed:
            return [fn(u) for u in range(n)]
        mine, error = {}, None
        try:
            for u in range(self.rank, n, self.world_size):
                mine[u] = fn(u)
        except Exception as err:  # noqa: BLE001 - shared with the other ranks, then re-raised
            error = err
        parts = self.gather_all((None if error is None else f"{type(error).__name__}: {error}", mine))
        failed = [(r, p[0]) for r, p in enumerate(parts) if p[0] is not None]
        if error is not None:
            raise error
        if failed:
            raise PeerError(f"rank {failed[0][0]} failed: {failed[0][1]}")
        merged = {u: v for _, part in parts for u, v in part.items()}
        return [merged[u] for u in range(n)]


def shard_groups(weights: list[int], world_size: int) -> list[list[int]]:
    """Deals items of the given weights to ``world_size`` ranks: largest first (ties: lower
    index), each to the least loaded rank (ties: lower rank). Returns each rank's items, in
    ascending order. Deterministic; the largest load is at most 4/3 of the optimum."""
    loads, owned = [0] * world_size, [[] for _ in range(world_size)]
    for item in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owned[rank].append(item)
        loads[rank] += weights[item]
    return [sorted(o) for o in owned]


_context: Context | None = None


def _device(name: str, local_rank: int, distributed: bool) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and distributed:
        if device.index is not None:
            raise ValueError(f"device {name!r}: under torchrun each process takes cuda:LOCAL_RANK; "
                             "pass --device cuda (or auto)")
        device = torch.device("cuda", local_rank)
    return device


def setup(device: str = "auto", timeout_s: float | None = None) -> Context:
    """This process's :class:`Context`; under torchrun, joins the process group (once).

    ``device``: "auto", "cpu", "cuda" (under torchrun: cuda:LOCAL_RANK), or "cuda:N" outside
    torchrun. ``timeout_s``: the collectives' timeout (default :data:`DEFAULT_TIMEOUT_S`).
    """
    global _context
    env = os.environ
    if not all(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return Context(device=_device(device, 0, False))
    if _context is not None:
        if _device(device, _context.local_rank, True) != _context.device:
            raise ValueError(f"this process already runs on {_context.device}, not {device!r}")
        return _context
    import torch.distributed as dist

    rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    dev = _device(device, local, True)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s or DEFAULT_TIMEOUT_S)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timeout,
                                device_id=dev if dev.type == "cuda" else None, **_attempt_store(rank, world, timeout))
    _context = Context(rank, world, local, dev, distributed=True)
    return _context


def _attempt_store(rank: int, world: int, timeout: timedelta) -> dict:
    """Under torchrun, the store of this restart attempt: torchrun (2.14) keeps its store across
    ``--max-restarts`` restarts, so without a prefix per attempt the restarted processes read
    the killed ones' addresses and fail to connect (gloo: "connectFullMesh failed")."""
    import torch.distributed as dist

    env = os.environ
    if "TORCHELASTIC_RESTART_COUNT" not in env:
        return {}  # env:// as usual
    host, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
    if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # the agent serves it
        base = dist.TCPStore(host, port, world, is_master=False, timeout=timeout)
    else:
        base = dist.TCPStore(host, port, world, is_master=rank == 0, timeout=timeout, multi_tenant=True)
    prefix = f"nad_ext/{env.get('TORCHELASTIC_RUN_ID', '')}/attempt_{env['TORCHELASTIC_RESTART_COUNT']}"
    return {"store": dist.PrefixStore(prefix, base), "rank": rank, "world_size": world}


def shutdown() -> None:
    """Leaves the process group, if :func:`setup` joined one."""
    global _context
    if _context is not None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        _context = None


def record_error(error: BaseException) -> None:
    """Under torchrun, writes ``error`` where the agent reports each rank's failure."""
    if "TORCHELASTIC_ERROR_FILE" in os.environ:
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(error)


# ----------------------------------------------------------------------------------------------
# The run folder, shared


def open_run(ctx: Context, out_dir, **kwargs) -> RunDir:
    """:meth:`RunDir.open` on rank 0; the other ranks get its committed state, after checking that
    they see the same folder (``kwargs``: resume, overwrite, keep_every_epoch)."""
    if not ctx.distributed:
        return RunDir.open(out_dir, **kwargs)
    if out_dir is None:
        raise ValueError("a distributed run needs out_dir (--out), a folder every rank sees")
    run, error = None, None
    ctx.epoch_start = time.perf_counter()
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
    return run


def commit_epoch(ctx: Context, run: RunDir, bank: MaskBank, stats: dict, tasks: list[int],
                 keep_every_epoch: bool) -> None:
    """Commits the epoch of ``bank`` (``stats``: the epoch's log entry from this process's
    ``tasks``). Distributed: every rank writes its shard; rank 0 assembles and commits."""
    if not ctx.distributed:
        run.commit(bank, stats, keep_every_epoch)
        return
    _join_commit(ctx)
    error, ctx.pending = ctx.pending, None
    shard = run.shard_path(bank.epoch, ctx.rank)
    if error is None:
        try:
            record = {k: [stats[k][t] for t in tasks] for k in PER_TASK + OPTIONAL_PER_TASK if k in stats}
            # Since the last shard: the collectives, and the epoch's wall time (with rank 0's commit).
            record.update(images=stats["images"], seconds=stats["seconds"], wait_seconds=ctx.wait_seconds,
                          data_pipeline=stats.get("data_pipeline"), data_wait_s=stats.get("data_wait_s", 0.0),
                          step_s=stats.get("step_s", 0.0), bad_images=stats.get("bad_images", 0),
                          bad_image_files=stats.get("bad_image_files", []),
                          sent_bytes=ctx.sent_bytes, epoch_seconds=time.perf_counter() - ctx.epoch_start)
            ctx.wait_seconds, ctx.sent_bytes = 0.0, 0
            save_safetensors({f"logits.{i:03d}": m[tasks] for i, m in enumerate(bank.logits)}, shard, {
                "format": SHARD_FORMAT, "epoch": str(bank.epoch), "rank": str(ctx.rank),
                "world_size": str(ctx.world_size), "tasks": json.dumps(tasks), "stats": json.dumps(record)})
        except Exception as err:  # noqa: BLE001 - shared with the other ranks, then re-raised
            error = err
    ctx.agree(error, f"in epoch {bank.epoch}")  # every shard of the epoch is in place
    if ctx.rank == 0:  # assembles and commits while this rank, too, goes on with the next epoch
        ctx.committer = threading.Thread(target=_commit, args=(ctx, run, bank, keep_every_epoch), name="nad-commit")
        ctx.committer.start()
    ctx.epoch_start = time.perf_counter()


def _commit(ctx: Context, run: RunDir, bank: MaskBank, keep_every_epoch: bool) -> None:
    try:
        full, entry = _assemble(ctx, run, bank)
        run.commit(full, entry, keep_every_epoch)
        for r in range(ctx.world_size):
            run.shard_path(bank.epoch, r).unlink(missing_ok=True)
    except Exception as err:  # noqa: BLE001 - reported to every rank at the next agree()
        ctx.pending = err


def _join_commit(ctx: Context) -> None:
    if ctx.committer is not None:
        ctx.committer.join()
        ctx.committer = None


def _assemble(ctx: Context, run: RunDir, bank: MaskBank) -> tuple[MaskBank, dict]:
    """The full bank and log entry of ``bank.epoch`` from every rank's shard (rank 0)."""
    logits = [m.clone() for m in bank.logits]
    T = len(bank.tasks)
    per_task = {k: [None] * T for k in PER_TASK}
    optional = []  # per-task lists that this run logs beyond PER_TASK (from rank 0's shard)
    ranks, bad_images, bad_files, pipeline = [], 0, [], None
    for r in range(ctx.world_size):
        path = run.shard_path(bank.epoch, r)
        tensors, meta, _ = load_safetensors(path, f"shard of rank {r}")
        expected = {"format": SHARD_FORMAT, "epoch": str(bank.epoch), "rank": str(r), "world_size": str(ctx.world_size)}
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
    return MaskBank(bank.model_id, bank.gate_points, bank.tasks, logits, bank.config, bank.epoch,
                     bank.calibration), entry


def close_run(ctx: Context, run: RunDir) -> None:
    """Waits for a running commit, then releases the run folder (also when the run failed)."""
    _join_commit(ctx)
    run.close()


def finish(ctx: Context, run: RunDir) -> MaskBank | None:
    """Waits for the last commit; returns the committed bank (None when nothing was committed)."""
    if ctx.distributed:
        _join_commit(ctx)
        error, ctx.pending = ctx.pending, None
        ctx.agree(error, "committing the last epoch")
        if ctx.rank == 0 and run.path is not None:
            try:
                run.file(SHARD_DIR).rmdir()  # empty now; a folder like a single process's
            except OSError:
                pass
        if ctx.rank != 0 and run.path is not None and run.file("masks.safetensors").exists():
            return MaskBank.load(run.file("masks.safetensors"))
    return run.bank
