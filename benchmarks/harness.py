"""The one timing helper of benchmarks/: how a comparison is measured, what is recorded with it,
the targets of TARGETS.md beside each result, and the JSON every run writes.

A *comparison* is a workload and its *paths* (the ways of computing it: the reference-style
loop, the same under torch.compile, the batched eager path, the fused op...), one of them the
*baseline*. ``measure`` times them side by side:

1. each path runs once and its result is checked against the reference (``Path.check``): a path
   that computes something else is never timed;
2. ``warmup`` more calls per path (compilation, allocator, cuDNN plans, caches);
3. each path gets a number of calls per sample so that a sample lasts at least ``min_sample_s``
   (timer resolution, launch overhead), as timeit's autorange does;
4. ``rounds`` rounds, each taking one sample of every path in an order rotated from round to
   round, so that the drift of a shared machine (~1.5x from minute to minute on the 2-core VM)
   hits every path alike;
5. on CUDA a sample is timed by CUDA events around its calls (device time, no host sync between
   the calls); on the CPU by ``time.perf_counter``.

A path's result: median and interquartile range of its samples (seconds per call), and its
ratio to the baseline, ``baseline time / its time`` (above 1: faster than the baseline), the
median of the per-round ratios (paired samples) with their quartiles. Where the paths of a
comparison do different amounts of work per call (``Path.items``: the step's reference-style loop
does one task's batch, the batched paths several tasks'), the ratio is per item: baseline time
per item / its time per item, the ratio of the rates.

Every result is written as JSON in pytest-benchmark's format (``pytest-benchmark compare`` and
benchmarks/compare.py read it): pytest-benchmark's machine info plus the commit of the code
measured, torch, CUDA, device, threads and load average; per case its baseline, ratio, check,
target and load in ``extra_info``. Under pytest the samples go to pytest-benchmark through
``record`` (its statistics are computed from these samples); the scripts write the same JSON
through ``write_json``.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path as FilePath
from typing import Any, Callable, Sequence

import torch

from compare import fmt_time  # one time format for the tables and for compare.py (which needs no torch)

HERE = FilePath(__file__).resolve().parent
TARGETS_FILE = HERE / "TARGETS.md"
FORMAT = "nad-bench/1"


# ---- the machine and the code measured --------------------------------------------------------

def set_threads(threads: int | None = None) -> int:
    """Fixes PyTorch's intra-op thread count for the whole run and returns it: ``threads``, else
    NAD_BENCH_THREADS, else PyTorch's own default (OMP_NUM_THREADS or the physical cores)."""
    threads = threads or int(os.environ.get("NAD_BENCH_THREADS", 0)) or torch.get_num_threads()
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def tf32_settings() -> dict:
    """TF32 as this process has it. The trainer never changes PyTorch's settings, and neither do
    the benchmarks: PyTorch's defaults are TF32 for cuDNN's float32 convolutions and IEEE float32
    for matrix products (on Ampere and later GPUs; the CPU ignores both)."""
    try:
        conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    except RuntimeError:  # set per operator through PyTorch's newer API
        conv = torch.backends.cudnn.conv.fp32_precision == "tf32"
        matmul = torch.backends.cuda.matmul.fp32_precision == "tf32"
    text = (f"TF32 {'on' if conv else 'off'} for cuDNN convolutions, {'on' if matmul else 'off'} for matrix "
            f"products (PyTorch's settings, left as the trainer leaves them)")
    return {"cudnn_conv": bool(conv), "cuda_matmul": bool(matmul), "text": text}


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {cpu}, {len(os.sched_getaffinity(0))} cores available"


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _git(root: FilePath, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def source_root() -> FilePath:
    """The tree whose nad_ext is imported (PYTHONPATH=<another tree> measures that tree)."""
    import importlib.util

    spec = importlib.util.find_spec("nad_ext")
    if spec is None or not spec.origin:
        return HERE.parent
    return FilePath(spec.origin).resolve().parents[1]


def commit_info(root: FilePath | None = None) -> dict:
    """pytest-benchmark's commit_info for the code measured (the tree nad_ext is imported from,
    not the current directory's): NAD_BENCH_COMMIT, else git, else a GPU_COMMIT file in the tree
    (an exported copy without .git). ``dirty`` lists the changed tracked files; ``benchmarks``
    is the commit of the benchmark code itself when it comes from another tree."""
    root = root or source_root()
    info = {"id": "unknown", "time": None, "author_time": None, "dirty": False, "project": "nad_ext",
            "branch": "(unknown)", "source": "none", "tree": str(root)}
    head = _git(root, "rev-parse", "HEAD") if (root / ".git").exists() else None
    if os.environ.get("NAD_BENCH_COMMIT"):
        info.update(id=os.environ["NAD_BENCH_COMMIT"], source="NAD_BENCH_COMMIT")
    elif head:
        changes = [line for line in (_git(root, "status", "--porcelain", "--untracked-files=no") or "").splitlines()]
        info.update(id=head, source="git", dirty=bool(changes), changes=[c.strip() for c in changes[:20]],
                    time=_git(root, "show", "-s", "--format=%cI", "HEAD"),
                    author_time=_git(root, "show", "-s", "--format=%aI", "HEAD"),
                    branch=_git(root, "rev-parse", "--abbrev-ref", "HEAD") or "(unknown)")
    elif (root / "GPU_COMMIT").is_file():
        text = (root / "GPU_COMMIT").read_text().strip().splitlines()[0]
        info.update(id=text.split()[0], source="GPU_COMMIT", dirty="uncommitted" in text)
    if root.resolve() != HERE.parent.resolve():
        bench = _git(HERE.parent, "rev-parse", "HEAD") if (HERE.parent / ".git").exists() else None
        info["benchmarks"] = {"tree": str(HERE.parent), "id": bench or "unknown"}
    return info


def environment(device: torch.device | str = "cpu") -> dict:
    """What the results depend on besides the code: torch, CUDA, device, threads, load, TF32."""
    device = torch.device(device)
    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        "device": device_name(device),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cores_available": len(os.sched_getaffinity(0)),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "loadavg": load_average(),
        "tf32": tf32_settings(),
        "python": platform.python_version(),
    }
    try:
        import numpy

        env["numpy"] = numpy.__version__
    except ImportError:
        pass
    try:
        from nad_ext import _extension

        env["nad_ext"] = str(FilePath(_extension.__file__).resolve().parent)
        env["nad_ext_cuda_kernels"] = _extension.has_cuda_kernels()
        built = sorted(FilePath(env["nad_ext"]).glob("_C*.so"))
        if built:
            env["nad_ext_built"] = datetime.datetime.fromtimestamp(
                built[0].stat().st_mtime, datetime.timezone.utc).isoformat(timespec="seconds")
    except Exception as err:  # noqa: BLE001 - recorded, not fatal: a data-only benchmark needs no build
        env["nad_ext"] = f"not importable: {err}"
    return env


