"""Analyses of the masks alone: open-channel ratios, similarity of sub-architectures,
their clustering."""
from __future__ import annotations

import numpy as np

from nad_ext.gates.maskbank import MaskBank
from nad_ext.ops.mask_overlap import mask_overlap


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
