"""The benchmark suite's helper (benchmarks/harness.py) and compare command (benchmarks/compare.py):
paths are checked before they are timed and timed interleaved; ratios, quartiles and targets are
computed as documented; pytest-benchmark's statistics are the interleaved samples; the JSON has
the documented fields; compare flags a regression beyond its threshold and not within the noise.
The benchmarks themselves run in CI as a smoke run (scripts/test.sh: pytest benchmarks --smoke)."""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))
import compare  # noqa: E402
import harness  # noqa: E402


@pytest.fixture
def scripted_times(monkeypatch):
    """harness._timed answers from a table: {path name: [seconds of each sample]}; each path's
    run returns its name. Records the order in which samples were taken."""
    table, order = {}, []

    def timed(fn, calls, cuda):
        name = fn()
        order.append(name)
        return table[name].pop(0) if table.get(name) else 1e-3

    monkeypatch.setattr(harness, "_timed", timed)
    return table, order


def paths(*names, **kw):
    return [harness.Path(n, (lambda n=n: n), **kw.get(n, {})) for n in names]


def test_a_path_that_computes_something_else_is_never_timed(scripted_times):
    table, order = scripted_times
    calls = []

    def wrong(_):
        raise AssertionError("off by one")

    cmp = harness.Comparison("g", [harness.Path("ref", lambda: calls.append("ref")),
                                   harness.Path("bad", lambda: calls.append("bad"), wrong)], "ref")
    with pytest.raises(AssertionError, match=r"path 'bad' does not match the reference, not timed: off by one"):
        harness.measure(cmp, rounds=5, warmup=2)
    assert calls == ["ref", "bad"] and order == []  # one checked call each, nothing timed


def test_paths_are_timed_interleaved_in_rotated_order(scripted_times):
    _, order = scripted_times
    cmp = harness.Comparison("g", paths("a", "b", "c"), "a")
    harness.measure(cmp, rounds=3, warmup=1, min_sample_s=0.0)
    assert order == ["a", "b", "c"] + ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # warm-up, then 3 rounds


def test_ratio_quartiles_and_targets(scripted_times, monkeypatch):
    table, _ = scripted_times
    monkeypatch.setattr(harness.torch, "get_num_threads", lambda: 2)
    # warm-up takes one value each (warmup=1), then 5 rounds
    table["numpy"] = [0.1] + [0.100, 0.120, 0.090, 0.110, 0.100]
    table["op"] = [0.01] + [0.010, 0.012, 0.009, 0.030, 0.008]
    cmp = harness.Comparison("mask_overlap T=1,000 [cpu]",
                             paths("numpy", "op", op={"targets": ["overlap-cpu-t1000", "overlap-cpu-t1000-numpy"]}),
                             "numpy")
    numpy, op = harness.measure(cmp, rounds=5, warmup=1, min_sample_s=0.0)
    assert op.samples == [0.010, 0.012, 0.009, 0.030, 0.008] and op.median == 0.010
    assert op.ratio == pytest.approx(10.0)  # median of the paired ratios 10, 10, 10, 3.67, 12.5
    from pytest_benchmark.stats import Stats  # quartiles as pytest-benchmark computes them

    paired = Stats()
    for v in (10, 10, 10, 0.11 / 0.03, 12.5):
        paired.update(v)
    assert (op.ratio_q1, op.ratio_q3) == (pytest.approx(paired.q1), pytest.approx(paired.q3))
    assert numpy.ratio == 1.0 and numpy.baseline == op.baseline == "numpy"
    status = {t["id"]: t for t in op.target_status}
    assert status["overlap-cpu-t1000"]["status"] == "met" and status["overlap-cpu-t1000"]["value"] == "10 ms"
    assert status["overlap-cpu-t1000-numpy"]["status"] == "met"
    table["numpy"] = [0.1] * 6
    table["op"] = [0.03] * 6
    _, op = harness.measure(cmp, rounds=5, warmup=1, min_sample_s=0.0)
    assert [t["status"] for t in op.target_status] == ["missed", "missed"]  # 30 ms, 3.3x
    _, op = harness.measure(cmp, smoke=True)
    assert [t["status"] for t in op.target_status] == ["not evaluated"] * 2


def test_paths_doing_different_work_per_call_are_compared_by_rate(scripted_times):
    """The step's reference-style loop does one task's 16 images per call, the batched path 4
    tasks' 64: twice the time for four times the images is twice as fast."""
    table, _ = scripted_times
    table["loop"] = [0.1] * 4
    table["batched"] = [0.2] * 4
    cmp = harness.Comparison("step", paths("loop", "batched", loop={"items": 16}, batched={"items": 64}), "loop")
    loop, batched = harness.measure(cmp, rounds=3, warmup=1, min_sample_s=0.0)
    assert batched.rate == pytest.approx(320) and loop.rate == pytest.approx(160)
    assert batched.ratio == pytest.approx(2.0) and "ratio of the rates" in batched.extra_info()["ratio_means"]
    assert harness.work_scale(cmp.path("loop"), harness.Path("x", lambda: None)) == 1.0  # no items: per call