def machine_info(device: torch.device | str = "cpu") -> dict:
    """pytest-benchmark's machine info (node, CPU, Python...) plus ``environment``."""
    try:
        from pytest_benchmark.plugin import pytest_benchmark_generate_machine_info

        info = pytest_benchmark_generate_machine_info()
    except Exception:  # noqa: BLE001 - py-cpuinfo can fail on odd machines; keep what we have
        info = {"node": platform.node(), "machine": platform.machine(), "python_version": platform.python_version(),
                "system": platform.system(), "release": platform.release()}
    info["nad"] = environment(device)
    return info


def header(device: torch.device | str, extra: str = "") -> str:
    """One line naming what the numbers depend on, printed before every table."""
    env, commit = environment(device), commit_info()
    dirty = " + uncommitted changes" if commit.get("dirty") else ""
    line = (f"device: {env['device']}; torch {env['torch']}, CUDA {env['cuda']}; {env['threads']} threads; "
            f"load average {' '.join(map(str, env['loadavg']))}; commit {commit['id'][:12]}{dirty}")
    if commit.get("benchmarks"):  # PYTHONPATH=<another tree>: say whose code is measured
        line += f"\nnad_ext from {env['nad_ext']} ({commit['source']}), benchmarks from {commit['benchmarks']['tree']}"
    if torch.device(device).type == "cuda":
        line += f"\nfloat32: {env['tf32']['text']}"
    return line + (f"\n{extra}" if extra else "")


