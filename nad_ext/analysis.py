"""The paper's analyses of a mask bank (METHOD.md, "Analyses in the paper"), with error bars.

Every analysis takes a :class:`~nad_ext.maskbank.MaskBank` (and, where it runs images, the
:class:`~nad_ext.gates.GatedModel` it belongs to plus a validation :class:`ImageSet`) and
returns plain Python / NumPy results. :func:`run_all` runs them all and writes the results to
a folder (``results.json``, the similarity matrices as CSV, the hit-rate example arrays as
``.npz``); :mod:`nad_ext.report` turns them into one HTML page.

Sub-architectures are always the *binary* ones: channel c of gate point l is open for task t
when its logit is > 0, and the masked network multiplies closed channels by exactly 0.

The analyses that run the network take ``map_units(fn, n) -> [fn(0), ..., fn(n - 1)]``: the
units are the batches a single process runs, so a mapper that computes them on several
processes (``nad_ext.distributed.Context.map_units``, under torchrun) gives the same results.
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from nad_ext.data import IMAGENET_MEAN, IMAGENET_STD, ImageSet, eval_transform, load_batch
from nad_ext import progress as nad_progress
from nad_ext.gates import GatedModel, GatePoint
from nad_ext.maskbank import MaskBank, atomic_write
from nad_ext.objective import describe_objective
from nad_ext.ops.mask_overlap import mask_overlap

CHANCE_HIT = 0.25


def _sequential(fn, n: int) -> list:
    return [fn(u) for u in range(n)]
NON_SPATIAL_NOTE = ("gate point output is not spatial (no H x W, or 1 x 1 after a global pool): "
                    "its activation map carries no location, so it has no hit rate")
ALL_CONSTANT_NOTE = "every activation map is constant here (channels closed): no hit rate"

# The measures of masked_accuracy, named the same way on the console, in the report and in
# results.json (keys own_class_accuracy, false_positive_rate, balanced_accuracy).
OWN_CLASS_ACCURACY = "own-class accuracy"
FALSE_POSITIVES = "false positives on other classes"
BALANCED_ACCURACY = "balanced accuracy"
MEASURES_MEANING = (f"{OWN_CLASS_ACCURACY}: share of the task's own images predicted as its class (high is good); "
                    f"{FALSE_POSITIVES}: share of the other classes' images predicted as it too (low is good); "
                    f"{BALANCED_ACCURACY}: (own-class accuracy + 1 - false positives) / 2, 50% for a "
                    "sub-architecture that gives every image the same answer")
# The open-channel ratio of a sub-architecture: open channels / all gated channels, i.e. the
# per-gate-point ratios weighted by the gate points' channel counts.
OPEN_CHANNELS = "open channels (weighted by channels)"


# ----------------------------------------------------------------------------------------------
# Mask-only analyses


def relative_depth(num_points: int) -> list[float]:
    """Gate point l's position l / (L - 1) in [0, 1] (0.0 for a single gate point)."""
    return [i / (num_points - 1) if num_points > 1 else 0.0 for i in range(num_points)]


def subarchitecture_stats(bank: MaskBank) -> dict:
    """Open-channel ratios of the binary sub-architectures.

    Returns ``per_gate_point`` (mean and population std over tasks of each gate point's open
    ratio), ``per_task`` (each task's ratio per gate point and ``overall`` = open channels /
    all channels), ``overall`` (mean over tasks of the latter), plus the gate points, their
    channel counts and relative depths.
    """
    ratio = bank.open_ratio().double().numpy()  # (T, L)
    sizes = np.asarray(bank.layer_sizes, dtype=np.float64)
    overall = (ratio * sizes).sum(1) / sizes.sum()
    return {
        "gate_points": [p.name for p in bank.gate_points],
        "channels": bank.layer_sizes,
        "relative_depth": relative_depth(len(bank.gate_points)),
        "per_gate_point": {"mean": ratio.mean(0).tolist(), "std": ratio.std(0).tolist()},
        "per_task": [
            {"task": t.name, "classes": list(t.classes), "per_gate_point": ratio[i].tolist(),
             "overall": float(overall[i])}
            for i, t in enumerate(bank.tasks)
        ],
        "overall": float(overall.mean()),
    }


def similarity(bank: MaskBank, metric: str = "iou") -> np.ndarray:
    """(T, T) similarity of the tasks' sub-architectures: the mean over gate points of the
    per-layer ``metric`` (``"iou"``, the paper's; or ``"iomin"``), with 0/0 = 1."""
    masks = bank.binary()
    return mask_overlap(masks, masks, bank.layer_sizes, metric=metric).double().numpy()


def layerwise_similarity(bank: MaskBank, metric: str = "iou") -> np.ndarray:
    """(L,) mean of the per-layer ``metric`` over all task pairs i < j, per gate point: where
    the sub-architectures separate. NaN for banks with a single task."""
    masks = bank.binary()
    per_layer = mask_overlap(masks, masks, bank.layer_sizes, metric=metric, per_layer=True).double().numpy()
    rows, cols = np.triu_indices(len(bank.tasks), k=1)
    if len(rows) == 0:
        return np.full(len(bank.gate_points), np.nan)
    return per_layer[:, rows, cols].mean(axis=1)


