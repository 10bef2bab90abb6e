"""Two benchmark runs side by side, regressions and improvements flagged.

    python benchmarks/compare.py BASE.json NEW.json [--threshold 0.15] [--fail-on-regression]
    python benchmarks/compare.py .benchmarks/bench_overlap         # the two latest runs in a folder

Reads the JSON of ``pytest benchmarks`` (autosaved under .benchmarks/<machine id>/, or
--benchmark-json) and of the scripts (.benchmarks/<script>/ or --json); cases are matched by
comparison (group) and path, so a script run and a pytest run of the same comparison match.

What is compared. Absolute times drift on a shared machine (~1.5x from minute to minute on the
2-core VM), but every case also carries its ratio to the baseline measured in the same run,
interleaved (``extra_info.ratio``: baseline time / its time). So a case's *change* is:

- ``vs baseline`` (the default where both runs have it): base ratio / new ratio, how much slower
  the case became relative to a baseline that did not change (NumPy, the eager reference...);
- ``absolute``: new median / base median, for the baselines themselves and for runs without
  ratios (flagged cases then say so: they carry the machine's drift).

A case is flagged when its change exceeds the threshold (default 15%: a regression above
1.15, an improvement below 1/1.15) *and* the runs' interquartile ranges do not overlap (of the
paired per-round ratios, or of the samples for ``absolute``): the stated noise threshold. The
runs' machines (device, threads, torch, load average, commit) are printed first; differences
are pointed out.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def load(path: Path) -> dict:
    doc = json.loads(path.read_text())
    doc["_path"] = str(path)
    return doc


def latest_two(folder: Path) -> tuple[Path, Path]:
    runs = sorted(folder.glob("*.json"), key=lambda p: (p.name[:4], p.stat().st_mtime))
    if len(runs) < 2:
        raise SystemExit(f"{folder}: fewer than two JSON files to compare")
    return runs[-2], runs[-1]


def describe(doc: dict) -> dict:
    nad = doc.get("machine_info", {}).get("nad", {})
    commit = doc.get("commit_info", {})
    return {
        "commit": (commit.get("id") or "unknown")[:12] + (" + uncommitted changes" if commit.get("dirty") else ""),
        "date": doc.get("datetime", "?")[:19],
        "device": nad.get("device", doc.get("machine_info", {}).get("processor", "?")),
        "threads": nad.get("threads"),
        "torch": nad.get("torch"),
        "cuda": nad.get("cuda"),
        "load": nad.get("loadavg_start", nad.get("loadavg")),
        "source": doc.get("nad_bench", {}).get("source", "pytest-benchmark"),
        "smoke": doc.get("nad_bench", {}).get("smoke", False),
    }


def cases(doc: dict) -> dict[tuple[str, str], dict]:
    """{(comparison, path): case}: a pytest case's path is its ``path`` parameter, a script's its name."""
    return {(bench.get("group") or "", _path_of(bench)): bench for bench in doc.get("benchmarks", [])}


def _quartiles(bench: dict, key: str) -> tuple[float, float] | None:
    info, stats = bench.get("extra_info", {}), bench.get("stats", {})
    if key == "ratio":
        q1, q3 = info.get("ratio_q1"), info.get("ratio_q3")
    else:
        q1, q3 = stats.get("q1"), stats.get("q3")
    return (q1, q3) if q1 is not None and q3 is not None else None


def compare_case(base: dict, new: dict, threshold: float, metric: str) -> dict:
    bi, ni = base.get("extra_info", {}), new.get("extra_info", {})
    row = {"base_median": base["stats"]["median"], "new_median": new["stats"]["median"],
           "base_ratio": bi.get("ratio"), "new_ratio": ni.get("ratio"), "baseline": ni.get("baseline")}
    is_baseline = bi.get("baseline") in (None, "") or _path_of(new) == ni.get("baseline")
    use_ratio = (metric in ("auto", "ratio") and not is_baseline and row["base_ratio"] and row["new_ratio"]
                 and bi.get("baseline") == ni.get("baseline"))
    if use_ratio:
        change = row["base_ratio"] / row["new_ratio"]  # > 1: slower relative to the baseline
        bq, nq = _quartiles(base, "ratio"), _quartiles(new, "ratio")
        separated = bq is not None and nq is not None and (nq[1] < bq[0] or nq[0] > bq[1])
        row["by"] = "vs baseline"
    else:
        change = row["new_median"] / row["base_median"]
        bq, nq = _quartiles(base, "time"), _quartiles(new, "time")
        separated = bq is not None and nq is not None and (nq[0] > bq[1] or nq[1] < bq[0])
        row["by"] = "absolute"
    row["change"] = change
    if change > 1 + threshold and separated:
        row["flag"] = "REGRESSION"
    elif change < 1 / (1 + threshold) and separated:
        row["flag"] = "improvement"
    elif abs(math.log(change)) > math.log(1 + threshold):
        row["flag"] = "within noise (IQRs overlap)"
    else:
        row["flag"] = ""
    if row["flag"] and row["by"] == "absolute" and not is_baseline:
        row["flag"] += " (absolute: no common baseline)"
    return row


def _path_of(bench: dict) -> str:
    params = bench.get("params") or {}
    return str(params.get("path", bench.get("name")))


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="BASE NEW (JSON files), or one folder: its two latest runs")
    parser.add_argument("--threshold", type=float, default=0.15,
                        help="relative change that counts (default 0.15: 15%%), when the IQRs do not overlap either")
    parser.add_argument("--metric", choices=["auto", "ratio", "absolute"], default="auto",
                        help="auto: vs the in-run baseline where both runs have it, else absolute medians")
    parser.add_argument("--fail-on-regression", action="store_true", help="exit 1 when a case is flagged REGRESSION")
    args = parser.parse_args(argv)
    if len(args.runs) == 1 and Path(args.runs[0]).is_dir():
        paths = latest_two(Path(args.runs[0]))
    elif len(args.runs) == 2:
        paths = (Path(args.runs[0]), Path(args.runs[1]))
    else:
        parser.error("give two JSON files, or one folder")
    base, new = (load(p) for p in paths)
    db, dn = describe(base), describe(new)
    print(f"base: {paths[0]}\nnew:  {paths[1]}\n")
    print("| | base | new |\n|---|---|---|")
    for key in ("commit", "date", "device", "threads", "torch", "cuda", "load", "source", "smoke"):
        mark = " (differs)" if key in ("device", "threads", "torch", "cuda", "smoke") and db[key] != dn[key] else ""
        print(f"| {key}{mark} | {db[key]} | {dn[key]} |")
    if db["smoke"] or dn["smoke"]:
        print("\nnote: a smoke run's times mean nothing (tiny sizes, one call per path)")

    cb, cn = cases(base), cases(new)
    matched = [k for k in cn if k in cb]
    print(f"\n{len(matched)} cases in both runs; a change is flagged beyond {args.threshold:.0%} when the runs' "
          f"interquartile ranges do not overlap (change > 1: slower)\n")
    print("| comparison | path | base median | new median | base x baseline | new x baseline | change | by | flag |")
    print("|---|---|---|---|---|---|---|---|---|")
    regressions = 0
    for key in matched:
        row = compare_case(cb[key], cn[key], args.threshold, args.metric)
        regressions += row["flag"].startswith("REGRESSION")
        ratio = lambda v: f"{v:.3g}" if v else "-"  # noqa: E731
        flag = f"**{row['flag']}**" if row["flag"].startswith(("REGRESSION", "improvement")) else row["flag"]
        print(f"| {key[0]} | {key[1]} | {fmt_time(row['base_median'])} | {fmt_time(row['new_median'])} | "
              f"{ratio(row['base_ratio'])} | {ratio(row['new_ratio'])} | {row['change']:.3g}x | {row['by']} | {flag} |")
    for label, only in (("base", [k for k in cb if k not in cn]), ("new", [k for k in cn if k not in cb])):
        if only:
            print(f"\nonly in {label}: " + ", ".join(f"{g} / {p}" for g, p in only))
    print(f"\n{regressions} regression(s) flagged")
    return 1 if regressions and args.fail_on_regression else 0


if __name__ == "__main__":
    sys.exit(main())