# ---- timing ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Path:
    """One way of computing a comparison's workload.

    run: one call (the timed unit); returns what ``check`` inspects.
    check: raises AssertionError when the result is wrong; may return a note (the error found).
    items: units of work per call (images for the step): gives a rate beside the time.
    max_rounds: fewer samples for a slow baseline (the Python double loop over pairs); a path
        of one sample is timed by its checked call (no warm-up: it takes seconds).
    targets: ids of TARGETS.md rows this path is measured against.
    """

    name: str
    run: Callable[[], Any]
    check: Callable[[Any], str | None] | None = None
    note: str = ""
    items: int | None = None
    unit: str = ""
    max_rounds: int | None = None
    targets: Sequence[str] = ()
    cuda: bool | None = None  # time with CUDA events (default: the comparison's device)


@dataclasses.dataclass
class Result:
    group: str
    name: str
    samples: list[float]  # seconds per call, one per round
    calls: int  # calls per sample
    warmup: int
    first_call_s: float
    check: str
    note: str
    timer: str
    load: list[float]
    items: int | None = None
    unit: str = ""
    targets: Sequence[str] = ()
    baseline: str = ""
    ratio: float = float("nan")
    ratio_q1: float = float("nan")
    ratio_q3: float = float("nan")
    target_status: list[dict] = dataclasses.field(default_factory=list)
    params: dict = dataclasses.field(default_factory=dict)
    extra: dict = dataclasses.field(default_factory=dict)  # more of what was measured, into extra_info

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def quartiles(self) -> tuple[float, float]:
        return quartiles(self.samples)

    @property
    def rate(self) -> float | None:
        return self.items / self.median if self.items else None

    def extra_info(self, comparison: "Comparison | None" = None) -> dict:
        q1, q3 = self.quartiles
        info = {
            "baseline": self.baseline,
            "ratio": _finite(self.ratio),
            "ratio_q1": _finite(self.ratio_q1),
            "ratio_q3": _finite(self.ratio_q3),
            "ratio_means": ("baseline median time / this path's (paired per round; above 1: faster)" if not self.items
                            else "baseline time per item / this path's: the ratio of the rates (paired per round; "
                                 "above 1: faster)"),
            "median_s": self.median,
            "iqr_s": q3 - q1,
            "calls_per_sample": self.calls,
            "warmup_calls": self.warmup,
            "first_call_s": self.first_call_s,
            "check": self.check,
            "note": self.note,
            "timer": self.timer,
            "loadavg_after": self.load,
            "threads": torch.get_num_threads(),
            "targets": self.target_status,
        }
        if self.items:
            info.update(items_per_call=self.items, unit=self.unit, rate=self.rate)
        info.update(self.extra)
        if comparison is not None:
            info.update(comparison.info)
        return info


def _finite(x: float):
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """First and third quartile, as pytest-benchmark computes them (so the JSON agrees)."""
    from pytest_benchmark.stats import Stats

    s = Stats()
    for v in values:
        s.update(v)
    return s.q1, s.q3


def _timed(fn: Callable[[], Any], calls: int, cuda: bool) -> float:
    """Seconds per call of ``calls`` calls: CUDA events around them (device time), or the host
    clock."""
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


@dataclasses.dataclass
class Comparison:
    """A workload and its paths, ``baseline`` the name of the path the ratios are to."""

    group: str
    paths: list[Path]
    baseline: str
    device: str = "cpu"
    info: dict = dataclasses.field(default_factory=dict)  # workload description, into extra_info
    cleanup: list = dataclasses.field(default_factory=list)  # called once measured (loaders to close)

    def path(self, name: str) -> Path:
        return next(p for p in self.paths if p.name == name)


