"""The fidelity check: does each task's binary sub-architecture still do its task?

A run can end with sub-architectures that mean nothing: with too large a beta every gate of a
layer closes and the masked network answers the same class for every image, yet training
finishes without a word (issue 27's plain CNN: balanced accuracy 52% at beta 1, 83% at 0.1).
After the last epoch, :func:`measure_fidelity` runs each task's *binary* sub-architecture (the
gates kept, sigmoid(m) > 0.5) on a small seeded sample: images of the task's classes and of
other classes, from the validation split when the run has one, else from the training images.
Per task it records:

- ``own_class_accuracy``: the share of own-class images predicted as one of the task's classes
  (``original_own_class_accuracy``: the same for the original network on the same images);
- ``false_positive_rate``: the share of other-class images predicted as one of the task's
  classes (``original_false_positive_rate`` likewise), and ``balanced_accuracy``, their mean
  (own-class accuracy + 1 - false positives) / 2;
- ``top_answer_share``: the share of all its answers taken by its most frequent class;
  ``constant``: that share is at least ``constant_share`` (it answers the same for every image).

:func:`flagged_tasks` names the tasks whose sub-architecture is constant or keeps less than
``min_kept`` of the original's own-class accuracy, and :func:`warning_text` says what to try (a
smaller beta). The driver stores the figures in the bank (``MaskBank.fidelity``) and the last
epoch's log.json entry, and warns; beta calibration by fidelity
(:func:`nad_ext.training.calibration.calibrate_beta`) reads the same figures.

Cost: ``tasks x (images_per_task + other_images)`` masked forwards and as many original ones,
in batches: for 1,000 tasks at the defaults, 80,000 images, a few percent of one ImageNet epoch.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from nad_ext.data.imagesets import ImageSet, load_batch
from nad_ext.gates.maskbank import Task
from nad_ext.gates.model import GatedModel

# The per-task figures, as lists over the run's tasks in the last epoch's log entry (prefixed
# "fidelity_" there) and in MaskBank.fidelity.
FIGURES = ("own_class_accuracy", "false_positive_rate", "balanced_accuracy", "original_own_class_accuracy",
           "original_false_positive_rate", "top_answer_share", "constant", "images", "other_images")
LOG_PREFIX = "fidelity_"


@dataclass(frozen=True)
class FidelitySettings:
    """How the fidelity check samples and judges.

    Args:
        images_per_task: images of the task's own classes (fewer when it has fewer).
        other_images: images of the other classes, per task, drawn over all of them.
        min_kept: a task is flagged when its own-class accuracy is below this share of the
            original network's on the same images.
        constant_share: a sub-architecture is constant when one class takes at least this share
            of its answers.
        batch_size: images per forward pass.
        seed: the samples' seed (per task: ``seed`` and the task's index).
    """

    images_per_task: int = 16
    other_images: int = 64
    min_kept: float = 0.5
    constant_share: float = 0.95
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self):
        for name in ("images_per_task", "other_images", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name != "other_images" else 0):
                raise ValueError(f"FidelitySettings.{name} must be a positive integer, got {value!r}")
        for name in ("min_kept", "constant_share"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ValueError(f"FidelitySettings.{name} must lie in (0, 1], got {value!r}")


def _sample(images: ImageSet, task: Task, index: int, settings: FidelitySettings) -> tuple[list[int], list[int]]:
    """(own, other): seeded samples of the images of ``task``'s classes and of the others."""
    labels = torch.tensor(images.labels)
    own_mask = torch.isin(labels, torch.tensor(task.classes))
    gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + index)
    own, other = own_mask.nonzero().flatten(), (~own_mask).nonzero().flatten()
    own = own[torch.randperm(len(own), generator=gen)[: settings.images_per_task]]
    other = other[torch.randperm(len(other), generator=gen)[: settings.other_images]]
    return sorted(own.tolist()), sorted(other.tolist())