def test_a_cuda_target_is_not_evaluated_on_the_cpu(scripted_times):
    cmp = harness.Comparison("g", paths("op", op={"targets": ["overlap-cuda-t1000"]}), "op", "cpu")
    (op,) = harness.measure(cmp, rounds=2, warmup=0)
    assert op.target_status[0]["status"] == "not evaluated" and "cuda" in op.target_status[0]["why"]


def test_a_slow_baseline_of_one_sample_is_timed_by_its_checked_call(scripted_times):
    _, order = scripted_times
    cmp = harness.Comparison("g", paths("loop", "op", loop={"max_rounds": 1}), "loop")
    loop, op = harness.measure(cmp, rounds=4, warmup=1, min_sample_s=0.0)
    assert len(loop.samples) == 1 and len(op.samples) == 4 and "loop" not in order
    # no common round with the baseline: the ratio of the medians
    assert op.ratio == pytest.approx(loop.samples[0] / op.median) and loop.ratio == 1.0


def test_every_target_a_benchmark_names_is_in_targets_md_and_every_target_is_measured():
    targets = harness.load_targets()
    assert len(targets) >= 9
    used = set()
    for script in BENCH.glob("bench_*.py"):
        used |= set(re.findall(r'"((?:step|overlap|data)-[a-z0-9-]+)"', script.read_text()))
    assert used - set(targets) == set(), "benchmarks name targets TARGETS.md does not have"
    assert set(targets) - used == set(), "TARGETS.md has targets no benchmark measures"
    for t in targets.values():  # each one readable by evaluate_target
        assert re.fullmatch(r"median <= [\d.,]+ (us|ms|s)|rate >= [\d.,]+ \S+|>= [\d.]+x \S+", t.target), t


def test_json_has_pytest_benchmarks_shape_and_ours(tmp_path, scripted_times):
    table, _ = scripted_times
    cmp = harness.Comparison("g [cpu]", paths("ref", "fast", fast={"items": 16, "unit": "img/s"}), "ref",
                             info={"workload": "w"})
    results = harness.measure(cmp, rounds=3, warmup=0, min_sample_s=0.0)
    path = harness.write_json(tmp_path / "run.json", [(cmp, results)], "cpu", "bench_x.py", False, [0.5, 0.5, 0.5])
    doc = json.loads(path.read_text())
    assert set(doc) >= {"machine_info", "commit_info", "benchmarks", "datetime", "version", "nad_bench"}
    nad = doc["machine_info"]["nad"]
    for key in ("torch", "cuda", "device", "threads", "loadavg", "loadavg_start", "tf32", "nad_ext"):
        assert key in nad, key
    assert "node" in doc["machine_info"] and doc["commit_info"]["id"]
    fast = doc["benchmarks"][1]
    assert fast["group"] == "g [cpu]" and fast["name"] == "fast" and fast["stats"]["data"] == results[1].samples
    info = fast["extra_info"]
    assert info["baseline"] == "ref" and info["ratio"] == pytest.approx(results[1].ratio)
    assert info["rate"] == pytest.approx(16 / results[1].median) and info["workload"] == "w"
    assert info["threads"] == harness.torch.get_num_threads() and len(info["loadavg_after"]) == 3


def test_commit_of_an_exported_tree_comes_from_its_gpu_commit_file(tmp_path, monkeypatch):
    (tmp_path / "GPU_COMMIT").write_text("0123abcd + uncommitted changes\n")
    monkeypatch.delenv("NAD_BENCH_COMMIT", raising=False)
    info = harness.commit_info(tmp_path)
    assert info["id"] == "0123abcd" and info["dirty"] and info["source"] == "GPU_COMMIT"
    assert info["benchmarks"]["tree"] == str(ROOT)  # the benchmark code came from elsewhere
    monkeypatch.setenv("NAD_BENCH_COMMIT", "feedbeef")
    assert harness.commit_info(tmp_path)["id"] == "feedbeef"


def test_pytest_benchmark_statistics_are_the_interleaved_samples(tmp_path):
    """harness.record hands the samples to pytest-benchmark through its replay timer."""
    (tmp_path / "test_replay.py").write_text(textwrap.dedent(f"""
        import sys
        import pytest
        sys.path.insert(0, {str(BENCH)!r})
        import harness

        @pytest.mark.benchmark(timer=harness.REPLAY)
        def test_case(benchmark):
            res = harness.Result("g", "p", [0.003, 0.001, 0.002], 4, 1, 0.5, "passed", "", "time.perf_counter",
                                 [0.0, 0.0, 0.0], baseline="q", ratio=2.0)
            harness.record(benchmark, harness.Comparison("g", [], "q", info={{"T": 7}}), res)
        """))
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_replay.py"),
                           f"--benchmark-json={out}"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (bench,) = json.loads(out.read_text())["benchmarks"]
    assert bench["stats"]["data"] == [0.003, 0.001, 0.002] and bench["stats"]["median"] == 0.002
    assert bench["group"] == "g" and bench["extra_info"]["ratio"] == 2.0 and bench["extra_info"]["T"] == 7
    assert bench["options"]["timer"] == "interleaved_samples"