def measure(comparison: Comparison, *, rounds: int = 10, warmup: int = 2, min_sample_s: float = 0.02,
            max_seconds: float | None = None, smoke: bool = False, log: Callable[[str], None] | None = None
            ) -> list[Result]:
    """Checks, warms up and times every path of ``comparison``, interleaved (see the module's
    docstring). ``smoke``: check and one timed call per path, nothing more (CI). ``max_seconds``:
    stop adding rounds after this long (at least 3 rounds are taken when the paths allow)."""
    try:
        return _measure(comparison, rounds, warmup, min_sample_s, max_seconds, smoke, log)
    finally:
        for close in comparison.cleanup:
            close()
        comparison.cleanup.clear()


def _measure(comparison, rounds, warmup, min_sample_s, max_seconds, smoke, log) -> list[Result]:
    cuda_default = torch.device(comparison.device).type == "cuda"
    paths = comparison.paths
    if comparison.baseline not in [p.name for p in paths]:
        raise ValueError(f"{comparison.group}: baseline {comparison.baseline!r} is none of the paths")
    if smoke:
        rounds, warmup, min_sample_s = 1, 0, 0.0
    checks, firsts, calls, peaks = {}, {}, {}, {}
    for p in paths:  # 1. correctness before any timing
        cuda = cuda_default if p.cuda is None else p.cuda
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = p.run()
        if cuda:
            torch.cuda.synchronize()
            peaks[p.name] = torch.cuda.max_memory_allocated() / 2**20
        firsts[p.name] = time.perf_counter() - t0
        try:
            note = p.check(out) if p.check else None
        except AssertionError as err:
            raise AssertionError(f"{comparison.group}: path {p.name!r} does not match the reference, "
                                 f"not timed: {err}") from err
        checks[p.name] = note or ("passed" if p.check else "no check: this path is the reference")
        del out
    for p in paths:  # 2. warm-up; 3. calls per sample
        cuda = cuda_default if p.cuda is None else p.cuda
        last = firsts[p.name]
        for _ in range(warmup if p.max_rounds != 1 else 0):
            last = _timed(p.run, 1, cuda)
        calls[p.name] = 1 if smoke or last <= 0 else max(1, min(1000, math.ceil(min_sample_s / last)))
    samples: dict[str, list[float]] = {p.name: [] for p in paths}
    taken: dict[str, list[int]] = {p.name: [] for p in paths}  # the round of each sample
    for p in paths:  # a path of one sample (seconds a call) is timed by its checked call
        if p.max_rounds == 1 and not smoke:
            samples[p.name].append(firsts[p.name])
            taken[p.name].append(-1)
    start = time.perf_counter()
    for r in range(rounds):  # 4. interleaved rounds, order rotated
        if max_seconds is not None and r >= 3 and time.perf_counter() - start > max_seconds:
            break
        order = paths[r % len(paths):] + paths[: r % len(paths)]
        for p in order:
            if p.max_rounds is not None and len(samples[p.name]) >= p.max_rounds:
                continue
            cuda = cuda_default if p.cuda is None else p.cuda
            samples[p.name].append(_timed(p.run, calls[p.name], cuda))
            taken[p.name].append(r)
        if log:
            log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{p.name} {samples[p.name][-1] * 1e3:.3g} ms"
                                                          for p in order if samples[p.name]))
    load = load_average()
    results = []
    rounds_of = {name: dict(zip(taken[name], values)) for name, values in samples.items()}
    for p in paths:
        cuda = cuda_default if p.cuda is None else p.cuda
        res = Result(comparison.group, p.name, samples[p.name], calls[p.name], 0 if smoke else warmup,
                     firsts[p.name], checks[p.name], p.note, "cuda events" if cuda else "time.perf_counter",
                     load, p.items, p.unit, list(p.targets), comparison.baseline)
        if p.name in peaks:  # everything allocated then, the other paths' resident tensors included
            res.extra["peak_allocated_MiB_first_call"] = round(peaks[p.name])
        res.ratio, res.ratio_q1, res.ratio_q3 = ratio(rounds_of[comparison.baseline], rounds_of[p.name],
                                                      work_scale(comparison.path(comparison.baseline), p))
        res.target_status = [evaluate_target(t, res, comparison, rounds_of, smoke) for t in p.targets]
        results.append(res)
    return results


