"""Beta calibration: the sparsity weight chosen by short runs.

The paper's beta spans 0.02 (ResNet50, DenseNet121) to 5.0 (VGG16 on Places365): it depends
on the network, and a network nobody has disentangled has none. As beta grows the learnt
sub-architectures keep fewer gates, and past some beta they stop doing their task (a layer
closes, every image gets the same answer). :func:`calibrate_beta` runs short NAD runs on a few
tasks and searches log(beta) by one of two criteria (``CalibrationSettings.criterion``):

- ``"fidelity"`` (the default, :func:`search_beta_by_fidelity`): the largest beta whose binary
  sub-architectures keep their own-class accuracy within ``accuracy_tolerance`` of the original
  network's and are not constant (the fidelity check, :mod:`nad_ext.training.fidelity`): the
  sparsest sub-architectures that still do their task;
- ``"open_ratio"`` (:func:`search_beta`): the beta whose mean open ratio is nearest a target.

Either way the bank records how its beta was found, with the whole curve.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from nad_ext.data import ImageSet
from nad_ext.gates.maskbank import Task
from nad_ext.training.build import Network
from nad_ext.training.config import DEFAULT_TARGET, NADConfig, check_target, default_tasks, task_indices
from nad_ext.training.fidelity import FidelityCheck, FidelitySettings, FidelityWarning
from nad_ext.training.loop import train_in_memory

METHOD = "bisection in log(beta)"
FIDELITY_METHOD = "largest beta that keeps the task, bisection in log(beta)"
DEFAULT_BRACKET = (0.02, 5.0)  # the paper's betas span this range
CRITERIA = ("fidelity", "open_ratio")


@dataclass
class CalibrationSettings:
    """How :func:`calibrate_beta` measures: ``num_tasks`` tasks spread over the task list,
    ``images_per_task`` training images each (None: all), ``epochs`` per run (None: the run's),
    at most ``runs`` runs, the search starting from ``bracket`` (the paper's range of betas).

    ``criterion`` "fidelity" (default): the largest beta whose sub-architectures keep their
    own-class accuracy within ``accuracy_tolerance`` of the original's and are not constant,
    measured as ``fidelity`` says; "open_ratio": the beta whose open ratio is within
    ``tolerance`` of the target (``NADConfig.target_open_ratio``)."""

    num_tasks: int = 3
    images_per_task: int | None = None
    epochs: int | None = None
    runs: int = 6
    tolerance: float = 0.03
    bracket: tuple[float, float] = DEFAULT_BRACKET
    criterion: str = "fidelity"
    accuracy_tolerance: float = 0.05
    fidelity: FidelitySettings = FidelitySettings()


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


def search_beta_by_fidelity(measure: Callable[[float], dict], *, bracket: tuple[float, float] = DEFAULT_BRACKET,
                            runs: int = 6, log: Callable[[str], None] | None = print) -> dict:
    """The largest beta for which ``measure(beta)["keeps_task"]`` holds.

    ``measure(beta)`` is a dict with ``keeps_task`` (bool: the sub-architectures still do their
    task; it holds below some beta and fails above it), ``open_ratio`` and
    ``balanced_accuracy``. Measures both ends of ``bracket``; while both keep the task the
    bracket is widened tenfold upwards, while neither does tenfold downwards; then bisects in
    log space between the largest beta that keeps the task and the smallest above it that does
    not, until ``runs`` measurements are spent or the two are within 20% of each other.

    Returns ``{"beta", "method", "runs", "converged", "curve": [[beta, open ratio, balanced
    accuracy, keeps task], ...] (sorted by beta), "open_ratio", "balanced_accuracy"}``:
    ``beta`` is the largest measured beta that keeps the task; when none does, the one with the
    fewest constant sub-architectures (``measure(beta)["constant"]``, a count, when given), then
    the best balanced accuracy (``converged`` False). ``converged``: a beta that keeps the task
    was found below one that does not.
    """
    low, high = bracket
    if not 0 < low < high or not math.isfinite(high):
        raise ValueError(f"bracket must be two betas 0 < low < high, got {bracket!r}")
    if not isinstance(runs, int) or runs < 2:
        raise ValueError(f"runs must be an integer >= 2 (the two ends of the bracket), got {runs!r}")
    curve: dict[float, dict] = {}

    def at(beta: float) -> bool:
        m = measure(beta)
        curve[beta] = m
        if log is not None:
            log(f"  beta {beta:10.4g}   open ratio {m['open_ratio']:.3f}   balanced accuracy "
                f"{_fmt(m['balanced_accuracy'])}   {'keeps' if m['keeps_task'] else 'loses'} the task"
                f"{'' if not m.get('why') else ' (' + m['why'] + ')'}   ({len(curve)}/{runs})")
        return m["keeps_task"]

    ok_low, ok_high = at(low), at(high)
    while len(curve) < runs and (ok_high or not ok_low):
        if ok_high:  # even the largest keeps the task: look higher
            low, high = high, high * 10
            ok_low, ok_high = True, at(high)
        else:  # even the smallest loses it: look lower
            low, high = low / 10, low
            ok_low, ok_high = at(low), False
    while len(curve) < runs and ok_low and not ok_high and high / low > 1.2:
        mid = math.sqrt(low * high)
        if at(mid):
            low = mid
        else:
            high = mid
    keeping = [b for b, m in curve.items() if m["keeps_task"]]
    if keeping:
        beta = max(keeping)
    else:  # the tie-breaker: fewest constant sub-architectures, then the best balanced accuracy
        beta = max(curve, key=lambda b: (-curve[b].get("constant", 0), _or(curve[b]["balanced_accuracy"], -1.0), -b))
    converged = bool(keeping) and any(b > beta and not m["keeps_task"] for b, m in curve.items())
    return {
        "beta": beta,
        "open_ratio": curve[beta]["open_ratio"],
        "balanced_accuracy": curve[beta]["balanced_accuracy"],
        "method": FIDELITY_METHOD,
        "runs": len(curve),
        "converged": converged,
        "curve": [[b, curve[b]["open_ratio"], curve[b]["balanced_accuracy"], curve[b]["keeps_task"]]
                  for b in sorted(curve)],
    }


def _or(value, default):
    return default if value is None else value


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def keeps_task(record: dict, which: Sequence[int], tolerance: float) -> tuple[bool, str]:
    """Whether the sub-architectures of tasks ``which`` in a fidelity record all keep their
    own-class accuracy within ``tolerance`` of the original's and are not constant; and if not,
    why (the first task that does not)."""
    for t in which:
        own, orig = record["own_class_accuracy"][t], record["original_own_class_accuracy"][t]
        name = record["tasks"][t]
        if record["constant"][t]:
            return False, f"{name!r} constant"
        if own is not None and orig is not None and own < orig - tolerance:
            return False, f"{name!r} own-class accuracy {own:.0%} against {orig:.0%}"
    return True, ""


def calibrate_beta(
    network: Network,
    train: ImageSet,
    *,
    target_open_ratio: float | None = None,
    tasks: Sequence[Task] | None = None,
    config: NADConfig | None = None,
    settings: CalibrationSettings | None = None,
    progress: bool = True,
    check_images: ImageSet | None = None,
) -> dict:
    """beta by short runs: by default the largest beta whose sub-architectures still do their
    task (``settings.criterion`` "fidelity"), or the one that keeps about ``target_open_ratio``
    of the gates open ("open_ratio").

    Short NAD runs (``config``'s settings, ``settings.epochs`` epochs) on a few of the tasks
    (``settings.num_tasks``, evenly spread over ``tasks``, default one per class) with at most
    ``settings.images_per_task`` images each. "fidelity": after each run the fidelity check
    (:mod:`nad_ext.training.fidelity`, on ``check_images``, default ``train``) says whether every
    task's binary sub-architecture keeps its own-class accuracy within
    ``settings.accuracy_tolerance`` of the original network's and is not constant;
    :func:`search_beta_by_fidelity` looks for the largest beta that does. "open_ratio": the open
    ratio of a run is the fraction of all their gates open at its end (logit > 0);
    :func:`search_beta` bisects log(beta) over such runs. What a run ends with depends on how
    many updates it made, so runs shorter than the real one find a larger beta than it needs:
    match the epochs where the budget allows.

    Under torchrun every rank runs the same short runs in its own process
    (:func:`nad_ext.training.loop.train_in_memory`).

    Returns the search's record (beta, achieved open ratio, the curve, ...) plus the settings
    used; :func:`nad_ext.training.driver.disentangle` stores it in the bank (``MaskBank.calibration``).
    """
    config = NADConfig(**asdict(config)) if config is not None else NADConfig()
    settings = settings or CalibrationSettings()
    if settings.criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, got {settings.criterion!r}")
    if not 0 <= settings.accuracy_tolerance < 1:
        raise ValueError(f"accuracy_tolerance must lie in [0, 1), got {settings.accuracy_tolerance!r}")
    by_fidelity = settings.criterion == "fidelity"
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
        aim = (f"the largest beta whose sub-architectures keep their own-class accuracy within "
               f"{settings.accuracy_tolerance * 100:.0f} points of the original's and are not constant") if by_fidelity \
            else f"target open ratio {target:.2f}"
        print(f"calibrating beta for {network.model_id}: {aim}; runs of {config.epochs} "
              f"epoch(s) on {count} task(s) ({', '.join(t.name for t in picked)}), {each} images each")
        if updates < 0.9 * run_updates:
            print(f"  note: {updates:.0f} updates per task against {run_updates:.0f} in the full run; fewer updates "
                  "move the gates less, so the beta found tends to be larger than the full run needs")

    log = print if progress else None
    extra = {"tasks": [t.name for t in picked], "epochs": config.epochs, "images_per_task": settings.images_per_task,
             "bracket": list(settings.bracket), "updates_per_task": updates, "run_updates_per_task": run_updates,
             "criterion": settings.criterion}
    if by_fidelity:
        source = "validation images" if check_images is not None else "training images"
        check = FidelityCheck(check_images if check_images is not None else train, source, settings.fidelity)

        def fidelity(beta: float) -> dict:
            config.beta = beta
            bank = train_in_memory(network, images, tasks=picked, config=config, check=check)
            keeps, why = keeps_task(bank.fidelity, range(count), settings.accuracy_tolerance)
            balanced = [b for b in bank.fidelity["balanced_accuracy"] if b is not None]
            return {"keeps_task": keeps, "why": why, "open_ratio": float(bank.binary().float().mean()),
                    "balanced_accuracy": sum(balanced) / len(balanced) if balanced else None,
                    "constant": sum(bool(c) for c in bank.fidelity["constant"][:count])}

        found = search_beta_by_fidelity(fidelity, bracket=settings.bracket, runs=settings.runs, log=log)
        if not any(row[3] for row in found["curve"]):
            shorter = (f"; its runs made {updates:.0f} updates per task against {run_updates:.0f} in the full run, "
                       "and shorter runs leave sub-architectures that a full run would not"
                       if updates < 0.9 * run_updates else "")
            warnings.warn(f"beta calibration by fidelity: no beta of {len(found['curve'])} short runs "
                          f"({found['curve'][0][0]:.3g} to {found['curve'][-1][0]:.3g}) kept every calibration task "
                          f"(own-class accuracy within {settings.accuracy_tolerance * 100:.0f} points of the original's, "
                          f"not constant){shorter}; beta {found['beta']:.4g} has the fewest constant "
                          "sub-architectures. Give calibration the run's epochs (CalibrationSettings(epochs=None)), "
                          "more runs or a wider bracket, or pass a beta", FidelityWarning, stacklevel=2)
        if progress:
            print(f"beta = {found['beta']:.4g} (open ratio {found['open_ratio']:.3f}, balanced accuracy "
                  f"{_fmt(found['balanced_accuracy'])}" + ("" if found["converged"] else
                  ": no measured beta was both kept and followed by a lost one: more runs or a wider bracket") + ")")
        return {**found, "accuracy_tolerance": settings.accuracy_tolerance, "images_from": source,
                "fidelity_settings": asdict(settings.fidelity), **extra}

    def open_ratio(beta: float) -> float:
        config.beta = beta
        bank = train_in_memory(network, images, tasks=picked, config=config)
        return float(bank.binary().float().mean())

    found = search_beta(open_ratio, target, bracket=settings.bracket, runs=settings.runs,
                        tolerance=settings.tolerance, log=log)
    if progress:
        print(f"beta = {found['beta']:.4g} (open ratio {found['open_ratio']:.3f}, target {target:.2f}"
              f"{'' if found['converged'] else ', not within the tolerance: more runs or a wider bracket'})")
    return {**found, **extra}