@torch.no_grad()
def measure_fidelity(gated: GatedModel, tasks: Sequence[Task], which: Sequence[int], images: ImageSet,
                     image_size: int, settings: FidelitySettings | None = None) -> dict[str, list]:
    """The figures of :data:`FIGURES` for tasks ``which`` (indices into ``tasks``, whose gates
    ``gated`` holds): ``{figure: [value per task]}`` over all ``len(tasks)`` tasks, None for
    tasks not in ``which``. Rates are NaN where a task has no such images."""
    settings = settings or FidelitySettings()
    if len(images) == 0:
        raise ValueError("the fidelity check needs images: the image set is empty")
    device = gated.logits[0].device
    pairs = []  # (task, image, own?)
    for t in which:
        own, other = _sample(images, tasks[t], t, settings)
        pairs += [(t, i, True) for i in own] + [(t, i, False) for i in other]
    num_outputs = None
    answers, original = [], []
    known = {}  # image -> the original network's prediction (an image recurs across tasks' samples)
    modes = [(m, m.training) for m in gated.modules()]  # restored exactly: the user's network stays as it was
    gated.eval()
    kept = []  # the pairs whose image could be read
    try:
        for lo in range(0, len(pairs), settings.batch_size):
            chunk = pairs[lo: lo + settings.batch_size]
            try:
                x = load_batch(images, [i for _, i, _ in chunk], image_size)[0]
            except ValueError:  # an unreadable image (training skipped it too): left out of the sample
                chunk = [p for p in chunk if _readable(images, p[1], image_size)]
                if not chunk:
                    continue
                x = load_batch(images, [i for _, i, _ in chunk], image_size)[0]
            kept += chunk
            x = x.to(device)
            ids = torch.tensor([t for t, _, _ in chunk], device=device)
            new = [k for k, (_, i, _) in enumerate(chunk) if i not in known]
            if new:
                out = gated.original(x[new], record=False)[0]
                num_outputs = out.shape[1]
                known.update(zip((chunk[k][1] for k in new), out.argmax(1).cpu().tolist()))
            original.append(torch.tensor([known[i] for _, i, _ in chunk], dtype=torch.long))
            answers.append(gated(x, ids, binary=True)[0].argmax(1).cpu())
    finally:
        for m, training in modes:
            m.training = training
    pairs = kept
    answers = torch.cat(answers) if answers else torch.zeros(0, dtype=torch.long)
    original = torch.cat(original) if original else torch.zeros(0, dtype=torch.long)
    result = {k: [None] * len(tasks) for k in FIGURES}
    pair_task = torch.tensor([t for t, _, _ in pairs], dtype=torch.long)
    pair_own = torch.tensor([o for _, _, o in pairs], dtype=torch.bool)
    for t in which:
        sel = pair_task == t
        classes = torch.tensor([c for c in tasks[t].classes if num_outputs is None or c < num_outputs])
        own, other = sel & pair_own, sel & ~pair_own
        hit, orig_hit = torch.isin(answers, classes), torch.isin(original, classes)
        rate = lambda h, m: float(h[m].float().mean()) if m.any() else None  # noqa: E731
        own_acc, fp = rate(hit, own), rate(hit, other)
        given = answers[sel]
        top = int(torch.bincount(given).max()) / len(given) if len(given) else None
        values = {
            "own_class_accuracy": own_acc, "false_positive_rate": fp,
            "balanced_accuracy": None if own_acc is None or fp is None else (own_acc + 1.0 - fp) / 2.0,
            "original_own_class_accuracy": rate(orig_hit, own), "original_false_positive_rate": rate(orig_hit, other),
            "top_answer_share": top,
            # One answer for images of several classes (with a single class shown, a constant is no news).
            "constant": bool(top is not None and top >= settings.constant_share and own.any() and other.any()),
            "images": int(own.sum()), "other_images": int(other.sum()),
        }
        for k, v in values.items():
            result[k][t] = v
    return result


def _readable(images: ImageSet, index: int, image_size: int) -> bool:
    try:
        load_batch(images, [index], image_size)
        return True
    except ValueError:
        return False


def flagged_tasks(figures: dict[str, list], task_names: Sequence[str], settings: FidelitySettings | None = None
                  ) -> list[tuple[str, str]]:
    """``(task, why)`` for each measured task whose sub-architecture is constant or keeps less than
    ``settings.min_kept`` of the original network's own-class accuracy."""
    settings = settings or FidelitySettings()
    found = []
    for t, name in enumerate(task_names):
        own, orig = figures["own_class_accuracy"][t], figures["original_own_class_accuracy"][t]
        if own is None:
            continue
        if figures["constant"][t]:
            found.append((name, f"constant: {figures['top_answer_share'][t]:.0%} of its answers are one class"))
        elif orig is not None and orig > 0 and own < settings.min_kept * orig:
            found.append((name, f"own-class accuracy {own:.0%} against the original's {orig:.0%}"))
    return found