def work_scale(base: Path, this: Path) -> float:
    """this path's items per call / the baseline's (1 when either does not count items): the
    factor that makes a time ratio a ratio of rates."""
    return this.items / base.items if this.items and base.items else 1.0


def ratio(base: dict[int, float], this: dict[int, float], scale: float = 1.0) -> tuple[float, float, float]:
    """(median, q1, q3) of ``scale x base time / this time``: over the rounds both were sampled in
    (paired, so drift between rounds cancels); without a common round (a one-sample baseline timed
    by its checked call), the ratio of the medians, its range from this path's quartiles.
    ``scale``: :func:`work_scale`, for paths that do different work per call."""
    common = [r for r in this if r in base and this[r] > 0]
    if common:
        paired = [scale * base[r] / this[r] for r in common]
        return (statistics.median(paired), *quartiles(paired))
    if not base or not this:
        return float("nan"), float("nan"), float("nan")
    b = scale * statistics.median(base.values())
    q1, q3 = quartiles(list(this.values()))
    return b / statistics.median(this.values()), b / q3, b / q1


def result(group: str, name: str, samples: Sequence[float], *, baseline: str, baseline_samples: Sequence[float],
           timer: str, note: str = "", check: str = "not checked", items: int | None = None, unit: str = "",
           extra: dict | None = None) -> Result:
    """A Result of samples measured elsewhere (a subprocess's log: bench_scale, bench_data's
    end-to-end run), its ratio paired with the baseline's samples as ``measure`` pairs them."""
    res = Result(group, name, list(samples), 1, 0, float("nan"), check, note, timer, load_average(), items, unit,
                 baseline=baseline, extra=dict(extra or {}))
    res.ratio, res.ratio_q1, res.ratio_q3 = ratio(dict(enumerate(baseline_samples)), dict(enumerate(samples)))
    return res


# ---- targets -------------------------------------------------------------------------------------

@dataclasses.dataclass
class Target:
    id: str
    device: str  # "cpu" or "cuda": where the target is set
    what: str
    target: str  # "median <= 10 ms", "rate >= 4000 img/s", ">= 5x numpy"
    source: str


@functools.lru_cache(maxsize=None)
def load_targets(path: FilePath = TARGETS_FILE) -> dict[str, Target]:
    """The rows of TARGETS.md's table whose first cell is an id in backquotes."""
    targets = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 5 and re.fullmatch(r"`[\w.-]+`", cells[0]):
            targets[cells[0].strip("`")] = Target(cells[0].strip("`"), cells[1], cells[2], cells[3].strip("`"),
                                                  cells[4])
    return targets


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def evaluate_target(target_id: str, res: Result, comparison: Comparison, samples: dict[str, dict[int, float]],
                    smoke: bool = False) -> dict:
    """{"id", "target", "status": met | missed | not evaluated, "value", "why"} of one result."""
    target = load_targets().get(target_id)
    if target is None:
        raise KeyError(f"target {target_id!r} is not in {TARGETS_FILE.name}")
    out = {"id": target_id, "target": target.target, "device": target.device, "status": "not evaluated"}
    here = torch.device(comparison.device).type
    if smoke:
        out["why"] = "smoke run (tiny sizes)"
        return out
    if target.device.split()[0] != here:
        out["why"] = f"the target is for {target.device}; measured on {here}"
        return out
    text = target.target.replace(",", "")
    m_time = re.fullmatch(r"median <= ([\d.]+) (us|ms|s)", text)
    m_rate = re.fullmatch(r"rate >= ([\d.]+) (\S+)", text)
    m_ratio = re.fullmatch(r">= ([\d.]+)x (\S+)", text)
    if m_time:
        value = res.median / _UNITS[m_time.group(2)]
        ok, shown = value <= float(m_time.group(1)), f"{value:.3g} {m_time.group(2)}"
    elif m_rate:
        if not res.rate:
            raise ValueError(f"target {target_id}: {res.name} has no items per call for a rate")
        ok, shown = res.rate >= float(m_rate.group(1)), f"{res.rate:,.0f} {m_rate.group(2)}"
    elif m_ratio:
        other = m_ratio.group(2)
        if other not in samples or not samples[other]:
            out["why"] = f"path {other!r} was not measured in this run"
            return out
        scale = work_scale(comparison.path(other), comparison.path(res.name)) if any(
            q.name == other for q in comparison.paths) else 1.0
        value = ratio(samples[other], samples[res.name], scale)[0]
        ok, shown = value >= float(m_ratio.group(1)), f"{value:.3g}x {other}"
    else:
        raise ValueError(f"target {target_id}: cannot read {target.target!r}")
    threads_note = ""
    if here == "cpu" and "2 cores" in target.device and torch.get_num_threads() != 2:
        threads_note = f" (the target is for 2 cores; {torch.get_num_threads()} threads here)"
    out.update(status="met" if ok else "missed", value=shown + threads_note)
    return out


