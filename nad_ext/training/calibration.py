"""Beta calibration: the sparsity weight that gives a chosen mean open ratio.

The paper's beta spans 0.02 (ResNet50, DenseNet121) to 5.0 (VGG16 on Places365): it depends
on the network, and a network nobody has disentangled has none. The open ratio of the learnt
sub-architectures falls as beta grows, so beta can be searched for: :func:`search_beta`
bisects log(beta) on a measuring function (in practice a short NAD run on a few tasks, see
:func:`calibrate_beta`) until the open ratio is within ``tolerance`` of the
target or the run budget is spent, and returns the beta whose measured ratio came closest with
the whole curve, so that the bank can say how its beta was found.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from nad_ext.data import ImageSet
from nad_ext.gates.maskbank import Task
from nad_ext.training.build import Network
from nad_ext.training.config import DEFAULT_TARGET, NADConfig, check_target, default_tasks, task_indices
from nad_ext.training.loop import train_in_memory

METHOD = "bisection in log(beta)"
DEFAULT_BRACKET = (0.02, 5.0)  # the paper's betas span this range


@dataclass
class CalibrationSettings:
    """How :func:`calibrate_beta` measures: ``num_tasks`` tasks spread over the task list,
    ``images_per_task`` training images each (None: all), ``epochs`` per run (None: the run's),
    at most ``runs`` runs, stopping within ``tolerance`` of the target, the search starting
    from ``bracket`` (the paper's range of betas)."""

    num_tasks: int = 3
    images_per_task: int | None = None
    epochs: int | None = None
    runs: int = 6
    tolerance: float = 0.03
    bracket: tuple[float, float] = DEFAULT_BRACKET


def search_beta(measure: Callable[[float], float], target: float = DEFAULT_TARGET, *,
                bracket: tuple[float, float] = DEFAULT_BRACKET, runs: int = 6, tolerance: float = 0.03,
                log: Callable[[str], None] | None = print) -> dict:
    """Finds beta with ``measure(beta)`` (an open ratio, falling with beta) near ``target``.

    Measures both ends of ``bracket`` first; while the target lies outside, the bracket is
    widened tenfold on that side. Then bisects in log space (the geometric mean of the
    bracket), keeping the half that holds the target, until a measurement is within
    ``tolerance`` or ``runs`` measurements are spent. Each measurement is logged as it comes.

    Returns ``{"beta", "open_ratio", "target_open_ratio", "method", "tolerance", "runs",
    "converged", "curve": [[beta, open ratio], ...] (sorted by beta)}``; ``beta`` is the
    measured beta whose ratio was closest to the target.
    """
    check_target(target)
    low, high = bracket
    if not 0 < low < high or not math.isfinite(high):
        raise ValueError(f"bracket must be two betas 0 < low < high, got {bracket!r}")
    if not isinstance(runs, int) or runs < 2:
        raise ValueError(f"runs must be an integer >= 2 (the two ends of the bracket), got {runs!r}")
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance must lie in (0, 1), got {tolerance!r}")
    curve: dict[float, float] = {}

    def at(beta: float) -> float:
        ratio = float(measure(beta))
        curve[beta] = ratio
        if log is not None:
            log(f"  beta {beta:10.4g}   open ratio {ratio:.3f}   ({len(curve)}/{runs})")
        return ratio

    close = lambda r: abs(r - target) <= tolerance  # noqa: E731
    r_low, r_high = at(low), at(high)
    while not (close(r_low) or close(r_high)) and len(curve) < runs and (r_low < target or r_high > target):
        if r_low < target:  # even the smallest beta closes too much
            low, high, r_high = low / 10, low, r_low
            r_low = at(low)
        else:  # even the largest keeps too much open
            low, high, r_low = high, high * 10, r_high
            r_high = at(high)
    while len(curve) < runs and not any(close(r) for r in curve.values()) and r_low >= target >= r_high:
        mid = math.sqrt(low * high)
        ratio = at(mid)
        if ratio > target:
            low, r_low = mid, ratio
        else:
            high, r_high = mid, ratio
    beta = min(curve, key=lambda b: (abs(curve[b] - target), b))
    return {
        "beta": beta,
        "open_ratio": curve[beta],
        "target_open_ratio": float(target),
        "method": METHOD,
        "tolerance": tolerance,
        "runs": len(curve),
        "converged": close(curve[beta]),
        "curve": [[b, curve[b]] for b in sorted(curve)],
    }


def calibrate_beta(
    network: Network,
    train: ImageSet,
    *,
    target_open_ratio: float | None = None,
    tasks: Sequence[Task] | None = None,
    config: NADConfig | None = None,
    settings: CalibrationSettings | None = None,
    progress: bool = True,
) -> dict:
    """The beta whose sub-architectures keep about ``target_open_ratio`` of the gates open.

    Short NAD runs (``config``'s settings, ``settings.epochs`` epochs) on a few of the tasks
    (``settings.num_tasks``, evenly spread over ``tasks``, default one per class) with at most
    ``settings.images_per_task`` images each; the open ratio of a run is the fraction of all
    their gates open at its end (logit > 0). :func:`search_beta` bisects
    log(beta) over such runs. The ratio after a run depends on how many updates it made, so
    runs shorter than the real one find a larger beta than it needs: match the epochs where
    the budget allows.

    Under torchrun every rank runs the same short runs in its own process
    (:func:`nad_ext.training.loop.train_in_memory`).

    Returns the search's record (beta, achieved open ratio, the curve, ...) plus the settings
    used; :func:`nad_ext.training.driver.disentangle` stores it in the bank (``MaskBank.calibration``).
    """
    config = NADConfig(**asdict(config)) if config is not None else NADConfig()
    settings = settings or CalibrationSettings()
    target = config.target_open_ratio if target_open_ratio is None else target_open_ratio
    check_target(target)
    if not isinstance(settings.num_tasks, int) or settings.num_tasks < 1:
        raise ValueError(f"num_tasks must be a positive integer, got {settings.num_tasks!r}")
    if settings.images_per_task is not None and (not isinstance(settings.images_per_task, int)
                                                 or settings.images_per_task < 1):
        raise ValueError(f"images_per_task must be None or a positive integer, got {settings.images_per_task!r}")
    tasks = list(tasks) if tasks is not None else default_tasks(train)
    count = min(settings.num_tasks, len(tasks))
    picked = [tasks[round(i * (len(tasks) - 1) / max(count - 1, 1))] for i in range(count)]
    images = train
    if settings.images_per_task is not None:
        gen = torch.Generator().manual_seed(config.seed)
        keep = []
        for idx in task_indices(train, picked):
            keep += [idx[i] for i in torch.randperm(len(idx), generator=gen)[: settings.images_per_task].tolist()]
        images = train.subset(sorted(set(keep)))
    # Updates per task (each moves a gate point's logits by lr): the open ratio depends on them.
    batches = lambda imgs: sum(-(-len(i) // config.batch_size) for i in task_indices(imgs, picked)) / count  # noqa: E731
    run_updates = config.epochs * batches(train)
    config.epochs = settings.epochs or config.epochs
    updates = config.epochs * batches(images)
    config.tasks_per_step, config.keep_every_epoch, config.mode = count, False, "batched"
    if progress:
        each = "all" if settings.images_per_task is None else f"<= {settings.images_per_task}"
        print(f"calibrating beta for {network.model_id}: target open ratio {target:.2f}; runs of {config.epochs} "
              f"epoch(s) on {count} task(s) ({', '.join(t.name for t in picked)}), {each} images each")
        if updates < 0.9 * run_updates:
            print(f"  note: {updates:.0f} updates per task against {run_updates:.0f} in the full run; fewer updates "
                  "move the gates less, so the beta found tends to be larger than the full run needs")

    def open_ratio(beta: float) -> float:
        config.beta = beta
        bank = train_in_memory(network, images, tasks=picked, config=config)
        return float(bank.binary().float().mean())

    found = search_beta(open_ratio, target, bracket=settings.bracket, runs=settings.runs,
                        tolerance=settings.tolerance, log=print if progress else None)
    if progress:
        print(f"beta = {found['beta']:.4g} (open ratio {found['open_ratio']:.3f}, target {target:.2f}"
              f"{'' if found['converged'] else ', not within the tolerance: more runs or a wider bracket'})")
    return {**found, "tasks": [t.name for t in picked], "epochs": config.epochs,
            "images_per_task": settings.images_per_task, "bracket": list(settings.bracket),
            "updates_per_task": updates, "run_updates_per_task": run_updates}
