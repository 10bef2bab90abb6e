"""Per-image routing paths against the class sub-architectures (issue 26), each with a chance
baseline: which class a path resembles (:func:`path_to_class`), where misclassified images'
paths lead (:func:`misclassified_paths`), how class-specific each gate point is on its own
(:func:`layerwise_path_to_class`), and a detector of images whose path is far from every class
(:func:`path_outlier_scores`, :func:`roc_auc`, :func:`detector_auc`, with the attacks
:func:`fgsm` and :func:`pgd` that make such images).

Paths are a :class:`~nad_ext.gates.pathstore.PathChunk` (with its logits) or a
:class:`~nad_ext.gates.pathstore.StoredPaths`; only images of status 0 ("ok") count, and
images whose label has no task in the bank are left out too (both counted in ``excluded``). The
bank needs one task per class. Similarity is the paper's: the mean over gate points of the IoU
of the binary path and the binary sub-architecture (``nad::mask_overlap``, 0/0 = 1).

Ties are shared: a class tied with others at the k-th place counts as the expected hit of a
random tie-break (so a gate point where every class has the same channels scores chance).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from nad_ext.analysis.masks import relative_depth
from nad_ext.gates.maskbank import MaskBank
from nad_ext.gates.pathstore import PathChunk, StoredPaths
from nad_ext.ops.mask_overlap import mask_overlap

BLOCK = 4096  # images per call of mask_overlap: 4096 x 15,168 channels is 62 MB of bool


def _check_bank(bank: MaskBank) -> list[int]:
    """The class of each task; ValueError unless every task has one class and no class two tasks."""
    if not bank.tasks:
        raise ValueError("bank has no tasks")
    if any(len(t.classes) != 1 for t in bank.tasks):
        raise ValueError("bank must have one task per class; it has multi-class tasks")
    classes = [t.classes[0] for t in bank.tasks]
    if len(set(classes)) != len(classes):
        raise ValueError("bank must have one task per class; some class has several tasks")
    return classes


def _as_masks(masks_per_point, bank: MaskBank) -> list[torch.Tensor]:
    """Per gate point of ``bank``, in its order, the (N, C_l) bool paths; a dict is matched by
    gate-point name, a sequence by position."""
    if not isinstance(bank, MaskBank):
        raise TypeError(f"bank must be a MaskBank, got {type(bank).__name__}")
    names, sizes = [p.name for p in bank.gate_points], bank.layer_sizes
    if isinstance(masks_per_point, dict):
        if set(masks_per_point) != set(names):
            raise ValueError(f"masks_per_point has gate points {sorted(masks_per_point)}, the bank has {names}")
        masks = [masks_per_point[n] for n in names]
    else:
        masks = list(masks_per_point)
        if len(masks) != len(names):
            raise ValueError(f"masks_per_point has {len(masks)} gate points, the bank has {len(names)} ({names})"
                             + (" (a PathChunk written to a store keeps no logits: read the store)"
                                if not masks else ""))
    for name, size, m in zip(names, sizes, masks):
        if not isinstance(m, torch.Tensor) or m.dim() != 2 or m.shape[1] != size:
            shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"masks_per_point at gate point {name!r} must be (N, {size}), got {shape}")
        if m.shape[0] != masks[0].shape[0] or m.device != masks[0].device:
            raise ValueError(f"masks_per_point has {m.shape[0]} images on {m.device} at gate point {name!r}, "
                             f"{masks[0].shape[0]} on {masks[0].device} at {names[0]!r}")
    return [m if m.dtype == torch.bool else m > 0 for m in masks]


def path_class_similarity(masks_per_point, bank: MaskBank, *, block: int = BLOCK) -> torch.Tensor:
    """(N, T) float32 on the paths' device: the mean over gate points of the IoU of image n's
    binary path with task t's binary sub-architecture (0/0 = 1, as in
    :func:`nad_ext.analysis.masks.similarity`). ``masks_per_point``: per gate point (N, C_l) bool
    (or gate logits, open where > 0), a list in the bank's order or a dict by name
    (``StoredPaths.masks``). Computed ``block`` images at a time."""
    masks = _as_masks(masks_per_point, bank)
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be an integer >= 1, got {block!r}")
    device = masks[0].device
    tasks = bank.binary().to(device)
    n = masks[0].shape[0]
    out = torch.empty(n, len(bank.tasks), dtype=torch.float32, device=device)
    for lo in range(0, n, block):
        rows = torch.cat([m[lo:lo + block] for m in masks], dim=1)
        out[lo:lo + block] = mask_overlap(rows, tasks, bank.layer_sizes)
    return out


def _select(paths, bank: MaskBank) -> dict:
    """The paths' masks (all images) and, for the images kept (status 0, label with a task), the
    task of their label and prediction (-1: none) and their index."""
    if not isinstance(paths, (PathChunk, StoredPaths)):
        raise TypeError(f"paths must be a PathChunk or StoredPaths, got {type(paths).__name__}")
    masks = _as_masks(paths.masks() if isinstance(paths, PathChunk) else paths.masks, bank)
    classes = _check_bank(bank)
    n = masks[0].shape[0]
    for name in ("label", "prediction", "status", "image_index"):
        if tuple(getattr(paths, name).shape) != (n,):
            raise ValueError(f"paths.{name} must have shape ({n},), got {tuple(getattr(paths, name).shape)}")
    known, order = torch.sort(torch.tensor(classes, dtype=torch.int64))

    def task_of(c):  # the task of each class in c, -1 for a class without one
        at = torch.searchsorted(known, c.cpu().long()).clamp(max=len(known) - 1)
        return torch.where(known[at] == c.cpu(), order[at], -1)
    ok, label_task = paths.status.cpu() == 0, task_of(paths.label)
    keep = ok & (label_task >= 0)
    excluded = {"status": int((~ok).sum()), "no_task": int((ok & (label_task < 0)).sum())}
    if not keep.any():
        raise ValueError(f"paths has no image left of {n}: {excluded['status']} have a status other than 0 (ok) "
                         f"and {excluded['no_task']} a label with no task in the bank")
    return {"masks": masks, "keep": keep, "label_task": label_task[keep], "pred_task": task_of(paths.prediction)[keep],
            "image_index": paths.image_index.cpu()[keep], "classes": classes, "excluded": excluded}


def _similarity(paths, bank: MaskBank, similarity) -> tuple[dict, torch.Tensor]:
    """:func:`_select` and the (kept images, T) similarity on the CPU; ``similarity``: the
    :func:`path_class_similarity` of all the paths' images, if already computed."""
    sel = _select(paths, bank)
    shape = (len(sel["keep"]), len(bank.tasks))
    if similarity is None:
        similarity = path_class_similarity(sel["masks"], bank)
    elif not isinstance(similarity, torch.Tensor) or tuple(similarity.shape) != shape:
        raise ValueError(f"similarity must be the {shape} path_class_similarity of these paths, got "
                         f"{tuple(similarity.shape) if isinstance(similarity, torch.Tensor) else similarity!r}")
    return sel, similarity.cpu()[sel["keep"]]


