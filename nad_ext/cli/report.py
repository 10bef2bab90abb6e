"""``nad report``: one HTML page from analysis folders (:func:`nad_ext.report.write_report`)."""
from __future__ import annotations

from pathlib import Path


def add(sub) -> None:
    p = sub.add_parser("report", help="write the HTML report of one or more analysis folders")
    p.add_argument("results", nargs="+", help="folders written by `nad analyze` (one per network)")
    p.add_argument("--out", default="nad_output/report.html", help="the HTML file to write")
    p.set_defaults(func=run)


def run(args) -> None:
    from nad_ext import analysis, report

    results = {Path(d).resolve().name: analysis.load_results(d) for d in args.results}
    path = report.write_report(results, args.out, metadata={"sources": args.results})
    print(f"report: {path}")
