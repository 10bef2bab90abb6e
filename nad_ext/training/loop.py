"""The training loop: one step, one epoch, all epochs of a run.

Two modes give the same gates (tested):
- ``paper``: the reference implementation's loop, one task per step, batches of 16 images
  of that task's classes;
- ``batched``: each step carries ``tasks_per_step`` tasks x 16 images, every sample routed
  through its own task's gates, every task's loss and normalised-gradient update computed as
  in paper mode.

Data order and augmentation of task t in epoch e come from a generator seeded by (seed, e, t),
and task t's initial gates from one seeded by (seed, t): the results depend neither on the
mode nor on how many tasks share a step, and a resumed run continues exactly where it stopped.
:func:`run_epochs` trains from the run folder's committed epoch to the config's last, committing
each epoch (:mod:`nad_ext.training.commit`); :func:`train_in_memory` is a run of this process
alone with nothing written (beta calibration's short runs).
"""
from __future__ import annotations

import time
from dataclasses import asdict
from typing import Sequence

import torch

from nad_ext import distributed
from nad_ext._utils import faults
from nad_ext._utils import progress as nad_progress
from nad_ext.data import ImageSet
from nad_ext.data import pipeline as nad_pipeline
from nad_ext.gates.maskbank import MaskBank, Task
from nad_ext.gates.model import GatedModel
from nad_ext.ops import checks, normalized_gradient_step_
from nad_ext.training.build import Network
from nad_ext.training.commit import SharedRun
from nad_ext.training.config import EXECUTION_SETTINGS, NADConfig, gate_temperature, resolve_run
from nad_ext.training.fidelity import FidelityCheck
from nad_ext.training.negatives import add_negatives, task_class_matrix
from nad_ext.training.nonfinite import NonFiniteTally, guard_step
from nad_ext.training.objective import nad_loss
from nad_ext.training.rundir import BANK_FILE


def train_step(gated: GatedModel, x, labels, task_ids, tasks, config: NADConfig, task_classes=None):
    """One NAD step: original forward, masked forward, backward to the gates, update.

    ``task_classes`` ((T, classes) bool, on the device) is needed by the selective objective
    (``config.negatives`` > 0): a sample whose label is none of its task's classes is a negative.

    ``task_ids`` are checked once by ``gated`` (on the CPU, without a device sync); ``tasks``
    lists the tasks present. The step never waits for the device: tasks without a correctly
    classified sample get exact zero gradients, which the normalised step leaves unchanged, and
    so do tasks with a non-finite gate gradient (their whole step is skipped and flagged in the
    returned terms' ``nonfinite``, :mod:`nad_ext.training.nonfinite`). So it can also be
    captured in a CUDA graph (:mod:`nad_ext.training.step_graph`).
    """
    with torch.no_grad():
        out, original_acts = gated.original(x)
        correct = out.argmax(dim=1) == labels
    masked_out, masked_acts = gated(x, task_ids, record=True)
    logits = list(gated.logits)
    with checks.ids_checked():
        task_ids = task_ids.to(x.device, non_blocking=True)
        selective = {}
        if config.negatives:
            selective = dict(negative=~task_classes[task_ids, labels], task_classes=task_classes,
                             negative_weight=config.negative_weight)
        terms = nad_loss(masked_out, labels, masked_acts, original_acts, correct, task_ids, gated.scaled_logits(),
                         config.beta, [p.channel_axis for p in gated.gate_points], **selective)
        grads = torch.autograd.grad(terms.total, logits)
        tasks = tasks.to(x.device, non_blocking=True)
        grads, terms.nonfinite = guard_step(grads, tasks)
        normalized_gradient_step_(logits, grads, tasks, config.lr)
    return terms


def epoch_generator(seed: int, epoch: int, task: int) -> torch.Generator:
    """The generator of task ``task``'s data order and augmentation in ``epoch``."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_033 + task)


def prefetched_steps(streams, group: int, loader: nad_pipeline.BatchLoader):
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


class TaskStream:
    """Task t's batches in one epoch: a seeded permutation, then (selective objective) each
    batch's negatives, drawn from the same generator; the loader augments them from it too."""

    def __init__(self, indices, batch_size, generator, num_images=0, negatives=0.0):
        order = torch.randperm(len(indices), generator=generator).tolist()
        self.batches = [[indices[i] for i in order[j : j + batch_size]] for j in range(0, len(order), batch_size)]
        if negatives:  # own images first, then the other classes' images
            self.batches = add_negatives(self.batches, indices, num_images, negatives, generator)
        self.generator = generator