def cluster_order(sim: np.ndarray) -> list[int]:
    """Leaf order of the average-linkage dendrogram on distances 1 - ``sim``.

    Plain O(T^3) agglomerative clustering: repeatedly merge the two closest clusters (ties go
    to the lowest indices), the merged cluster listing the first cluster's leaves then the
    second's; distances update by the Lance-Williams rule for average linkage.
    """
    sim = np.asarray(sim, dtype=np.float64)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"sim must be a square matrix, got shape {sim.shape}")
    if not np.isfinite(sim).all():
        raise ValueError("sim must be finite")
    n = sim.shape[0]
    dist = 1.0 - (sim + sim.T) / 2.0
    np.fill_diagonal(dist, np.inf)
    leaves = {i: [i] for i in range(n)}
    while len(leaves) > 1:
        a, b = np.unravel_index(np.argmin(dist), dist.shape)
        a, b = (int(a), int(b)) if a < b else (int(b), int(a))
        na, nb = len(leaves[a]), len(leaves[b])
        merged = (na * dist[a] + nb * dist[b]) / (na + nb)
        dist[a, :], dist[:, a] = merged, merged
        dist[b, :], dist[:, b] = np.inf, np.inf
        dist[a, a] = np.inf
        leaves[a] = leaves[a] + leaves.pop(b)
    return next(iter(leaves.values())) if leaves else []


# ----------------------------------------------------------------------------------------------
# Input checks


def _check_inputs(gated: GatedModel, bank: MaskBank, val_images: ImageSet, image_size: int) -> None:
    """Loads the bank into the model (checking they match) and checks tasks against classes."""
    if not isinstance(bank, MaskBank):
        raise TypeError(f"bank must be a MaskBank, got {type(bank).__name__}")
    if not isinstance(val_images, ImageSet):
        raise TypeError(f"val_images must be an ImageSet, got {type(val_images).__name__}")
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
    bank.apply_to(gated)
    for task in bank.tasks:
        if not task.classes:
            raise ValueError(f"task {task.name!r} has no classes")
        bad = [c for c in task.classes if not 0 <= c < len(val_images.classes)]
        if bad:
            raise ValueError(f"task {task.name!r} names classes {bad} that {val_images.name} "
                             f"does not have ({len(val_images.classes)} classes)")


def _mosaic_classes(bank: MaskBank, val_images: ImageSet) -> dict[int, int]:
    """{class: task index} for the classes that have a one-class task and validation images."""
    by_class = {t.classes[0]: i for i, t in enumerate(bank.tasks) if len(t.classes) == 1}
    usable = {c: t for c, t in sorted(by_class.items()) if val_images.indices_of_class(c)}
    if len(usable) < 4:
        raise ValueError(
            f"mosaics need at least 4 classes that each have a one-class task and validation "
            f"images; this bank and {val_images.name} have {len(usable)}"
        )
    return usable


def _check_mosaic_args(num_mosaics, top_fraction, null_samples) -> None:
    if not isinstance(num_mosaics, int) or isinstance(num_mosaics, bool) or num_mosaics < 1:
        raise ValueError(f"num_mosaics must be an integer >= 1, got {num_mosaics!r}")
    if not isinstance(top_fraction, (int, float)) or not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction!r}")
    if not isinstance(null_samples, int) or isinstance(null_samples, bool) or null_samples < 0:
        raise ValueError(f"null_samples must be an integer >= 0, got {null_samples!r}")


def _one_task_per_class(bank: MaskBank, val_images: ImageSet) -> list[int]:
    """The task index of every class; ValueError unless the bank has exactly one task per class."""
    if any(len(t.classes) != 1 for t in bank.tasks):
        raise ValueError("this analysis needs one task per class; the bank has multi-class tasks")
    owner = {t.classes[0]: i for i, t in enumerate(bank.tasks)}
    if len(owner) != len(bank.tasks) or sorted(owner) != list(range(len(val_images.classes))):
        raise ValueError(f"this analysis needs exactly one task per class of {val_images.name} "
                         f"({len(val_images.classes)} classes); the bank's tasks cover classes {sorted(owner)}")
    return [owner[c] for c in range(len(val_images.classes))]


# ----------------------------------------------------------------------------------------------
# Activation maps


def position_map(activation: torch.Tensor, point: GatePoint | None = None) -> torch.Tensor | None:
    """The gate point's output summed over its units at every position: (N, h, w) float, or
    None when the output has no spatial positions.

    Units are summed along ``point.channel_axis`` (and, for attention heads, the head
    dimension too). What remains is the position grid: (h, w) for (N, C, H, W) and NHWC maps and
    for Swin's head outputs; for (N, L) tokens, the square patch grid when L = g * g, or when
    L = g * g + 1 with a leading class token, which is dropped (torchvision's ViT); any other
    token count (extra distillation or register tokens) and (N, C) vectors have no map.
    """
    axis = 1 if point is None else point.channel_axis
    units = [axis] + ([activation.dim() - 1] if point is not None and point.units == "heads" else [])
    maps = activation.float().sum(dim=units)
    if maps.dim() == 2:
        length = maps.shape[1]
        for extra in (0, 1):
            side = math.isqrt(max(length - extra, 0))
            if side > 0 and side * side == length - extra:
                return maps[:, extra:].reshape(-1, side, side)
        return None
    return maps if maps.dim() == 3 else None


