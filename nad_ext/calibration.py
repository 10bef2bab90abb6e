"""Beta calibration: the sparsity weight that gives a chosen mean open ratio.

The paper's beta spans 0.02 (ResNet50, DenseNet121) to 5.0 (VGG16 on Places365): it depends
on the network, and a network nobody has disentangled has none. The open ratio of the learnt
sub-architectures falls as beta grows, so beta can be searched for: :func:`search_beta`
bisects log(beta) on a measuring function (in practice a short NAD run on a few tasks, see
:func:`nad_ext.trainer.calibrate_beta`) until the open ratio is within ``tolerance`` of the
target or the run budget is spent, and returns the beta whose measured ratio came closest with
the whole curve, so that the bank can say how its beta was found.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

METHOD = "bisection in log(beta)"
DEFAULT_TARGET = 0.3  # the paper's typical open ratio
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


def check_target(target_open_ratio) -> None:
    if (not isinstance(target_open_ratio, (int, float)) or isinstance(target_open_ratio, bool)
            or not 0 < target_open_ratio < 1):
        raise ValueError(f"target_open_ratio must be a number in (0, 1), got {target_open_ratio!r}")


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