def target_text(res: Result) -> str:
    parts = []
    for t in res.target_status:
        state = t["status"] if t["status"] != "not evaluated" else f"not evaluated: {t.get('why', '')}"
        parts.append(f"{t['target']} [{t['id']}]: {state}" + (f" ({t['value']})" if "value" in t else ""))
    return "; ".join(parts)


# ---- printing -------------------------------------------------------------------------------------

def table(results: Sequence[Result], title: str = "") -> str:
    """A Markdown table of one comparison: median, IQR, rate, ratio to the baseline, targets."""
    lines = [f"\n{title or results[0].group}" + f" (baseline: {results[0].baseline})"]
    rated = any(r.items for r in results)
    head = "| path | median | IQR | " + ("rate | " if rated else "") + "x baseline (IQR) | rounds x calls | check | target |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        q1, q3 = r.quartiles
        rate = (f"{r.rate:,.0f} {r.unit} | " if r.items else "- | ") if rated else ""
        ratio = f"{r.ratio:.3g} ({r.ratio_q1:.3g}-{r.ratio_q3:.3g})" if math.isfinite(r.ratio) else "-"
        check = ("ok" if r.check.startswith("passed") else
                 "reference" if r.check.startswith(("no check", "the reference")) else r.check)
        lines.append(f"| {r.name} | {fmt_time(r.median)} | {fmt_time(q3 - q1)} | {rate}{ratio} | "
                     f"{len(r.samples)} x {r.calls} | {check} | {target_text(r) or '-'} |")
    return "\n".join(lines)


# ---- JSON ----------------------------------------------------------------------------------------

def benchmark_entry(res: Result, comparison: Comparison | None, source: str, options: dict) -> dict:
    """One case as pytest-benchmark writes it (its ``stats`` from our samples)."""
    from pytest_benchmark.stats import Stats

    stats = Stats()
    for v in res.samples:
        stats.update(v)
    return {
        "group": res.group,
        "name": res.name,
        "fullname": f"{source}::{res.group}::{res.name}",
        "params": res.params or None,
        "param": None,
        "extra_info": res.extra_info(comparison),
        "options": {"timer": res.timer, "warmup": res.warmup, "min_rounds": len(res.samples), **options},
        "stats": {**stats.as_dict(), "iterations": res.calls, "data": list(res.samples)},
    }


def document(entries: list[dict], device, source: str, argv: Sequence[str], smoke: bool, started: list[float]
             ) -> dict:
    from pytest_benchmark import __version__ as pb_version

    info = machine_info(device)
    info["nad"]["loadavg_start"] = started
    return {
        "machine_info": info,
        "commit_info": commit_info(),
        "benchmarks": entries,
        "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "version": pb_version,
        "nad_bench": {"format": FORMAT, "source": source, "argv": list(argv), "smoke": smoke},
    }