def _hit(sim: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) float64: the chance that task ``target[n]`` is among the k most similar of row n,
    ties broken at random (0 where the target is -1, no task)."""
    sim = sim.cpu()
    own = sim.gather(1, target.clamp(min=0)[:, None])
    greater, equal = (sim > own).sum(1).double(), (sim == own).sum(1).double()
    hit = ((k - greater) / equal).clamp(0.0, 1.0)
    return torch.where(target >= 0, hit, torch.zeros_like(hit))


def path_to_class(paths, bank: MaskBank, k: int | None = None, *, permutations: int = 10, seed: int = 0,
                  per_image: bool = True, similarity: torch.Tensor | None = None) -> dict:
    """Which class each image's path resembles: the k classes whose sub-architectures are most
    similar to it, and how often they agree with the label and with the original network's
    prediction (``top1_*``, ``topk_*``: shares of the images; ``k`` None: 5, or T if fewer).

    Baselines: ``chance`` (1 / T and k / T, T classes in the bank) and ``permuted`` (the same
    agreements with the labels, and the predictions, shuffled among the images by a generator
    seeded with ``seed``, the mean over ``permutations`` shuffles; None for 0). With
    ``per_image``: ``image_index`` and ``topk_classes`` per image (ties in task order).
    ``similarity``: the :func:`path_class_similarity` of all of ``paths``, if already computed.
    """
    sel, sim = _similarity(paths, bank, similarity)
    T = len(sel["classes"])
    k = min(5, T) if k is None else k
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= T:
        raise ValueError(f"k must be an integer in [1, {T}], got {k!r}")
    if not isinstance(permutations, int) or permutations < 0:
        raise ValueError(f"permutations must be an integer >= 0, got {permutations!r}")
    gen = torch.Generator().manual_seed(seed)
    out, permuted = {"k": k, "classes": T, "images": len(sim), "excluded": sel["excluded"]}, {}
    for what, target in (("label", sel["label_task"]), ("prediction", sel["pred_task"])):
        shuffled = [target[torch.randperm(len(target), generator=gen)] for _ in range(permutations)]
        for name, top in (("top1", 1), ("topk", k)):
            out[f"{name}_{what}"] = float(_hit(sim, target, top).mean())
            permuted[f"{name}_{what}"] = (float(torch.stack([_hit(sim, s, top).mean() for s in shuffled]).mean())
                                          if shuffled else None)
    out["permuted"] = permuted
    out["chance"] = {"top1": 1.0 / T, "topk": k / T}
    out["permutations"], out["seed"] = permutations, seed
    if per_image:
        classes = torch.tensor(sel["classes"])
        out["image_index"] = sel["image_index"].tolist()
        out["topk_classes"] = [row for lo in range(0, len(sim), BLOCK) for row in classes[torch.sort(
            sim[lo:lo + BLOCK], dim=1, descending=True, stable=True).indices[:, :k]].tolist()]
    return out


def misclassified_paths(paths, bank: MaskBank, *, seed: int = 0, similarity: torch.Tensor | None = None) -> dict:
    """Do misclassified images route like the class they are taken for? Among images with
    prediction != label (both with a task), ``share_closer_to_prediction``: the share whose path
    is more similar to the predicted class's sub-architecture than to the true class's (a tie
    counts half; chance 0.5). Contrast, ``correct_share_closer_to_other``: for correctly
    classified images, the same share with a random other class (drawn with ``seed``) in place of
    the prediction. None where there is no such image."""
    sel, sim = _similarity(paths, bank, similarity)
    T = len(sel["classes"])
    label, pred = sel["label_task"], sel["pred_task"]
    wrong = (pred != label) & (pred >= 0)
    right = pred == label

    def closer(rows, other):  # share of rows more similar to task `other` than to the label's
        if not rows.any():
            return None
        a, b = sim[rows, other[rows]], sim[rows, label[rows]]
        return float(((a > b).double() + 0.5 * (a == b).double()).mean())
    gen = torch.Generator().manual_seed(seed)
    other = (label + torch.randint(1, max(T, 2), label.shape, generator=gen)) % T  # never the label itself
    return {"misclassified": int(wrong.sum()), "share_closer_to_prediction": closer(wrong, pred),
            "misclassified_prediction_without_task": int(((pred != label) & (pred < 0)).sum()),
            "correct": int(right.sum()), "correct_share_closer_to_other": closer(right, other) if T > 1 else None,
            "chance": 0.5, "images": len(sim), "excluded": sel["excluded"], "seed": seed}


def layerwise_path_to_class(paths, bank: MaskBank, *, block: int = BLOCK) -> dict:
    """How class-specific the paths are at each gate point alone: the share of images whose
    path, at that gate point, has its highest IoU with their own class's sub-architecture
    (top-1 agreement with the label, ties shared), against chance 1 / T. ``per_gate_point``:
    a list in gate-point order (name, channels, relative depth, agreement)."""
    sel = _select(paths, bank)
    keep, T = sel["keep"], len(sel["classes"])
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be an integer >= 1, got {block!r}")
    label = torch.full((len(keep),), -1, dtype=torch.int64).masked_scatter(keep, sel["label_task"])
    rows, depth = [], relative_depth(len(bank.gate_points))
    for l, (point, m) in enumerate(zip(bank.gate_points, sel["masks"])):
        tasks, hits = bank.logits[l].to(m.device) > 0, []
        for lo in range(0, len(m), block):
            kept = keep[lo:lo + block]
            sim = mask_overlap(m[lo:lo + block], tasks, [point.channels]).cpu()
            hits.append(_hit(sim[kept], label[lo:lo + block][kept], 1))
        rows.append({"gate_point": point.name, "channels": point.channels, "relative_depth": depth[l],
                     "top1_label": float(torch.cat(hits).mean())})
    return {"per_gate_point": rows, "chance": 1.0 / T, "images": int(keep.sum()), "excluded": sel["excluded"]}


# --- the detector ---------------------------------------------------------------------------

def path_outlier_scores(masks_per_point, bank: MaskBank, *, similarity: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) float32: 1 - max over tasks of the path's similarity to the task's sub-architecture;
    high for a path far from every class."""
    sim = path_class_similarity(masks_per_point, bank) if similarity is None else similarity
    if not isinstance(sim, torch.Tensor) or sim.dim() != 2 or sim.shape[1] != len(bank.tasks):
        raise ValueError(f"similarity must be (N, {len(bank.tasks)}), got {tuple(sim.shape)}")
    return 1.0 - sim.amax(1)


