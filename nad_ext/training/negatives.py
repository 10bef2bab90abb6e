"""Negatives of the selective objective: images of other classes added to a task's batches.

The selective variant (``NADConfig(negatives=r, negative_weight=gamma)``, see
:mod:`nad_ext.training.objective`) joins each batch of task t's own images with round(r x batch
size) images of the classes that are not t's, routed through t's gates. They are drawn here
from the task's own seeded generator, right after its epoch permutation and before any
augmentation, so a task's batches (own images, negatives and augmentations) do not depend on
which other tasks share its steps. With r = 0 nothing is drawn and the generator is left
untouched: the paper's batches are unchanged.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


def negatives_per_batch(batch_len: int, ratio: float) -> int:
    """round(ratio x batch_len), halves rounded up (16 images and r = 0.5 give 8 negatives)."""
    return int(math.floor(batch_len * ratio + 0.5))


def draw_negatives(own: Sequence[int], num_images: int, count: int, generator: torch.Generator) -> list[int]:
    """``count`` image indices drawn uniformly, with replacement, from ``range(num_images)``
    minus ``own`` (the task's images, sorted ascending), with one call on ``generator``.

    Nothing is materialised per task but ``own``: the u-th image outside ``own`` is
    u + #{i : own[i] - i <= u}, so a task of ImageNet costs O(|own| + count log |own|).
    """
    pool = num_images - len(own)
    if pool <= 0:
        raise ValueError("the task's classes cover every training image: it has no other classes to draw "
                         "negatives from (use negatives=0 for this task set)")
    if count == 0:
        return []
    u = torch.randint(pool, (count,), generator=generator)
    own_t = torch.as_tensor(list(own), dtype=torch.int64)
    shift = own_t - torch.arange(len(own_t))
    return (u + torch.searchsorted(shift, u, right=True)).tolist()


def add_negatives(batches: list[list[int]], own: Sequence[int], num_images: int, ratio: float,
                  generator: torch.Generator) -> list[list[int]]:
    """Each batch of own-image indices followed by its negatives (round(ratio x its length))."""
    counts = [negatives_per_batch(len(b), ratio) for b in batches]
    drawn = draw_negatives(own, num_images, sum(counts), generator)
    out, start = [], 0
    for batch, n in zip(batches, counts):
        out.append(list(batch) + drawn[start: start + n])
        start += n
    return out


def task_class_matrix(task_classes: Sequence[Sequence[int]], num_classes: int,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """(T, num_classes) bool: class c belongs to task t. A sample of task t whose label is not
    one of t's classes is one of t's negatives; the objective reads p_t from these outputs."""
    matrix = torch.zeros(len(task_classes), num_classes, dtype=torch.bool)
    for t, classes in enumerate(task_classes):
        matrix[t, list(classes)] = True
    return matrix.to(device)