def _doc(median, ratio, q, ratio_q, dirty=False):
    samples = [median * (1 - q), median, median * (1 + q)]
    return {"machine_info": {"nad": {"device": "cpu", "threads": 2, "torch": "2.14", "loadavg": [1, 1, 1]}},
            "commit_info": {"id": "abc", "dirty": dirty}, "datetime": "2026-12-03T00:00:00",
            "benchmarks": [
                {"group": "g", "name": "numpy", "params": None, "stats": {"median": 0.1, "q1": 0.095, "q3": 0.105},
                 "extra_info": {"baseline": "numpy", "ratio": 1.0, "ratio_q1": 1.0, "ratio_q3": 1.0}},
                {"group": "g", "name": "test_overlap[cpu-t1000-op]", "params": {"key": "cpu-t1000", "path": "op"},
                 "stats": {"median": median, "q1": samples[0], "q3": samples[2]},
                 "extra_info": {"baseline": "numpy", "ratio": ratio, "ratio_q1": ratio * (1 - ratio_q),
                                "ratio_q3": ratio * (1 + ratio_q)}}]}


def _compare(tmp_path, base, new, *args):
    (tmp_path / "base.json").write_text(json.dumps(base))
    (tmp_path / "new.json").write_text(json.dumps(new))
    proc = subprocess.run([sys.executable, str(BENCH / "compare.py"), str(tmp_path / "base.json"),
                           str(tmp_path / "new.json"), *args], capture_output=True, text=True, timeout=60)
    rows = {line.split("|")[2].strip(): line for line in proc.stdout.splitlines() if line.startswith("| g |")}
    return proc, rows


def test_compare_flags_a_regression_beyond_the_threshold(tmp_path):
    proc, rows = _compare(tmp_path, _doc(0.010, 10.0, 0.05, 0.05), _doc(0.050, 2.0, 0.05, 0.05),
                          "--fail-on-regression")
    assert proc.returncode == 1, proc.stdout
    assert "REGRESSION" in rows["op"] and "| 5x | vs baseline |" in rows["op"]
    assert "REGRESSION" not in rows["numpy"]  # the baseline did not move
    proc, rows = _compare(tmp_path, _doc(0.050, 2.0, 0.05, 0.05), _doc(0.010, 10.0, 0.05, 0.05))
    assert proc.returncode == 0 and "improvement" in rows["op"]


def test_compare_does_not_flag_what_is_within_the_threshold_or_the_noise(tmp_path):
    proc, rows = _compare(tmp_path, _doc(0.010, 10.0, 0.05, 0.02), _doc(0.011, 9.0, 0.05, 0.02), "--fail-on-regression")
    assert proc.returncode == 0 and rows["op"].rstrip().endswith("|  |")  # 11% < 15%
    proc, rows = _compare(tmp_path, _doc(0.010, 10.0, 0.5, 0.5), _doc(0.015, 6.0, 0.5, 0.5), "--fail-on-regression")
    assert proc.returncode == 0 and "within noise" in rows["op"]  # 1.67x, but the IQRs overlap


def test_merge_keeps_every_case_and_each_runs_info(tmp_path):
    a, b = _doc(0.01, 10.0, 0.05, 0.05), _doc(0.02, 5.0, 0.05, 0.05)
    a["nad_bench"], b["nad_bench"] = {"source": "bench_step.py"}, {"source": "bench_overlap.py"}
    (tmp_path / "step.json").write_text(json.dumps(a))
    (tmp_path / "overlap.json").write_text(json.dumps(b))
    assert harness.main(["merge", str(tmp_path / "m.json"), str(tmp_path / "step.json"), str(tmp_path / "overlap.json"),
                         str(tmp_path / "missing.json")]) == 0
    merged = json.loads((tmp_path / "m.json").read_text())
    assert len(merged["benchmarks"]) == 4
    assert [r["source"] for r in merged["nad_bench"]["runs"]] == ["bench_step.py", "bench_overlap.py"]


def test_compare_reads_a_folder_as_its_two_latest_runs(tmp_path):
    for i, ratio in enumerate((10.0, 10.0, 2.0), start=1):
        (tmp_path / f"{i:04d}_abc.json").write_text(json.dumps(_doc(0.01 * 10 / ratio, ratio, 0.05, 0.05)))
    out = subprocess.run([sys.executable, str(BENCH / "compare.py"), str(tmp_path)], capture_output=True,
                         text=True, timeout=60, env=dict(os.environ)).stdout
    assert "0002_abc.json" in out and "0003_abc.json" in out and "REGRESSION" in out
