"""What the binary sub-architectures predict: own-class accuracy and false positives
against the original network, and whether the network's confusions follow the similarity of
sub-architectures."""
from __future__ import annotations

import math

import numpy as np
import torch

from nad_ext._utils import progress as nad_progress
from nad_ext.analysis.common import (FALSE_POSITIVES, MEASURES_MEANING, OWN_CLASS_ACCURACY, _check_inputs,
                                     _one_task_per_class, _sequential)
from nad_ext.analysis.masks import similarity
from nad_ext.data.imagesets import ImageSet, load_batch
from nad_ext.gates.maskbank import MaskBank
from nad_ext.gates.model import GatedModel


@torch.no_grad()
def masked_accuracy(gated: GatedModel, bank: MaskBank, val_images: ImageSet, image_size: int,
                    batch_size: int = 64, device: str = "cpu", other_images_per_class: int | None = None,
                    map_units=_sequential, progress: bool = False, binary: bool = True) -> dict:
    """Each task's binary sub-architecture against the original network, on validation images
    (``binary`` False: its soft gates, sigmoid(m / the gated model's temperature), as trained).

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
                       binary=binary)[0].argmax(1).cpu() for lo in range(0, len(tasks), batch_size)]
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
