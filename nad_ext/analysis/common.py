"""What the analyses share: the measures' names, the input checks, the sequential
``map_units``."""
from __future__ import annotations

from nad_ext.data.imagesets import ImageSet
from nad_ext.gates.maskbank import MaskBank
from nad_ext.gates.model import GatedModel


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


def _sequential(fn, n: int) -> list:
    """The default ``map_units``: the units in order, in this process."""
    return [fn(u) for u in range(n)]


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


def _one_task_per_class(bank: MaskBank, val_images: ImageSet) -> list[int]:
    """The task index of every class; ValueError unless the bank has exactly one task per class."""
    if any(len(t.classes) != 1 for t in bank.tasks):
        raise ValueError("this analysis needs one task per class; the bank has multi-class tasks")
    owner = {t.classes[0]: i for i, t in enumerate(bank.tasks)}
    if len(owner) != len(bank.tasks) or sorted(owner) != list(range(len(val_images.classes))):
        raise ValueError(f"this analysis needs exactly one task per class of {val_images.name} "
                         f"({len(val_images.classes)} classes); the bank's tasks cover classes {sorted(owner)}")
    return [owner[c] for c in range(len(val_images.classes))]
