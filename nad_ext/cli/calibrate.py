"""``nad calibrate``: beta by short runs and bisection in log(beta): the largest whose
sub-architectures still do their task, or the one that gives a target open ratio
(:func:`nad_ext.training.calibrate_beta`)."""
from __future__ import annotations

import json
from pathlib import Path

from nad_ext.cli.common import (add_model_args, add_nonfinite_arg, add_pipeline_args, add_units_arg, config_from_args,
                                load_data, load_model, load_tasks, network_from_args, setup)


def add(sub) -> None:
    p = sub.add_parser("calibrate", help="find beta by short runs: the largest whose sub-architectures still do their "
                                         "task, or the one for a target open ratio (log-space bisection)")
    add_model_args(p)
    p.add_argument("--gate-points", help="as for disentangle (default: the model's preset)")
    add_units_arg(p)
    p.add_argument("--by", choices=["fidelity", "open-ratio"], default="fidelity",
                   help="fidelity: the largest beta at which every task's binary gates keep its accuracy on its "
                        "classes within --accuracy-tolerance of the original network's (on val/) and answer more "
                        "than one class; open-ratio: the beta that gives --target-open-ratio")
    p.add_argument("--accuracy-tolerance", type=float, default=0.05,
                   help="--by fidelity: how far below the original network's accuracy on its classes a task's "
                        "binary gates may fall")
    p.add_argument("--target-open-ratio", type=float, default=0.3, help="--by open-ratio: the mean open ratio to aim for")
    p.add_argument("--num-tasks", type=int, default=3, help="tasks the short runs train (spread over the classes)")
    p.add_argument("--images-per-task", type=int, help="training images per task (default: all)")
    p.add_argument("--epochs", type=int, default=21, help="epochs of the run the beta is for")
    p.add_argument("--run-epochs", type=int, help="epochs of each short run (default: --epochs)")
    p.add_argument("--runs", type=int, default=6, help="short runs at most")
    p.add_argument("--tasks", help='JSON file {"task": ["class", ...]} (default: one task per class)')
    p.add_argument("--lr", type=float, default=0.1, help="step size of the normalised-gradient update")
    p.add_argument("--batch-size", type=int, default=16, help="images per task per step")
    p.add_argument("--seed", type=int, default=0, help="seed of the gates' initialisation and the data order")
    p.add_argument("--image-size", type=int, help="training crop size (default: the model preset's input size)")
    add_pipeline_args(p, bad_images=True)
    add_nonfinite_arg(p)
    p.add_argument("--out", help="JSON file for the calibration: beta, curve, settings (default: none, printed only)")
    p.set_defaults(func=run)


def run(args) -> None:
    from nad_ext._utils.storage import atomic_write
    from nad_ext.training import CalibrationSettings, calibrate_beta

    if args.out and Path(args.out).is_dir():  # before the short runs, not after them
        raise IsADirectoryError(f"--out {args.out} is a folder; expected the JSON file to write")
    train, val = load_data(args, "train"), load_data(args, "val")
    network = network_from_args(args, load_model(args, train, val))
    tasks = load_tasks(args.tasks, train.classes) if args.tasks else None
    ctx = setup(args)
    settings = CalibrationSettings(num_tasks=args.num_tasks, images_per_task=args.images_per_task,
                                   epochs=args.run_epochs, runs=args.runs, criterion=args.by.replace("-", "_"),
                                   accuracy_tolerance=args.accuracy_tolerance)
    found = calibrate_beta(network, train, tasks=tasks, config=config_from_args(args), settings=settings,
                           progress=ctx.rank == 0, check_images=val)
    if args.out and ctx.rank == 0:
        payload = json.dumps(found, indent=1)
        atomic_write(Path(args.out), lambda tmp: Path(tmp).write_text(payload))
        print(f"calibration: {args.out}")
