"""This process's place in a run across many processes (torch.distributed, launched by
torchrun): rank, world size and device, the collectives the run needs, and how work is dealt.
It knows nothing about NAD: the run folder across ranks is :mod:`nad_ext.training.commit`'s.

Under torchrun (RANK, WORLD_SIZE and LOCAL_RANK set) :func:`setup` joins the process group:
NCCL when the processes use CUDA (each takes ``cuda:LOCAL_RANK``), gloo on the CPU (the processes
share the CPU; torchrun gives each one thread unless OMP_NUM_THREADS says otherwise). Every
collective has the group's timeout, so a rank that hangs stops the run instead of blocking it;
a rank that fails tells the others (:meth:`Context.agree`), and every rank stops with its error.
Without torchrun the context is a world of one process and nothing here communicates.

Work is dealt in two ways. Training (:meth:`Context.my_tasks`): the items (tasks) are cut into
groups of consecutive items, exactly as one process would run them, and the groups are dealt to
the ranks by weight (training images), largest first, each to the least loaded rank
(:func:`shard_groups`). Analyses (:meth:`Context.map_units`): units of work (the batches a
single process would run) are dealt round-robin and every result comes back, in order, on every
rank, so the results equal a single-process run's.

May import: nothing of nad_ext. Importing it does not load torch (each function loads what
it uses), so the command line can use it before a verb has loaded torch.
"""
from __future__ import annotations

import os
import pickle
import time
from dataclasses import dataclass, field
from datetime import timedelta

DEFAULT_TIMEOUT_S = 1800


class PeerError(RuntimeError):
    """Another rank failed; the message names it and its error."""


@dataclass
class Context:
    """This process's place in the run: rank, world size and device; counters of what it
    exchanged (``wait_seconds`` in collectives, ``sent_bytes`` of pickled objects)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: _device("cpu", 0, False))
    distributed: bool = False
    wait_seconds: float = 0.0
    sent_bytes: int = 0

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
    import torch

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
    import torch
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


def resolve_device(name: str = "auto") -> torch.device:
    """The device of this process: ``name``, "auto" resolved; under torchrun, cuda:LOCAL_RANK."""
    return setup(name).device


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