def train_epoch(step, streams, task_of, num_tasks, loader, config: NADConfig, group: int, epoch: int,
                progress: bool, device, nonfinite: NonFiniteTally):
    """One epoch over the batches of tasks ``task_of`` (``streams[i]`` is task ``task_of[i]``'s;
    ``step(x, labels, task_ids, tasks)`` per batch); returns the epoch's per-task mean loss terms
    (lists over all ``num_tasks`` tasks; zeros for tasks not in ``task_of``), where the time went
    (waiting for data or in the step), the images skipped as unreadable and the steps skipped
    for a non-finite gate gradient (``nonfinite``, the epoch's tally: under "stop" it raises
    instead, before the epoch can be committed).

    The running sums stay on the device; the progress bar reads them about once a second, so
    that steps are not serialised by device syncs. The non-finite tally is read there too.
    """
    keys = ("ce", "mse", "sparse", "loss") + (("negative",) if config.negatives else ())
    sums = {k: torch.zeros(num_tasks, device=device) for k in keys}
    steps = torch.zeros(num_tasks, device=device)
    skipped = torch.zeros(num_tasks, device=device)
    total_batches = sum(len(s.batches) for s in streams)
    bar = nad_progress.bar(total_batches, f"epoch {epoch + 1}/{config.epochs}", unit="batch", enabled=progress)
    images_seen, start, tasks_done, shown, wait0 = 0, time.perf_counter(), 0, 0.0, loader.wait_s
    for k, (first, active, batch) in enumerate(prefetched_steps(streams, group, loader)):
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
        updated = terms.counted & ~nonfinite.add(terms.nonfinite)  # a skipped step's terms are not averaged
        for k in sums:
            sums[k] += torch.where(updated, getattr(terms, k).detach(), 0.0)
        steps += updated
        present = torch.zeros(num_tasks, dtype=torch.bool)
        present[active] = True
        skipped += present.to(device, non_blocking=True) & ~terms.counted
        images_seen += len(labels)
        bar.update(len(active))
        elapsed = max(time.perf_counter() - start, 1e-9)
        if progress and elapsed - shown >= 1.0:
            shown = elapsed
            nonfinite.check()
            n = steps.clamp(min=1)
            bar.set_postfix(tasks=f"{tasks_done}/{len(task_of)}", img_s=f"{images_seen / elapsed:.0f}",
                            data_wait=f"{(loader.wait_s - wait0) / elapsed:.0%}",
                            ce=f"{(sums['ce'] / n).mean():.3f}", mse=f"{(sums['mse'] / n).mean():.3f}",
                            sparse=f"{(sums['sparse'] / n).mean():.3f}")
    nonfinite.check()  # waits for the device's last step
    n = steps.clamp(min=1)
    means = {k: (v / n).tolist() for k, v in sums.items()}
    seconds, wait = max(time.perf_counter() - start, 1e-9), loader.wait_s - wait0
    bar.set_postfix(tasks=f"{len(task_of)}/{len(task_of)}", img_s=f"{images_seen / seconds:.0f}",
                    data_wait=f"{wait / seconds:.0%}",
                    **{k: f"{sum(means[k][t] for t in task_of) / max(len(task_of), 1):.3f}"
                       for k in ("ce", "mse", "sparse", "negative") if k in means})
    bar.close()  # off a terminal: the epoch's one line
    bad_images, bad_files = loader.bad.take()
    if bad_images and progress:
        print(f"epoch {epoch + 1}: skipped {bad_images} unreadable images (listed in log.json)")
    nonfinite_steps = nonfinite.per_task()
    if any(nonfinite_steps) and progress:
        print(f"epoch {epoch + 1}: skipped {sum(nonfinite_steps)} task steps with a non-finite gate gradient "
              f"(counted per task in log.json, nonfinite_steps)")
    return {
        "epoch": epoch + 1,
        "images_per_second": images_seen / seconds,
        "skipped_batches": skipped.tolist(),
        "nonfinite_steps": nonfinite_steps,
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


def run_epochs(network: Network, tasks: list[Task], indices: list[list[int]], config: NADConfig, run: SharedRun,
               loader: nad_pipeline.BatchLoader, progress: bool, found: dict | None, num_images: int,
               num_classes: int, check: FidelityCheck | None = None) -> MaskBank:
    """Trains ``tasks`` (their training images ``indices``, of ``num_images`` in ``num_classes``
    classes) from the committed epoch of ``run`` to ``config.epochs``, committing every epoch;
    returns the bank of the last. ``found``: how beta was calibrated, recorded in the bank.
    ``check``: the fidelity check after the last epoch (:mod:`nad_ext.training.fidelity`), its
    figures committed with that epoch (bank and log)."""
    ctx = run.ctx
    device = ctx.device
    task_classes = task_class_matrix([t.classes for t in tasks], num_classes, device) if config.negatives else None
    execution = config.execution(device)
    graph = execution.graph
    gated = network.gated(len(tasks), config.image_size, seed=config.seed, init_std=config.init_std, device=device,
                          straight_through=config.gate == "straight_through", **execution.gated_options())
    if progress:
        path = execution.describe()
        units_text = "channels" if all(p.units == "channels" for p in gated.gate_points) else "gates"
        print(f"{network.model_id}: {len(gated.gate_points)} gate points, {sum(gated.layer_sizes)} {units_text}, "
              f"{len(tasks)} tasks ({config.mode} mode) on {device} ({path}; {loader.kind} data pipeline)")
        for i, point in enumerate(gated.gate_points):
            where = "  (in masked_conv2d)" if i in gated.fused_points else ""
            kind = "" if point.units == "channels" and point.channel_axis == 1 else \
                f"  ({point.units} on axis {point.channel_axis})"
            relu = "  (objective on relu(output))" if point.record == "relu" else ""
            print(f"  {point.name:36s} {point.channels:5d}{kind}{where}{relu}")
    config_record = asdict(config)
    start_epoch = 0
    if run.bank is not None:
        bank, where = run.bank, run.file(BANK_FILE)
        bank.apply_to(gated)
        check_same_records(bank, gated, where)
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
        from nad_ext.training.step_graph import GraphedSteps

        step = GraphedSteps(gated, lambda g, *batch: train_step(g, *batch, config, task_classes))
    group = 1 if config.mode == "paper" else config.tasks_per_step
    mine = ctx.my_tasks([len(i) for i in indices], group)  # every task, unless under torchrun
    for epoch in range(start_epoch, config.epochs):
        if config.gate == "annealed":
            gated.set_temperature(gate_temperature(config, epoch))
        streams = [TaskStream(indices[t], config.batch_size, epoch_generator(config.seed, epoch, t), num_images,
                              config.negatives) for t in mine]
        tally = NonFiniteTally(config.on_nonfinite, [t.name for t in tasks], [p.name for p in gated.gate_points],
                               epoch, device)
        stats = train_epoch(step, streams, mine, len(tasks), loader, config, group, epoch, progress, device, tally)
        bank = MaskBank.from_gated(gated, tasks, config_record, epoch + 1, found)
        if check is not None and epoch + 1 == config.epochs:
            bank.fidelity = check.run(gated, tasks, mine, config.image_size, stats, progress)
        run.commit_epoch(bank, stats, mine, config.keep_every_epoch)
    return run.finish() or MaskBank.from_gated(gated, tasks, config_record, start_epoch, found)


def check_same_records(bank: MaskBank, gated: GatedModel, where) -> None:
    """A run resumes with the objective it began with: ValueError when a gate point records
    another tensor for the MSE term than the bank's run did (``GatePoint.record``; banks written
    before records existed compared the gated outputs everywhere)."""
    changed = [(p.name, b.record, p.record) for p, b in zip(gated.gate_points, bank.gate_points) if p.record != b.record]
    if changed:
        what = "; ".join(f"gate point {n!r} records {new!r} now, {old!r} in the bank" for n, old, new in changed)
        names = ",".join(p.spec for p in bank.gate_points)
        raise ValueError(f"{where} was trained with another objective: {what} (the paper presets record relu(output) "
                         f"where the authors' model does, docs/METHOD.md). Continue it as it began with its own gate "
                         f"points (--gate-points {names}), or start again with --overwrite")


def train_in_memory(network: Network, train: ImageSet, *, tasks: Sequence[Task] | None = None,
                    config: NADConfig | None = None, check: FidelityCheck | None = None) -> MaskBank:
    """:func:`~nad_ext.training.driver.disentangle` in this process alone, nothing written, no
    progress: the short runs of beta calibration. Under torchrun too it runs here only (on this
    rank's device), so that every rank can run it at once. ``config.beta`` must be a number.
    ``check``: the fidelity check after the last epoch (``bank.fidelity``), without a warning."""
    config, tasks, indices = resolve_run(train, network.model_id, tasks, config)
    if config.beta == "auto":
        raise ValueError("train_in_memory needs a numeric beta, not 'auto'")
    ctx = distributed.Context(device=distributed.resolve_device(config.device))  # a world of one: this process
    run = SharedRun.open(ctx, None)
    with nad_pipeline.make_loader(train, config.image_size, ctx.device, config.data_pipeline,
                                  config.on_bad_image) as loader:
        return run_epochs(network, tasks, indices, config, run, loader, False, None, len(train), len(train.classes),
                          check)
