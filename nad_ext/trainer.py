"""The NAD training driver: learns every task's gates on a frozen network.

Two modes give the same gates (tested):
- ``paper``: the reference implementation's loop, one task per step, batches of 16 images
  of that task's classes;
- ``batched``: each step carries ``tasks_per_step`` tasks x 16 images, every sample routed
  through its own task's gates, every task's loss and normalised-gradient update computed as
  in paper mode.

Data order and augmentation of task t in epoch e come from a generator seeded by (seed, e, t),
and task t's initial gates from one seeded by (seed, t): the results depend neither on the
mode nor on how many tasks share a step, and a resumed run continues exactly where it stopped.
The run folder's epoch commits and repair are :mod:`nad_ext.rundir`'s; under torchrun the
tasks are shared out by :mod:`nad_ext.distributed`.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from nad_ext import data as nad_data
from nad_ext import distributed, faults
from nad_ext import pipeline as nad_pipeline
from nad_ext import progress as nad_progress
from nad_ext.calibration import DEFAULT_TARGET, CalibrationSettings, check_target
from nad_ext.gates import GatedModel, GatePoint, resolve_gate_points
from nad_ext.maskbank import MaskBank, Task
from nad_ext.negatives import add_negatives, task_class_matrix
from nad_ext.objective import nad_loss
from nad_ext.ops import _checks, normalized_gradient_step_
from nad_ext.rundir import BANK_FILE, LOG_FILE  # noqa: F401  (the run folder's file names)


@dataclass
class NADConfig:
    """Training settings; the defaults are the paper's (METHOD.md).

    ``beta`` None takes the model preset's value; ``"auto"`` calibrates it (see
    :func:`nad_ext.calibration.calibrate_beta`) for a mean open ratio near
    ``target_open_ratio``; ``image_size`` None takes the preset's input size (224 for the
    ImageNet networks). ``data_pipeline`` and ``on_bad_image``: see :mod:`nad_ext.pipeline`
    ("auto": the fast pipeline). ``negatives`` r > 0 and ``negative_weight`` gamma > 0 choose
    the selective objective (:mod:`nad_ext.objective`; not the paper's): each task batch of
    own-class images is joined by round(r x its size) images of other classes, whose prediction
    as the task is penalised with weight gamma. 0 and 0 (default) is the paper's.
    """

    beta: float | str | None = None
    target_open_ratio: float = DEFAULT_TARGET
    lr: float = 0.1
    batch_size: int = 16
    epochs: int = 21
    init_std: float = 1.0
    seed: int = 0
    image_size: int | None = None
    mode: str = "batched"
    tasks_per_step: int = 16
    device: str = "auto"
    keep_every_epoch: bool = True
    fuse: str = "auto"
    precision: str = "auto"
    cuda_graph: str = "auto"
    data_pipeline: str = "auto"
    on_bad_image: str = "skip"
    negatives: float = 0.0
    negative_weight: float = 0.0

    def validate(self) -> None:
        for name in ("beta", "lr", "init_std"):
            value = getattr(self, name)
            if name == "beta" and (value is None or value == "auto"):
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        for name in ("batch_size", "epochs", "tasks_per_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.image_size is not None and (not isinstance(self.image_size, int) or self.image_size < 8):
            raise ValueError(f"image_size must be an integer >= 8, got {self.image_size!r}")
        if self.mode not in ("batched", "paper"):
            raise ValueError(f"mode must be 'batched' or 'paper', got {self.mode!r}")
        for name in ("fuse", "cuda_graph"):
            if getattr(self, name) not in ("auto", "on", "off"):
                raise ValueError(f"{name} must be 'auto', 'on' or 'off', got {getattr(self, name)!r}")
        if self.data_pipeline not in nad_pipeline.PIPELINES:
            raise ValueError(f"data_pipeline must be one of {', '.join(nad_pipeline.PIPELINES)}, "
                             f"got {self.data_pipeline!r}")
        if self.on_bad_image not in nad_pipeline.BAD_IMAGE_POLICIES:
            raise ValueError(f"on_bad_image must be one of {', '.join(nad_pipeline.BAD_IMAGE_POLICIES)}, "
                             f"got {self.on_bad_image!r}")
        check_target(self.target_open_ratio)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("negatives", "negative_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if (self.negatives > 0) != (self.negative_weight > 0):
            raise ValueError(f"the selective objective needs both negatives > 0 and negative_weight > 0 "
                             f"(0 and 0: the paper's); got negatives={self.negatives!r}, "
                             f"negative_weight={self.negative_weight!r}")

    def execution(self, device: torch.device) -> tuple[bool, torch.dtype, bool]:
        """(fuse, dtype, CUDA graph) of the step on ``device``, with "auto" resolved."""
        cuda = device.type == "cuda"
        fuse = self.fuse == "on" or (self.fuse == "auto" and cuda)
        precision = self.precision
        if precision == "auto":
            precision = "bfloat16" if fuse and cuda else "float32"
        if self.cuda_graph == "on" and not cuda:
            raise ValueError(f"cuda_graph='on' needs a CUDA device; the device is {device}")
        graph = self.cuda_graph == "on" or (self.cuda_graph == "auto" and cuda and fuse)
        return fuse, PRECISIONS[precision], graph


PRECISIONS = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}
# Settings that change how a run executes but not its result; a run may resume with others.
# (target_open_ratio only matters before training, when it chooses beta.)
EXECUTION_SETTINGS = ("epochs", "device", "mode", "tasks_per_step", "keep_every_epoch", "fuse", "precision",
                      "cuda_graph", "data_pipeline", "on_bad_image", "target_open_ratio")


def resolve_device(name: str) -> torch.device:
    """The device of this process: ``name``, "auto" resolved; under torchrun, cuda:LOCAL_RANK."""
    return distributed.setup(name).device


def default_tasks(images: nad_data.ImageSet) -> list[Task]:
    """One task per class, named after the class."""
    return [Task(name, (c,)) for c, name in enumerate(images.classes)]


def _task_indices(images: nad_data.ImageSet, tasks: Sequence[Task]) -> list[list[int]]:
    out = []
    for task in tasks:
        bad = [c for c in task.classes if not 0 <= c < len(images.classes)]
        if bad:
            raise ValueError(f"task {task.name!r} names classes {bad} that {images.name} does not have")
        idx = sorted(i for c in task.classes for i in images.indices_of_class(c))
        if not idx:
            raise ValueError(f"task {task.name!r} has no training images in {images.name}")
        out.append(idx)
    return out


def _epoch_generator(seed: int, epoch: int, task: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_033 + task)


def _prefetched_steps(streams, group: int, loader: nad_pipeline.BatchLoader):
    """Yields ``(first task of a new group or None, active tasks, their batch)`` per step, the
    next steps' batches made by ``loader`` in the background while the current step runs.

    The loader takes each task's batches in order, augmented from the task's generator, so the
    generator gives the same images and augmentations as a sequential loop would.
    """
    plan = []
    for first in range(0, len(streams), group):
        members = range(first, min(first + group, len(streams)))
        for j in range(max(len(streams[t].batches) for t in members)):
            plan.append((first if j == 0 else None, [t for t in members if j < len(streams[t].batches)], j))
    requests = ([(streams[t].batches[j], streams[t].generator) for t in active] for _, active, j in plan)
    for (first, active, _), batch in zip(plan, loader.prefetch(requests)):
        yield first, active, batch


class _TaskStream:
    """Task t's batches in one epoch: a seeded permutation, then (selective objective) each
    batch's negatives, drawn from the same generator; the loader augments them from it too."""

    def __init__(self, indices, batch_size, generator, num_images=0, negatives=0.0):
        order = torch.randperm(len(indices), generator=generator).tolist()
        self.batches = [[indices[i] for i in order[j : j + batch_size]] for j in range(0, len(order), batch_size)]
        if negatives:  # own images first, then the other classes' images
            self.batches = add_negatives(self.batches, indices, num_images, negatives, generator)
        self.generator = generator


def build_gated_model(
    model: nn.Module,
    gate_points: Sequence[str | GatePoint] | str,
    num_tasks: int,
    image_size: int,
    *,
    model_id: str,
    units: str = "channels",
    channel_axis: int | dict[str, int] | None = None,
    seed: int = 0,
    init_std: float = 1.0,
    device: torch.device | str = "cpu",
    fuse: bool = False,
    dtype: torch.dtype = torch.float32,
) -> GatedModel:
    """Wraps ``model`` with gates at ``gate_points``: gate-point specs (module names, with
    ``:axis`` / ``:heads`` suffixes, or a mask bank's ``GatePoint`` list), ``"auto"``, or the
    name of a model preset (see ``nad_ext.models.MODELS``; ``units`` picks its "channels",
    "mlp" or "heads" preset). ``channel_axis`` overrides probed channel axes. ``fuse`` and a
    low-precision ``dtype`` give the fast path (see :class:`GatedModel`; reduced precision runs
    channels_last)."""
    model = model.to(device)
    example = torch.zeros(1, 3, image_size, image_size, device=device)
    gate_points = resolve_gate_points(model, gate_points, example, units)
    low_precision = dtype != torch.float32
    return GatedModel(model, gate_points, num_tasks, example, channel_axis=channel_axis, seed=seed,
                      init_std=init_std, model_id=model_id, fuse=fuse, dtype=dtype if low_precision else None,
                      channels_last=low_precision)


def disentangle(
    model: nn.Module,
    train: nad_data.ImageSet,
    gate_points: Sequence[str | GatePoint] | str,
    *,
    model_id: str,
    tasks: Sequence[Task] | None = None,
    config: NADConfig | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    units: str = "channels",
    channel_axis: int | dict[str, int] | None = None,
    beta: float | str | None = None,
    target_open_ratio: float | None = None,
    calibration: CalibrationSettings | None = None,
) -> MaskBank:
    """Learns the gates of every task on the frozen ``model``; returns the mask bank.

    Args:
        model: the pretrained network (its weights are not changed).
        train: the training images.
        gate_points: gate-point specs (module names, ``"name:axis"``, ``"name:heads"``),
            "auto", or a preset name (e.g. "vgg16"; ``units`` picks its "channels", "mlp" or
            "heads" preset).
        model_id: the network's identifier, stored in the bank (a preset name when it is one;
            its beta and input size are then the defaults).
        tasks: default one per class.
        config: :class:`NADConfig`, default the paper's settings.
        out_dir: the run folder (:mod:`nad_ext.rundir`): ``masks.safetensors`` committed after
            every epoch, per-epoch copies and ``log.json`` (loss curves). None keeps everything in
            memory. Locked while the run writes it.
        resume: continue the run in ``out_dir`` from its last committed epoch (a folder without
            a bank starts a new run, with a note; ``"strict"`` refuses to).
        overwrite: replace an existing run in ``out_dir`` instead of refusing to.
        progress: show a tqdm bar per epoch (rank 0 only under torchrun).
        channel_axis: overrides probed channel axes (see :class:`GatedModel`).
        beta, target_open_ratio: shorthands for the config's fields. ``beta="auto"`` first
            runs :func:`nad_ext.calibration.calibrate_beta` (with ``calibration``'s settings);
            the bank then holds the beta found and how (``bank.calibration``). A resumed run
            keeps its bank's beta.

    Under torchrun the tasks are shared out among the processes (:mod:`nad_ext.distributed`);
    every process returns the same bank, bit-identical to a single-process run's.
    """
    config, tasks, indices = _settings(train, model_id, tasks, config, beta, target_open_ratio)
    ctx = distributed.setup(config.device)
    progress = progress and ctx.rank == 0
    run = distributed.open_run(ctx, out_dir, resume=resume, overwrite=overwrite,
                               keep_every_epoch=config.keep_every_epoch)
    net = _Network(model, gate_points, model_id, units, channel_axis)
    try:
        found = None  # how beta was calibrated
        if config.beta == "auto":
            config.beta, found = _auto_beta(ctx, run, net, train, tasks, config, calibration, progress)
        with nad_pipeline.make_loader(train, config.image_size, ctx.device, config.data_pipeline,
                                      config.on_bad_image) as loader:
            return _disentangle(net, tasks, indices, config, ctx, run, loader, progress, found, len(train),
                                len(train.classes))
    finally:
        distributed.close_run(ctx, run)


def train_in_memory(
    model: nn.Module,
    train: nad_data.ImageSet,
    gate_points: Sequence[str | GatePoint] | str,
    *,
    model_id: str,
    tasks: Sequence[Task] | None = None,
    config: NADConfig | None = None,
    units: str = "channels",
    channel_axis: int | dict[str, int] | None = None,
) -> MaskBank:
    """:func:`disentangle` in this process alone, nothing written, no progress: the short runs
    of beta calibration. Under torchrun too it runs here only (on this rank's device), so that
    every rank can run it at once. ``config.beta`` must be a number."""
    config, tasks, indices = _settings(train, model_id, tasks, config, None, None)
    if config.beta == "auto":
        raise ValueError("train_in_memory needs a numeric beta, not 'auto'")
    ctx = distributed.Context(device=resolve_device(config.device))  # a world of one: this process
    run = distributed.open_run(ctx, None)
    net = _Network(model, gate_points, model_id, units, channel_axis)
    with nad_pipeline.make_loader(train, config.image_size, ctx.device, config.data_pipeline,
                                  config.on_bad_image) as loader:
        return _disentangle(net, tasks, indices, config, ctx, run, loader, False, None, len(train), len(train.classes))


@dataclass
class _Network:
    """What is gated: the network, its gate points and how to read them."""

    model: nn.Module
    gate_points: Sequence[str | GatePoint] | str
    model_id: str
    units: str = "channels"
    channel_axis: int | dict[str, int] | None = None


def _settings(train, model_id, tasks, config, beta, target_open_ratio):
    """The run's config (preset defaults filled in, validated), tasks and their image indices."""
    from nad_ext import models

    config = NADConfig(**asdict(config)) if config is not None else NADConfig()
    if beta is not None:
        config.beta = beta
    if target_open_ratio is not None:
        config.target_open_ratio = target_open_ratio
    spec = models.MODELS.get(model_id)
    if config.beta is None:
        if spec is None:
            raise ValueError(f"beta must be given for model {model_id!r}, which has no preset: pass a number, "
                             "or beta='auto' to calibrate it")
        if spec.beta is None:
            raise ValueError(f"model {model_id!r} has no tuned beta (the paper did not disentangle it): pass "
                             "beta=<number> (--beta), or beta='auto' (--beta auto) to calibrate it")
        config.beta = spec.beta
    if config.image_size is None:
        config.image_size = spec.input_size if spec is not None else 224
    config.validate()
    tasks = list(tasks) if tasks is not None else default_tasks(train)
    if not tasks:
        raise ValueError("tasks is empty")
    indices = _task_indices(train, tasks)
    if config.negatives:
        for task, idx in zip(tasks, indices):
            if len(idx) == len(train):
                raise ValueError(f"task {task.name!r} covers every class of {train.name}: the selective "
                                 f"objective (negatives > 0) needs other classes' images as its negatives")
    return config, tasks, indices


def _auto_beta(ctx, run, net: _Network, train, tasks, config, settings, progress) -> tuple[float, dict | None]:
    """beta="auto": a resumed run keeps its bank's beta; a new one calibrates it. Under torchrun
    every rank calibrates (the same short runs, at once) and all take rank 0's result."""
    if run.bank is not None:
        beta = run.bank.config.get("beta")
        if not isinstance(beta, (int, float)) or isinstance(beta, bool):
            raise ValueError(f"{run.file(BANK_FILE)} holds no numeric beta to resume with ({beta!r})")
        return float(beta), run.bank.calibration
    from nad_ext.calibration import calibrate_beta  # it drives train_in_memory (this module)

    found, error = None, None
    try:
        found = calibrate_beta(net.model, train, net.gate_points, model_id=net.model_id, tasks=tasks, config=config,
                               settings=settings, units=net.units, channel_axis=net.channel_axis, progress=progress)
    except Exception as err:  # noqa: BLE001 - shared with the other ranks, then re-raised
        error = err
    ctx.agree(error, "calibrating beta")
    found = ctx.broadcast(found)
    return found["beta"], found


def _disentangle(net: _Network, tasks, indices, config, ctx, run, loader, progress, found, num_images,
                 num_classes) -> MaskBank:
    device = ctx.device
    task_classes = task_class_matrix([t.classes for t in tasks], num_classes, device) if config.negatives else None
    fuse, dtype, graph = config.execution(device)
    gated = build_gated_model(
        net.model, net.gate_points, len(tasks), config.image_size, model_id=net.model_id, units=net.units,
        channel_axis=net.channel_axis, seed=config.seed, init_std=config.init_std, device=device, fuse=fuse,
        dtype=dtype,
    )
    if progress:
        path = ", ".join((["fused"] if fuse else []) + [str(dtype).replace("torch.", "")]
                         + (["CUDA graphs"] if graph else []))
        units_text = "channels" if all(p.units == "channels" for p in gated.gate_points) else "gates"
        print(f"{net.model_id}: {len(gated.gate_points)} gate points, {sum(gated.layer_sizes)} {units_text}, "
              f"{len(tasks)} tasks ({config.mode} mode) on {device} ({path}; {loader.kind} data pipeline)")
        for i, point in enumerate(gated.gate_points):
            where = "  (in masked_conv2d)" if i in gated.fused_points else ""
            kind = "" if point.units == "channels" and point.channel_axis == 1 else \
                f"  ({point.units} on axis {point.channel_axis})"
            print(f"  {point.name:36s} {point.channels:5d}{kind}{where}")
    config_record = asdict(config)
    start_epoch = 0
    if run.bank is not None:
        bank, where = run.bank, run.file(BANK_FILE)
        bank.apply_to(gated)
        if [t.name for t in bank.tasks] != [t.name for t in tasks]:
            raise ValueError(f"{where} was trained for other tasks; cannot resume it")
        older = asdict(NADConfig())  # a bank from before a setting existed was made with its default
        changed = {k: (bank.config.get(k, older[k]), v) for k, v in config_record.items()
                   if k not in EXECUTION_SETTINGS and bank.config.get(k, older[k]) != v}
        if changed:
            raise ValueError(f"{where} was trained with other settings {changed}; cannot resume it")
        start_epoch = bank.epoch
        found = found or bank.calibration  # a calibrated run resumed with its beta given

    step = lambda *batch: train_step(gated, *batch, config, task_classes)  # noqa: E731
    if graph:
        from nad_ext.step_graph import GraphedSteps

        step = GraphedSteps(gated, lambda g, *batch: train_step(g, *batch, config, task_classes))
    group = 1 if config.mode == "paper" else config.tasks_per_step
    mine = ctx.my_tasks([len(i) for i in indices], group)  # every task, unless under torchrun
    for epoch in range(start_epoch, config.epochs):
        streams = [_TaskStream(indices[t], config.batch_size, _epoch_generator(config.seed, epoch, t), num_images,
                               config.negatives) for t in mine]
        stats = _train_epoch(step, streams, mine, len(tasks), loader, config, group, epoch, progress, device)
        bank = MaskBank.from_gated(gated, tasks, config_record, epoch + 1, found)
        distributed.commit_epoch(ctx, run, bank, stats, mine, config.keep_every_epoch)
    return distributed.finish(ctx, run) or MaskBank.from_gated(gated, tasks, config_record, start_epoch, found)


def _train_epoch(step, streams, task_of, num_tasks, loader, config: NADConfig, group: int, epoch: int,
                 progress: bool, device):
    """One epoch over the batches of tasks ``task_of`` (``streams[i]`` is task ``task_of[i]``'s;
    ``step(x, labels, task_ids, tasks)`` per batch); returns the epoch's per-task mean loss terms
    (lists over all ``num_tasks`` tasks; zeros for tasks not in ``task_of``), where the time went
    (waiting for data or in the step) and the images skipped as unreadable.

    The running sums stay on the device; the progress bar reads them about once a second, so
    that steps are not serialised by device syncs.
    """
    keys = ("ce", "mse", "sparse", "loss") + (("negative",) if config.negatives else ())
    sums = {k: torch.zeros(num_tasks, device=device) for k in keys}
    steps = torch.zeros(num_tasks, device=device)
    skipped = torch.zeros(num_tasks, device=device)
    total_batches = sum(len(s.batches) for s in streams)
    bar = nad_progress.bar(total_batches, f"epoch {epoch + 1}/{config.epochs}", unit="batch", enabled=progress)
    images_seen, start, tasks_done, shown, wait0 = 0, time.perf_counter(), 0, 0.0, loader.wait_s
    for k, (first, active, batch) in enumerate(_prefetched_steps(streams, group, loader)):
        faults.step_event(epoch + 1, k + 1)
        if first is not None:
            tasks_done = first
        active = [task_of[i] for i in active]
        x, labels = batch.x, batch.labels
        task_ids = torch.repeat_interleave(torch.tensor(active), torch.tensor(batch.counts))
        if not len(labels):  # every image of this step was unreadable and skipped
            bar.update(len(active))
            continue
        terms = step(x, labels, task_ids, torch.tensor(active))
        for k in sums:
            sums[k] += torch.where(terms.counted, getattr(terms, k).detach(), 0.0)
        steps += terms.counted
        present = torch.zeros(num_tasks, dtype=torch.bool)
        present[active] = True
        skipped += present.to(device, non_blocking=True) & ~terms.counted
        images_seen += len(labels)
        bar.update(len(active))
        elapsed = max(time.perf_counter() - start, 1e-9)
        if progress and elapsed - shown >= 1.0:
            shown = elapsed
            n = steps.clamp(min=1)
            bar.set_postfix(tasks=f"{tasks_done}/{len(task_of)}", img_s=f"{images_seen / elapsed:.0f}",
                            data_wait=f"{(loader.wait_s - wait0) / elapsed:.0%}",
                            ce=f"{(sums['ce'] / n).mean():.3f}", mse=f"{(sums['mse'] / n).mean():.3f}",
                            sparse=f"{(sums['sparse'] / n).mean():.3f}")
    n = steps.clamp(min=1)
    means = {k: (v / n).tolist() for k, v in sums.items()}  # waits for the device's last step
    seconds, wait = max(time.perf_counter() - start, 1e-9), loader.wait_s - wait0
    bar.set_postfix(tasks=f"{len(task_of)}/{len(task_of)}", img_s=f"{images_seen / seconds:.0f}",
                    data_wait=f"{wait / seconds:.0%}",
                    **{k: f"{sum(means[k][t] for t in task_of) / max(len(task_of), 1):.3f}"
                       for k in ("ce", "mse", "sparse", "negative") if k in means})
    bar.close()  # off a terminal: the epoch's one line
    bad_images, bad_files = loader.bad.take()
    if bad_images and progress:
        print(f"epoch {epoch + 1}: skipped {bad_images} unreadable images (listed in log.json)")
    return {
        "epoch": epoch + 1,
        "images_per_second": images_seen / seconds,
        "skipped_batches": skipped.tolist(),
        # Where the time went: waiting for the loader, and everything else (the steps).
        "data_pipeline": loader.kind,
        "data_wait_s": wait,
        "step_s": seconds - wait,
        "bad_images": bad_images,
        "bad_image_files": bad_files,
        **means,
        "images": images_seen,
        "seconds": seconds,
    }


def train_step(gated: GatedModel, x, labels, task_ids, tasks, config: NADConfig, task_classes=None):
    """One NAD step: original forward, masked forward, backward to the gates, update.

    ``task_classes`` ((T, classes) bool, on the device) is needed by the selective objective
    (``config.negatives`` > 0): a sample whose label is none of its task's classes is a negative.

    ``task_ids`` are checked once by ``gated`` (on the CPU, without a device sync); ``tasks``
    lists the tasks present. The step never waits for the device: tasks without a correctly
    classified sample get exact zero gradients, which the normalised step leaves unchanged. So
    it can also be captured in a CUDA graph (:mod:`nad_ext.step_graph`).
    """
    with torch.no_grad():
        out, original_acts = gated.original(x)
        correct = out.argmax(dim=1) == labels
    masked_out, masked_acts = gated(x, task_ids, record=True)
    logits = list(gated.logits)
    with _checks.ids_checked():
        task_ids = task_ids.to(x.device, non_blocking=True)
        selective = {}
        if config.negatives:
            selective = dict(negative=~task_classes[task_ids, labels], task_classes=task_classes,
                             negative_weight=config.negative_weight)
        terms = nad_loss(masked_out, labels, masked_acts, original_acts, correct, task_ids, logits, config.beta,
                         [p.channel_axis for p in gated.gate_points], **selective)
        grads = torch.autograd.grad(terms.total, logits)
        normalized_gradient_step_(logits, grads, tasks.to(x.device, non_blocking=True), config.lr)
    return terms
