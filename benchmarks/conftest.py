"""`pytest benchmarks`: the suite under pytest-benchmark.

- bench_*.py are collected (pytest's own pattern is test_*.py).
- Each comparison (a workload and its paths) is measured once, all paths interleaved, by
  ``harness.measure``; each path is then one pytest-benchmark case, grouped by comparison, whose
  statistics are the interleaved samples (``harness.record``). ``-k`` selects cases, but a
  selected case's comparison always measures all its paths (the ratios need them).
- The thread count is fixed at the start (``--bench-threads``, NAD_BENCH_THREADS, else PyTorch's
  default) and recorded; the JSON carries the commit of the code measured (the tree nad_ext is
  imported from), torch, CUDA, device, threads, load average and TF32 (``machine_info.nad``).
- Without ``--benchmark-json`` / ``--benchmark-save`` the run is autosaved to
  ``.benchmarks/<machine id>/NNNN_<commit>_<date>.json``, so ``--benchmark-compare`` and
  ``python benchmarks/compare.py`` find it.
- ``--smoke``: tiny sizes, each path checked and run once (CI: with ``--benchmark-disable``).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import harness` from any directory
import harness  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("nad benchmarks")
    group.addoption("--smoke", action="store_true",
                    help="tiny sizes; every path checked against the reference and run once (CI)")
    group.addoption("--bench-threads", type=int, default=None,
                    help="PyTorch intra-op threads for the whole run (default: NAD_BENCH_THREADS, else PyTorch's)")
    group.addoption("--bench-rounds", type=int, default=None,
                    help="interleaved rounds per comparison (default: each benchmark's own)")


def pytest_collect_file(file_path, parent):
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):  # a file named on the command line pytest collects itself
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config):
    config._nad_threads = harness.set_threads(config.getoption("bench_threads"))
    config._nad_load_start = harness.load_average()
    option = config.option
    quiet = option.benchmark_disable or option.benchmark_skip or config.getoption("smoke")
    if not (quiet or option.benchmark_json or option.benchmark_save or option.benchmark_autosave):
        option.benchmark_autosave = True  # every real run leaves its JSON


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def pytest_report_header(config):
    return [f"nad benchmarks: {harness.header(_device())}",
            f"nad benchmarks: {'smoke run (tiny sizes, one call per path)' if config.getoption('smoke') else 'full sizes'}"]


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["nad"] = harness.environment(_device())
    machine_info["nad"]["loadavg_start"] = config._nad_load_start


def pytest_benchmark_generate_commit_info(config):
    return harness.commit_info()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["nad_bench"] = {"format": harness.FORMAT, "source": "pytest", "argv": sys.argv[1:],
                                "smoke": config.getoption("smoke")}


class Suite:
    """The comparisons measured in this session, each once."""

    def __init__(self, config):
        self.config = config
        self.smoke = config.getoption("smoke")
        self.rounds = config.getoption("bench_rounds")
        self.done: dict[str, tuple[harness.Comparison, dict[str, harness.Result]]] = {}
        self.failed: dict[str, BaseException] = {}

    def measured(self, key: str, make, **measure_options):
        """(comparison, {path: result}) of ``make(smoke)``, measured on first use."""
        if key in self.failed:  # one broken comparison fails each of its cases, measured once
            raise self.failed[key]
        if key not in self.done:
            try:
                comparison = make(self.smoke)
                if self.rounds:
                    measure_options["rounds"] = self.rounds
                results = harness.measure(comparison, smoke=self.smoke, **measure_options)
            except BaseException as err:
                self.failed[key] = err
                raise
            self.done[key] = (comparison, {r.name: r for r in results})
            comparison.paths = []  # the workload's tensors go; the results stay
        return self.done[key]

    def record(self, benchmark, key: str, make, path: str, **measure_options) -> None:
        comparison, results = self.measured(key, make, **measure_options)
        if path not in results:
            raise KeyError(f"{key}: no path {path!r} (measured: {', '.join(results)})")
        harness.record(benchmark, comparison, results[path])


@pytest.fixture(scope="session")
def suite(request) -> Suite:
    request.config._nad_suite = Suite(request.config)
    return request.config._nad_suite


def pytest_terminal_summary(terminalreporter, config):
    suite = getattr(config, "_nad_suite", None)
    if not suite or not suite.done:
        return
    terminalreporter.section("nad benchmarks: comparisons, ratios to the baseline, targets")
    terminalreporter.write_line(harness.header(_device()))
    for comparison, results in suite.done.values():
        terminalreporter.write_line(harness.table(list(results.values())))