def activation_maps(activation: torch.Tensor, size: int, point: GatePoint | None = None) -> torch.Tensor | None:
    """:func:`position_map` (channels on axis 1 when ``point`` is None), min-max normalised
    per sample and resized bicubic to (size, size).

    Returns float (N, size, size), or None when the output is not spatial (see
    :func:`position_map`, or 1 x 1 after a global pool). A constant map (span at most 1e-6 of
    its magnitude) normalises to zeros.
    """
    maps = _normalised_maps(activation, point)
    if maps is None:
        return None
    return F.interpolate(maps[0][:, None], size=(size, size), mode="bicubic", align_corners=False)[:, 0]


def _normalised_maps(activation: torch.Tensor, point: GatePoint | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(the position maps min-max normalised per sample (N, h, w), which maps are constant (N,)),
    or None when not spatial. Constant (span at most 1e-6 of the magnitude, e.g. every channel
    closed) maps normalise to zeros."""
    maps = position_map(activation, point)
    if maps is None or maps.shape[-1] * maps.shape[-2] <= 1:
        return None
    low, high = maps.amin(dim=(1, 2), keepdim=True), maps.amax(dim=(1, 2), keepdim=True)
    span = high - low
    varies = span > 1e-6 * torch.maximum(low.abs(), high.abs())
    maps = torch.where(varies, (maps - low) / span.clamp(min=1e-30), torch.zeros_like(maps))
    return maps, ~varies.flatten()


def top_hits(maps: torch.Tensor, quadrant: torch.Tensor, top_fraction: float) -> torch.Tensor:
    """Fraction of each map's top ``top_fraction`` pixels that lie inside ``quadrant``.

    ``maps``: (N, S, S); ``quadrant``: (N,) in 0..3 (top-left, top-right, bottom-left,
    bottom-right). Pixels tied at the threshold share the remaining places evenly (the expected
    hit under random tie-breaking), so a constant map scores exactly 0.25.
    """
    n, s = maps.shape[0], maps.shape[-1]
    flat = maps.reshape(n, -1)
    k = max(1, int(round(top_fraction * flat.shape[1])))
    threshold = torch.topk(flat, k, dim=1).values[:, -1:]
    rows = torch.arange(s, device=maps.device)[:, None] >= s // 2
    cols = torch.arange(s, device=maps.device)[None, :] >= s // 2
    inside = torch.stack([~rows & ~cols, ~rows & cols, rows & ~cols, rows & cols]).reshape(4, -1)
    inside = inside[quadrant.long()]
    above, tied = flat > threshold, flat == threshold
    n_above, n_tied = above.sum(1).double(), tied.sum(1).double()
    hits = (above & inside).sum(1).double() + (k - n_above) * (tied & inside).sum(1).double() / n_tied
    return hits / k


def _to_display(x: torch.Tensor) -> np.ndarray:
    """Normalised (3, H, W) -> uint8 (H, W, 3)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((x.cpu() * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


# ----------------------------------------------------------------------------------------------
# Analyses that run the network


@torch.no_grad()
def masked_accuracy(gated: GatedModel, bank: MaskBank, val_images: ImageSet, image_size: int,
                    batch_size: int = 64, device: str = "cpu", other_images_per_class: int | None = None,
                    map_units=_sequential, progress: bool = False) -> dict:
    """Each task's binary sub-architecture against the original network, on validation images.

    Predictions are the top-1 over all of the network's classes. For task t (names as in
    :data:`MEASURES_MEANING`): ``own_class_accuracy``: on the images of t's classes, the share
    predicted as one of t's classes (one-class task: prediction == label);
    ``false_positive_rate``: on the other classes' images, the share predicted as one of t's
    classes (low is good); ``balanced_accuracy``: (own-class accuracy + 1 - false-positive
    rate) / 2, 0.5 for a sub-architecture that calls every image (or no image) its own;
    ``original_*``: the same for the original network on the same images. ``mean``: the means
    over tasks. ``other_images_per_class``: use only the first n images of each other class
    for the false positives (None: all; the cost is then T x the validation set).
    """
    _check_inputs(gated, bank, val_images, image_size)
    if other_images_per_class is not None and (not isinstance(other_images_per_class, int)
                                               or other_images_per_class < 0):
        raise ValueError(f"other_images_per_class must be None or an integer >= 0, got {other_images_per_class!r}")
    gated.to(device)
    labels = torch.tensor(val_images.labels)
    T, N = len(bank.tasks), len(labels)
    in_task = torch.zeros(T, N, dtype=torch.bool)  # image i is of a class of task t
    for t, task in enumerate(bank.tasks):
        in_task[t] = torch.isin(labels, torch.tensor(task.classes))
    sampled = torch.ones(N, dtype=torch.bool)  # images used for the false positives
    if other_images_per_class is not None:
        sampled[:] = False
        for c in range(len(val_images.classes)):
            sampled[val_images.indices_of_class(c)[:other_images_per_class]] = True
    run = in_task | (~in_task & sampled)  # (task, image) pairs to evaluate
    def unit(b):  # a batch of images: the original network, then each (task, image) pair of the batch
        idx = torch.arange(b * batch_size, min((b + 1) * batch_size, N))
        x = load_batch(val_images, idx.tolist(), image_size)[0].to(device)
        logits = gated.original(x, record=False)[0]
        tasks, local = run[:, idx].nonzero(as_tuple=True)
        preds = [gated(x[local[lo: lo + batch_size].to(device)], tasks[lo: lo + batch_size].to(device),
                       binary=True)[0].argmax(1).cpu() for lo in range(0, len(tasks), batch_size)]
        bar.update(1)
        return idx, logits.argmax(1).cpu(), logits.shape[1], tasks, idx[local], preds

    is_task_class = None  # (T, number of outputs): output o is a class of task t
    hit = torch.zeros(T, N, dtype=torch.bool)  # masked net of t predicts a class of t
    orig_pred = torch.empty(N, dtype=torch.int64)
    bar = nad_progress.bar(-(-N // batch_size), f"{bank.model_id}: {OWN_CLASS_ACCURACY} and {FALSE_POSITIVES}",
                           unit="batch", enabled=progress)
    for idx, pred, outputs, tasks, images, preds in map_units(unit, -(-N // batch_size)):
        orig_pred[idx] = pred
        if is_task_class is None:
            is_task_class = torch.zeros(T, outputs, dtype=torch.bool)
            for t, task in enumerate(bank.tasks):
                is_task_class[t, [c for c in task.classes if c < outputs]] = True
        if preds:
            hit[tasks, images] = is_task_class[tasks, torch.cat(preds)]
    bar.close()
    orig_hit = is_task_class[:, orig_pred]
    rows = []
    for t, task in enumerate(bank.tasks):
        own, other = in_task[t], ~in_task[t] & sampled
        rate = lambda h, m: float(h[m].float().mean()) if m.any() else float("nan")  # noqa: E731
        row = {"task": task.name, "classes": list(task.classes), "images": int(own.sum()),
               "other_images": int(other.sum())}
        for prefix, h in (("", hit[t]), ("original_", orig_hit[t])):
            row.update(_measures(rate(h, own), rate(h, other), prefix))
        rows.append(row)
    keys = [k for k in rows[0] if k.endswith(("accuracy", "rate"))]
    mean = {k: float(np.nanmean([r[k] for r in rows])) if any(not math.isnan(r[k]) for r in rows)
            else float("nan") for k in keys}
    return {"tasks": rows, "mean": mean, "other_images_per_class": other_images_per_class,
            "definition": "top-1 over all classes; " + MEASURES_MEANING}


def _measures(own_class_accuracy: float, false_positive_rate: float, prefix: str = "") -> dict:
    return {f"{prefix}own_class_accuracy": own_class_accuracy,
            f"{prefix}false_positive_rate": false_positive_rate,
            f"{prefix}balanced_accuracy": (own_class_accuracy + 1.0 - false_positive_rate) / 2.0}


def _draw_mosaics(val_images: ImageSet, classes: list[int], num_mosaics: int, seed: int):
    """(class indices (M, 4), image indices (M, 4)) of seeded random mosaics."""
    rng = np.random.default_rng(seed)
    pools = {c: val_images.indices_of_class(c) for c in classes}
    picked = np.stack([rng.choice(classes, size=4, replace=False) for _ in range(num_mosaics)])
    images = np.array([[pools[c][rng.integers(len(pools[c]))] for c in row] for row in picked])
    return picked, images


@torch.no_grad()
def _accepts_size(gated: GatedModel, size: int, device) -> bool:
    """Whether the network runs on (size x size) images (a ViT accepts only its own size)."""
    try:
        gated.original(torch.zeros(1, 3, size, size, device=device), record=False)
    except (RuntimeError, AssertionError, ValueError):
        return False
    return True


def _mosaic_hits(gated, mosaic, tasks, top_fraction, device, batch_size, keep_examples=0, map_units=_sequential,
                 bar=None):
    """Runs each mosaic (``mosaic(m)``: mosaic m, (3, S, S)) with its four classes' tasks
    (``tasks``: (M, 4)); returns hits (L, M, 4) (NaN where not spatial), which maps are constant
    (L, M, 4) and the maps of the first ``keep_examples`` mosaics ({m: {layer: (4, S, S) maps}})."""
    M, L = tasks.shape[0], len(gated.gate_points)
    per_batch = max(1, batch_size // 4)
    quadrants = torch.arange(4).repeat(per_batch)

    def unit(b):  # a batch of mosaics, each with its four tasks
        start, stop = b * per_batch, min((b + 1) * per_batch, M)
        n = stop - start
        x = torch.stack([mosaic(m) for m in range(start, stop)]).to(device).repeat_interleave(4, dim=0)
        ids = tasks[start:stop].reshape(-1).to(device)
        _, acts = gated(x, ids, binary=True, record=True)
        hits, kept = torch.full((L, n, 4), float("nan"), dtype=torch.float64), {}
        constant = torch.zeros((L, n, 4), dtype=torch.bool)
        for layer, act in enumerate(acts):
            normalised = _normalised_maps(act, gated.gate_points[layer])
            if normalised is None:
                continue
            maps = F.interpolate(normalised[0][:, None], size=x.shape[-2:], mode="bicubic", align_corners=False)[:, 0]
            constant[layer] = normalised[1].cpu().view(n, 4)
            hits[layer] = top_hits(maps, quadrants[: 4 * n].to(device), top_fraction).cpu().view(n, 4)
            for m in range(start, min(stop, keep_examples)):
                kept.setdefault(m, {})[layer] = maps[4 * (m - start): 4 * (m - start) + 4].cpu()
        if bar is not None:
            bar.update(1)
        return hits, constant, kept

    parts = map_units(unit, -(-M // per_batch))
    kept = {m: maps for _, _, part in parts for m, maps in part.items()}
    return torch.cat([h for h, _, _ in parts], dim=1), torch.cat([c for _, c, _ in parts], dim=1), kept


def _constant_reason(open_counts: torch.Tensor, task: int, layer: int, names: list[str]) -> str:
    """Why task ``task``'s activation map at gate point ``layer`` is constant."""
    if open_counts[layer][task] == 0:
        return "all channels closed"
    closed = [k for k in range(layer) if open_counts[k][task] == 0]
    return f"all channels closed at {names[closed[-1]]}" if closed else "constant map"


@torch.no_grad()
def hit_rate(gated: GatedModel, bank: MaskBank, val_images: ImageSet, image_size: int,
             num_mosaics: int = 100, top_fraction: float = 0.10, seed: int = 0, null_samples: int = 1,
             device: str = "cpu", batch_size: int = 64, num_examples: int = 2,
             example_size: int = 64, map_units=_sequential, progress: bool = False) -> dict:
    """The 2x2 mosaic hit rate per gate point (METHOD.md, analysis 2), with a null baseline.

    Each mosaic holds four eval-transformed validation images of four different random classes
    (side 2 * image_size; a network with a fixed input size, such as a ViT, gets the mosaic at
    image_size, its images at half size: ``mosaic_size`` says which). For each of its classes
    and each gate point, the mosaic runs through that class's binary sub-architecture (its one-class task); the activation map (see
    :func:`activation_maps`) is resized to the mosaic and the hit is the fraction of its top
    ``top_fraction`` pixels inside the class's quadrant (:func:`top_hits`). A constant map
    (typically: every channel of the task closed there or before) has no top pixels: such
    (mosaic, class) pairs are counted in ``constant_pairs`` and left out of ``mean``/``std``,
    which are over the other pairs (None where every map is constant, with a note); chance is
    0.25. The null baseline repeats this with random sub-architectures that keep each task's
    open-channel count per gate point (its logits permuted within each layer; ``null_samples``
    independent permutations per task). Non-spatial gate points get None and a note.
    Deterministic given ``seed``.

    ``examples``: the first ``num_examples`` mosaics (uint8 (S, S, 3)) with, for each of their
    four classes, the per-gate-point maps at ``example_size`` pixels (None where not spatial)
    and ``constant`` (None, or why the map is constant: "all channels closed", ...).
    """
    _check_inputs(gated, bank, val_images, image_size)
    _check_mosaic_args(num_mosaics, top_fraction, null_samples)
    gated.to(device)
    usable = _mosaic_classes(bank, val_images)
    picked, image_idx = _draw_mosaics(val_images, list(usable), num_mosaics, seed)
    # A network with a fixed input size (a ViT) sees the mosaic at that size, each image at half
    # its resolution; the others see it at twice the image size, as in the paper.
    s = image_size if _accepts_size(gated, 2 * image_size, device) else image_size // 2

    built = {}  # the mosaics this process has used (all of them, in a single process)
    chunk = max(1, batch_size // 4)  # the mosaics of one batch of _mosaic_hits, loaded together

    def mosaic(m):
        if m not in built:
            first = m - m % chunk
            ms = list(range(first, min(first + chunk, num_mosaics)))
            # Tiles (n, 2 rows, 2 columns, 3, s, s) -> mosaics (n, 3, 2s, 2s).
            tiles = load_batch(val_images, image_idx[ms].reshape(-1).tolist(), s)[0].cpu()
            grid = tiles.view(len(ms), 2, 2, 3, s, s).permute(0, 3, 1, 4, 2, 5).reshape(-1, 3, 2 * s, 2 * s)
            built.update(zip(ms, grid))
        return built[m]
    tasks = torch.tensor([[usable[int(c)] for c in row] for row in picked], dtype=torch.int64)
    keep = min(num_examples, num_mosaics)
    per_batch = max(1, batch_size // 4)
    bar = nad_progress.bar((1 + null_samples) * -(-num_mosaics // per_batch),
                           f"{bank.model_id}: hit rate ({num_mosaics} mosaics, {null_samples} null)",
                           unit="batch", enabled=progress)
    try:
        hits, constant, kept = _mosaic_hits(gated, mosaic, tasks, top_fraction, device, batch_size, keep, map_units,
                                            bar)
        null, null_constant = [], []
        for sample in range(null_samples):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * (sample + 1))
            shuffled = []
            for m in bank.logits:
                perms = torch.stack([torch.randperm(m.shape[1], generator=gen) for _ in range(m.shape[0])])
                shuffled.append(torch.gather(m, 1, perms))
            gated.set_logits(shuffled)
            h, c, _ = _mosaic_hits(gated, mosaic, tasks, top_fraction, device, batch_size, 0, map_units, bar)
            null.append(h)
            null_constant.append(c)
    finally:
        bank.apply_to(gated)
        bar.close()
    names = [p.name for p in bank.gate_points]
    spatial = [bool(not torch.isnan(hits[layer]).all()) for layer in range(hits.shape[0])]

    def summary(h, flat, layer):
        kept_hits = h[layer][~flat[layer]]
        if not spatial[layer] or kept_hits.numel() == 0:
            return None, None
        return float(kept_hits.mean()), float(kept_hits.std(unbiased=False))

    null_all = torch.cat(null, dim=1) if null else None
    null_flat = torch.cat(null_constant, dim=1) if null else None
    count = lambda flat, layer: int(flat[layer].sum()) if spatial[layer] else None  # noqa: E731
    result = {
        "gate_points": names,
        "relative_depth": relative_depth(len(names)),
        "spatial": spatial,
        "mean": [summary(hits, constant, l)[0] for l in range(len(names))],
        "std": [summary(hits, constant, l)[1] for l in range(len(names))],
        "constant_pairs": [count(constant, l) for l in range(len(names))],
        "null_mean": [summary(null_all, null_flat, l)[0] if null else None for l in range(len(names))],
        "null_std": [summary(null_all, null_flat, l)[1] if null else None for l in range(len(names))],
        "null_constant_pairs": [count(null_flat, l) if null else None for l in range(len(names))],
        "chance": CHANCE_HIT,
        "num_mosaics": num_mosaics, "mosaic_size": 2 * s, "top_fraction": float(top_fraction), "seed": seed,
        "null_samples": null_samples, "pairs": 4 * num_mosaics,
        "notes": {n: NON_SPATIAL_NOTE for n, sp in zip(names, spatial) if not sp},
        "examples": [],
    }
    result["notes"].update({n: ALL_CONSTANT_NOTE for l, n in enumerate(names)
                            if spatial[l] and bool(constant[l].all())})
    open_counts = [(logits > 0).sum(1).tolist() for logits in bank.logits]
    for m in range(keep):
        view = F.interpolate(mosaic(m)[None], size=(example_size, example_size), mode="bilinear",
                             antialias=True, align_corners=False)[0]
        maps = []
        for q in range(4):
            per_layer = []
            for layer in range(len(names)):
                full = kept.get(m, {}).get(layer)
                per_layer.append(None if full is None else F.interpolate(
                    full[q][None, None], size=(example_size, example_size), mode="bilinear",
                    antialias=True, align_corners=False)[0, 0].clamp(0, 1).numpy())
            maps.append(per_layer)
        result["examples"].append({
            "classes": [val_images.classes[int(c)] for c in picked[m]],
            "class_indices": [int(c) for c in picked[m]],
            "hits": [[None if math.isnan(v) else float(v) for v in hits[:, m, q].tolist()] for q in range(4)],
            "constant": [[_constant_reason(open_counts, int(tasks[m, q]), layer, names)
                          if bool(constant[layer, m, q]) else None for layer in range(len(names))]
                         for q in range(4)],
            "mosaic": _to_display(view), "maps": maps,
        })
    return result


@torch.no_grad()
def confusion_vs_similarity(gated: GatedModel, bank: MaskBank, val_images: ImageSet, image_size: int,
                            k: int = 3, device: str = "cpu", batch_size: int = 64, map_units=_sequential,
                            progress: bool = False) -> dict:
    """Are classes confused with the classes whose sub-architectures resemble theirs?

    For each class: its k most similar sub-architectures (mean IoU, itself excluded) and the
    original network's k most likely *wrong* classes on that class's validation images, taken
    as the top-k of the mean softmax over those images with the true class excluded; their
    overlap (chance: k*k / (T - 1)). For every misclassified image: the rank of the predicted
    class among the true class's most similar sub-architectures (1 = most similar; ties get the
    mid rank), and the fraction with rank <= k against chance k / (T - 1).
    Needs one task per class (ValueError otherwise).
    """
    _check_inputs(gated, bank, val_images, image_size)
    task_of = _one_task_per_class(bank, val_images)
    C = len(task_of)
    if C < 2:
        raise ValueError("confusion_vs_similarity needs at least 2 classes")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= C - 1:
        raise ValueError(f"k must be an integer in [1, {C - 1}], got {k!r}")
    gated.to(device)
    sim_tasks = similarity(bank)
    sim = sim_tasks[np.ix_(task_of, task_of)]  # class x class
    probs = torch.zeros(C, C, dtype=torch.float64)
    counts = np.zeros(C, dtype=np.int64)
    wrong = []  # (true, predicted)
    bar = nad_progress.bar(-(-len(val_images) // batch_size), f"{bank.model_id}: confusion versus similarity",
                           unit="batch", enabled=progress)

    def unit(b):
        x, y = load_batch(val_images, list(range(b * batch_size, min((b + 1) * batch_size, len(val_images)))),
                          image_size)
        logits = gated.original(x.to(device), record=False)[0].cpu().double()
        bar.update(1)
        return y, logits
    for y, logits in map_units(unit, -(-len(val_images) // batch_size)):
        if logits.shape[1] < C:
            raise ValueError(f"the network has {logits.shape[1]} outputs but {val_images.name} has {C} classes")
        p = logits.softmax(1)[:, :C]
        probs.index_add_(0, y, p)
        counts += np.bincount(y.numpy(), minlength=C)
        pred = logits.argmax(1)
        wrong += [(int(a), int(b)) for a, b in zip(y, pred) if a != b]
        bar.update(1)
    bar.close()
    rows = []
    for c in range(C):
        others = [j for j in range(C) if j != c]
        similar = sorted(others, key=lambda j: (-sim[c, j], j))[:k]
        mean_p = (probs[c] / max(counts[c], 1)).numpy()
        predicted = sorted(others, key=lambda j: (-mean_p[j], j))[:k]
        rows.append({"class": val_images.classes[c], "images": int(counts[c]),
                     "similar": [val_images.classes[j] for j in similar],
                     "similar_iou": [float(sim[c, j]) for j in similar],
                     "predicted": [val_images.classes[j] for j in predicted],
                     "predicted_prob": [float(mean_p[j]) for j in predicted],
                     "overlap": len(set(similar) & set(predicted))})
    ranks = []
    for true, pred in wrong:
        if pred >= C:
            continue  # an output with no task: it has no rank
        others = np.delete(sim[true], true)
        greater, ties = (others > sim[true, pred]).sum(), (others == sim[true, pred]).sum() - 1
        ranks.append(1.0 + greater + ties / 2.0)
    return {
        "k": k, "classes": list(val_images.classes),
        "predictions": "top-k of the mean softmax over the class's images, true class excluded",
        "per_class": rows,
        "mean_overlap": float(np.mean([r["overlap"] for r in rows])),
        "chance_overlap": k * k / (C - 1),
        "misclassified": len(ranks), "ranks": ranks,
        "mean_rank": float(np.mean(ranks)) if ranks else None,
        "fraction_rank_le_k": float(np.mean(np.asarray(ranks) <= k)) if ranks else None,
        "chance": k / (C - 1),
    }


@torch.no_grad()
def single_image_view(gated: GatedModel, bank: MaskBank, image: torch.Tensor, task: int | str,
                      image_size: int, top_fraction: float = 0.05) -> list[dict]:
    """One image through one task's binary sub-architecture (METHOD.md, analysis 5).

    ``image``: uint8 (3, H, W) as from :meth:`ImageSet.load` (eval-transformed here); ``task``:
    index or name. Returns per gate point ``{"gate_point", "map": (S, S) float in [0, 1],
    "top": (S, S) bool, the top ``top_fraction`` pixels (ties at the threshold included)}``
    with S = image_size; ``map`` and ``top`` are None where the output is not spatial.
    """
    bank.apply_to(gated)
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction!r}")
    if isinstance(task, str):
        if task not in bank.task_names:
            raise ValueError(f"unknown task {task!r}; the bank's tasks: {', '.join(bank.task_names)}")
        task = bank.task_names.index(task)
    if not 0 <= task < len(bank.tasks):
        raise ValueError(f"task index {task} out of range: the bank has {len(bank.tasks)} tasks")
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError("image must be a (3, H, W) tensor")
    device = next(iter(gated.logits)).device
    x = eval_transform(image, image_size)[None].to(device)
    _, acts = gated(x, torch.tensor([task], device=device), binary=True, record=True)
    views = []
    for point, act in zip(bank.gate_points, acts):
        maps = activation_maps(act, image_size, point)
        if maps is None:
            views.append({"gate_point": point.name, "map": None, "top": None})
            continue
        flat = maps[0].flatten()
        kth = torch.topk(flat, max(1, int(round(top_fraction * flat.numel())))).values[-1]
        views.append({"gate_point": point.name, "map": maps[0].cpu().numpy(), "top": (maps[0] >= kth).cpu().numpy()})
    return views


# ----------------------------------------------------------------------------------------------
# Everything at once


def _jsonable(value):
    """Plain JSON types; NaN -> None; arrays -> lists."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _matrix_csv(matrix: np.ndarray, names: Sequence[str]) -> str:
    quote = lambda s: '"' + str(s).replace('"', '""') + '"'  # noqa: E731
    lines = [",".join(["task"] + [quote(n) for n in names])]
    lines += [",".join([quote(n)] + [f"{v:.6f}" for v in row]) for n, row in zip(names, matrix)]
    return "\n".join(lines) + "\n"


def run_all(gated: GatedModel, bank: MaskBank, val_images: ImageSet, image_size: int, out_dir: str | Path,
            *, num_mosaics: int = 100, top_fraction: float = 0.10, seed: int = 0, null_samples: int = 1,
            k: int = 3, batch_size: int = 64, device: str = "cpu", num_examples: int = 2,
            other_images_per_class: int | None = None, map_units=_sequential, write: bool = True,
            progress: bool = False) -> dict:
    """Runs analyses 1-5 and writes them to ``out_dir`` (unless ``write`` is False: the other
    processes of a distributed run).

    Files: ``results.json`` (everything but the example arrays), ``similarity_iou.csv``,
    ``similarity_iomin.csv`` (task x task, in bank order) and ``hit_rate_examples.npz``
    (the example mosaics and maps). The returned dict holds all results, arrays included; the
    confusion analysis is ``{"skipped": reason}`` when the bank is not one task per class.
    The keyword arguments go to the analyses of the same names (``num_mosaics`` and
    ``other_images_per_class`` set most of the cost); ``map_units`` shares the work (see the
    module's docstring); ``progress``: a progress bar per analysis.
    """
    _check_inputs(gated, bank, val_images, image_size)
    _check_mosaic_args(num_mosaics, top_fraction, null_samples)
    _mosaic_classes(bank, val_images)
    out_dir = Path(out_dir)
    iou, iomin = similarity(bank, "iou"), similarity(bank, "iomin")
    results = {
        "model_id": bank.model_id,
        "objective": describe_objective(bank.config),
        "tasks": bank.task_names,
        "stats": subarchitecture_stats(bank),
        "similarity": {"iou": iou, "iomin": iomin, "order": cluster_order(iou)},
        "layerwise_similarity": layerwise_similarity(bank),
        "masked_accuracy": masked_accuracy(gated, bank, val_images, image_size, batch_size, device,
                                           other_images_per_class, map_units, progress),
        "hit_rate": hit_rate(gated, bank, val_images, image_size, num_mosaics, top_fraction, seed,
                             null_samples, device, batch_size, num_examples, map_units=map_units,
                             progress=progress),
    }
    try:
        results["confusion"] = confusion_vs_similarity(gated, bank, val_images, image_size, k, device, batch_size,
                                                       map_units, progress)
    except ValueError as err:
        results["confusion"] = {"skipped": str(err)}
    examples = results["hit_rate"]["examples"]
    arrays = {f"example{e}_mosaic": ex["mosaic"] for e, ex in enumerate(examples)}
    for e, ex in enumerate(examples):
        for q, per_layer in enumerate(ex["maps"]):
            for layer, m in enumerate(per_layer):
                if m is not None:
                    arrays[f"example{e}_class{q}_layer{layer:03d}"] = m
    stripped = dict(results, hit_rate=dict(results["hit_rate"], examples=[
        {key: v for key, v in ex.items() if key not in ("mosaic", "maps")} for ex in examples]))
    if not write:
        return results
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_text(out_dir / "results.json", json.dumps(_jsonable(stripped), indent=1))
    _write_text(out_dir / "similarity_iou.csv", _matrix_csv(iou, bank.task_names))
    _write_text(out_dir / "similarity_iomin.csv", _matrix_csv(iomin, bank.task_names))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write(out_dir / "hit_rate_examples.npz", lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))
    return results


def load_results(out_dir: str | Path) -> dict:
    """Reads what :func:`run_all` wrote to ``out_dir`` back into its result dict (the example
    mosaics and maps included), for reports made later (``nad report``)."""
    out_dir = Path(out_dir)
    path = out_dir / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `nad analyze ... --out {out_dir}` first")
    results = json.loads(path.read_text())
    _rename_old_measures(results.get("masked_accuracy") or {})
    npz = out_dir / "hit_rate_examples.npz"
    if npz.is_file():
        arrays = np.load(npz)
        num_layers = len(results["stats"]["per_gate_point"]["mean"])
        for e, ex in enumerate(results["hit_rate"]["examples"]):
            if f"example{e}_mosaic" in arrays:
                ex["mosaic"] = arrays[f"example{e}_mosaic"]
                ex["maps"] = [[arrays.get(f"example{e}_class{q}_layer{layer:03d}") for layer in range(num_layers)]
                              for q in range(4)]
    return results


def _rename_old_measures(acc: dict) -> None:
    """Results written before the measures were renamed (accuracy, rejection) get today's keys."""
    for row in acc.get("tasks", []) + [acc.get("mean", {})]:
        for prefix in ("", "original_"):
            if f"{prefix}accuracy" in row and f"{prefix}rejection" in row:
                own, fp = row.pop(f"{prefix}accuracy"), row.pop(f"{prefix}rejection")
                nan = float("nan")
                row.update(_measures(nan if own is None else own, nan if fp is None else fp, prefix))
