"""``nad similarity``: the task x task similarity matrix of a mask bank, as CSV
(:func:`nad_ext.analysis.similarity`)."""
from __future__ import annotations

import sys
from pathlib import Path


def add(sub) -> None:
    p = sub.add_parser("similarity", help="task x task similarity matrix of a mask bank (CSV)")
    p.add_argument("--bank", required=True, help="mask bank (masks.safetensors)")
    p.add_argument("--metric", default="iou", choices=["iou", "iomin"],
                   help="per-gate-point overlap: iou (the paper's) or intersection over the smaller set")
    p.add_argument("--out", help="CSV file to write (default: print to stdout)")
    p.set_defaults(func=run)


def run(args) -> None:
    import numpy as np

    from nad_ext import analysis
    from nad_ext.gates import MaskBank

    bank = MaskBank.load(args.bank)
    sim = analysis.similarity(bank, metric=args.metric)
    names = bank.task_names
    lines = [",".join(["task"] + names)] + [",".join([n] + [f"{v:.6f}" for v in row]) for n, row in zip(names, np.asarray(sim))]
    text = "\n".join(lines) + "\n"
    if args.out:
        from nad_ext._utils.storage import atomic_write

        if Path(args.out).is_dir():
            raise IsADirectoryError(f"--out {args.out} is a folder; expected the CSV file to write")
        atomic_write(Path(args.out), lambda tmp: Path(tmp).write_text(text))  # no partial file, links not followed
        print(f"similarity matrix ({len(names)} x {len(names)}): {args.out}")
    else:
        sys.stdout.write(text)