def warning_text(flagged: Sequence[tuple[str, str]], beta, num_tasks: int, calibrated: bool = False) -> str:
    """The warning for :func:`flagged_tasks`'s result: which tasks, why, and what to try."""
    shown = "; ".join(f"{name!r} ({why})" for name, why in flagged[:5])
    more = f"; and {len(flagged) - 5} more" if len(flagged) > 5 else ""
    smaller = f"a smaller beta than {beta:g}" if isinstance(beta, (int, float)) else "a smaller beta"
    how = ("beta was calibrated on a few tasks only" if calibrated else
           "or --beta auto (beta='auto'), which chooses the largest beta that passes this check on a few tasks")
    return (f"{len(flagged)} of {num_tasks} sub-architectures do not do their task: {shown}{more}. Their gates "
            f"close too much: try {smaller} (e.g. a tenth); {how}. "
            "The figures are in the bank (MaskBank.fidelity) and log.json")


def bank_record(figures: dict[str, list], task_names: Sequence[str], source: str,
                settings: FidelitySettings) -> dict:
    """What the bank stores (``MaskBank.fidelity``): the figures per task, where the images came
    from, the settings and the flagged tasks."""
    flagged = flagged_tasks(figures, task_names, settings)
    return {"tasks": list(task_names), **{k: list(figures[k]) for k in FIGURES}, "images_from": source,
            "settings": asdict(settings), "flagged": [[name, why] for name, why in flagged]}


def log_entry(figures: dict[str, list]) -> dict:
    """The figures as the log entry's per-task lists (``fidelity_<figure>``)."""
    return {LOG_PREFIX + k: list(v) for k, v in figures.items()}


def from_log_entry(entry: dict) -> dict[str, list] | None:
    """The figures of a log entry written by :func:`log_entry` (None when it has none)."""
    if LOG_PREFIX + FIGURES[0] not in entry:
        return None
    return {k: list(entry[LOG_PREFIX + k]) for k in FIGURES}


class FidelityWarning(UserWarning):
    """Sub-architectures that do not do their task (constant, or far below the original)."""


@dataclass
class FidelityCheck:
    """The check a run makes after its last epoch: ``images`` (the validation split when there is
    one, else the training images; ``source`` says which) sampled as ``settings`` says."""

    images: ImageSet
    source: str = "training images"
    settings: FidelitySettings = FidelitySettings()

    def run(self, gated: GatedModel, tasks: Sequence[Task], which: Sequence[int], image_size: int, stats: dict,
            progress: bool) -> dict:
        """Measures tasks ``which``; adds their figures to the epoch's log entry ``stats`` and
        returns the bank's record (complete in a world of one; under torchrun rank 0 completes it
        from every rank's figures, :func:`nad_ext.training.commit.assemble`)."""
        if progress:
            n = self.settings.images_per_task + self.settings.other_images
            print(f"fidelity check: each task's binary sub-architecture on up to {n} {self.source} "
                  f"({self.settings.images_per_task} of its classes, {self.settings.other_images} of others)")
        figures = measure_fidelity(gated, tasks, which, self.images, image_size, self.settings)
        stats.update(log_entry(figures))
        return bank_record(figures, [t.name for t in tasks], self.source, self.settings)

    def warn(self, bank) -> None:
        """Warns (:class:`FidelityWarning`) when the bank's record flags tasks."""
        flagged = [tuple(f) for f in bank.fidelity.get("flagged", [])]
        if flagged:
            warnings.warn(warning_text(flagged, bank.config.get("beta"), len(bank.tasks), bank.calibration is not None),
                          FidelityWarning, stacklevel=3)


def complete_record(partial: dict, entry: dict) -> dict:
    """A bank record whose figures come from an assembled log ``entry`` (every rank's tasks)."""
    return bank_record(from_log_entry(entry), partial["tasks"], partial["images_from"],
                       FidelitySettings(**partial["settings"]))