def default_json_path(source: str) -> FilePath:
    """.benchmarks/<script>/NNNN_<commit>_<date>[_uncommited-changes].json, numbered as
    pytest-benchmark numbers its autosaves (which go to .benchmarks/<machine id>/)."""
    folder = FilePath(".benchmarks") / FilePath(source).stem
    folder.mkdir(parents=True, exist_ok=True)
    numbers = [int(p.name[:4]) for p in folder.glob("[0-9][0-9][0-9][0-9]_*.json")]
    info = commit_info()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d_%H%M%S")
    name = f"{max(numbers, default=0) + 1:04d}_{info['id'][:12]}_{stamp}{'_uncommited-changes' if info['dirty'] else ''}"
    return folder / f"{name}.json"


def write_json(path: str | FilePath | None, runs: Sequence[tuple[Comparison | None, list[Result]]], device,
               source: str, smoke: bool, started: list[float], options: dict | None = None) -> FilePath:
    entries = [benchmark_entry(r, comparison, source, options or {}) for comparison, results in runs for r in results]
    path = FilePath(path) if path else default_json_path(source)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = document(entries, device, source, sys.argv, smoke, started)
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return path


def merge(out: str | FilePath, inputs: Sequence[str | FilePath]) -> FilePath:
    """One JSON of several runs on one machine (gpu_check.sh: one file per call): the first run's
    machine and commit info, every run's cases, each run's own info under ``nad_bench.runs``."""
    docs = [json.loads(FilePath(p).read_text()) for p in inputs]
    if not docs:
        raise ValueError("nothing to merge")
    merged = dict(docs[0])
    merged["benchmarks"] = [b for d in docs for b in d.get("benchmarks", [])]
    merged["nad_bench"] = {"format": FORMAT, "source": "merged",
                           "runs": [{"file": FilePath(p).name, **d.get("nad_bench", {}),
                                     "loadavg": d.get("machine_info", {}).get("nad", {}).get("loadavg"),
                                     "datetime": d.get("datetime")} for p, d in zip(inputs, docs)]}
    FilePath(out).write_text(json.dumps(merged, indent=2, default=str) + "\n")
    return FilePath(out)


# ---- pytest-benchmark ----------------------------------------------------------------------------

class _Replay:
    """pytest-benchmark's timer for ``record``: each pair of readings spans one of our samples,
    so the fixture's statistics are computed from the interleaved samples measured above."""

    __name__ = "interleaved_samples"  # what pytest-benchmark's JSON names as the timer
    __module__ = "harness"

    def __init__(self):
        self.readings: list[float] = []

    def load(self, samples: Sequence[float]) -> None:
        self.readings = [v for s in samples for v in (0.0, s)][::-1]

    def __call__(self) -> float:
        return self.readings.pop() if self.readings else 0.0


REPLAY = _Replay()


def record(benchmark, comparison: Comparison, res: Result) -> None:
    """Hands one path's measured samples to pytest-benchmark's fixture (the test must carry
    ``@pytest.mark.benchmark(timer=harness.REPLAY)``), with its group and extra_info."""
    benchmark.group = res.group
    benchmark.extra_info.update(res.extra_info(comparison))
    if getattr(benchmark, "disabled", False):
        benchmark.pedantic(lambda: None)
        return
    REPLAY.load(res.samples)
    benchmark.pedantic(lambda: None, rounds=len(res.samples), iterations=1, warmup_rounds=0)


def main(argv: Sequence[str] | None = None) -> int:
    """``python benchmarks/harness.py merge OUT IN...``: one JSON from several."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge")
    m.add_argument("out")
    m.add_argument("inputs", nargs="+")
    args = parser.parse_args(argv)
    inputs = [p for p in args.inputs if FilePath(p).is_file()]
    if not inputs:
        print("merge: none of the inputs exists", file=sys.stderr)
        return 1
    print(f"wrote {merge(args.out, inputs)} ({len(inputs)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
