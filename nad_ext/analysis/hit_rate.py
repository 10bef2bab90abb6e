"""The 2x2 mosaic hit rate per gate point (METHOD.md, analysis 2), with its null baseline."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from nad_ext._utils import progress as nad_progress
from nad_ext.analysis.common import _check_inputs, _sequential
from nad_ext.analysis.maps import _normalised_maps, _to_display, top_hits
from nad_ext.analysis.masks import relative_depth
from nad_ext.data.imagesets import ImageSet, load_batch
from nad_ext.gates.maskbank import MaskBank
from nad_ext.gates.model import GatedModel


CHANCE_HIT = 0.25
NON_SPATIAL_NOTE = ("gate point output is not spatial (no H x W, or 1 x 1 after a global pool): "
                    "its activation map carries no location, so it has no hit rate")
ALL_CONSTANT_NOTE = "every activation map is constant here (channels closed): no hit rate"


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