def _scores(name: str, s) -> torch.Tensor:
    s = torch.as_tensor(s).detach().cpu().double().flatten()
    if s.numel() == 0:
        raise ValueError(f"{name} must hold at least one score")
    if not torch.isfinite(s).all():
        raise ValueError(f"{name} must be finite")
    return s


def roc_auc(scores_positive, scores_negative) -> float:
    """Area under the ROC curve of a detector that calls high scores positive: the chance that
    a random positive scores above a random negative, ties counting half (Mann-Whitney U from
    the ranks of all scores, tied scores given their mean rank)."""
    pos, neg = _scores("scores_positive", scores_positive), _scores("scores_negative", scores_negative)
    values, inverse, counts = torch.unique(torch.cat([pos, neg]), return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts  # rank - 1 of each distinct value's first occurrence
    mean_rank = first.double() + (counts.double() + 1.0) / 2.0
    rank_sum = mean_rank[inverse[:len(pos)]].sum()
    return float((rank_sum - len(pos) * (len(pos) + 1) / 2.0) / (len(pos) * len(neg)))


def detector_auc(clean_scores, attacked_scores) -> dict:
    """The outlier detector on clean against attacked images (attacked = positive): ROC AUC
    (chance 0.5) and the mean scores."""
    clean, attacked = _scores("clean_scores", clean_scores), _scores("attacked_scores", attacked_scores)
    return {"auc": roc_auc(attacked, clean), "chance": 0.5, "clean": len(clean), "attacked": len(attacked),
            "clean_mean_score": float(clean.mean()), "attacked_mean_score": float(attacked.mean())}


# --- attacks ---------------------------------------------------------------------------------

def _pixel_space(x: torch.Tensor, mean, std):
    """(to pixels, from pixels): identities without ``mean``/``std``."""
    if mean is None and std is None:
        return (lambda v: v), (lambda v: v)
    if mean is None or std is None:
        raise ValueError("mean and std must be given together")
    shape = (1, -1) + (1,) * (x.dim() - 2)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(shape)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(shape)
    if (s <= 0).any():
        raise ValueError("std must be positive")
    return (lambda v: v * s + m), (lambda v: (v - m) / s)


def pgd(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, eps: float,
        alpha: float, steps: int, *, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
        random_start: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected gradient ascent of the cross-entropy of the frozen ``model`` (x -> logits; for
    a GatedModel ``lambda x: gated.original(x, record=False)[0]``) in the L-infinity ball of
    radius ``eps`` around ``x``: ``steps`` steps of ``alpha`` times the gradient's sign, each
    projected back into the ball (``random_start``: from a uniform draw in the ball, with
    ``generator``). Only the input's gradient is computed: the model's parameters and mode are
    left alone (put it in eval mode: BatchNorm in training mode would mix the batch's images).

    Spaces: without ``mean``/``std``, ``eps`` and ``alpha`` are in the space of ``x`` (the
    network's normalised inputs, as :func:`nad_ext.data.imagesets.load_batch` gives them). With
    them (the per-channel normalisation of ``x``: ``nad_ext.data.transforms.IMAGENET_MEAN`` and
    ``IMAGENET_STD`` for load_batch), they are in pixel space [0, 1]: the ball is
    around the pixels x * std + mean, and the pixels are kept in [0, 1]. Returns the perturbed
    images, detached, in the space of ``x``.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError(f"x must be a floating (N, ...) tensor, got {getattr(x, 'shape', x)!r}")
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != (x.shape[0],):
        raise ValueError(f"y must be a ({x.shape[0]},) tensor of labels, got {getattr(y, 'shape', y)!r}")
    for name, v in (("eps", eps), ("alpha", alpha)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    to_pixels, from_pixels = _pixel_space(x, mean, std)
    pixel_range = mean is not None
    origin = to_pixels(x.detach())
    adv = origin.clone()
    if random_start:
        adv = adv + (torch.rand(adv.shape, generator=generator, dtype=adv.dtype) * 2 - 1).to(adv.device) * eps
    for _ in range(steps):
        adv = adv.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(from_pixels(adv)), y)
            grad, = torch.autograd.grad(loss, adv)
        adv = adv.detach() + alpha * grad.sign()
        adv = torch.minimum(torch.maximum(adv, origin - eps), origin + eps)
        if pixel_range:
            adv = adv.clamp(0.0, 1.0)
    return from_pixels(adv).detach()


def fgsm(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, eps: float, *,
         mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> torch.Tensor:
    """The fast gradient sign method: one step of ``eps`` times the sign of the cross-entropy's
    gradient with respect to the input (:func:`pgd` with one step of ``eps``, same spaces)."""
    return pgd(model, x, y, eps, eps, 1, mean=mean, std=std)
