"""``nad disentangle``: learn every task's gates into a run folder
(:func:`nad_ext.training.disentangle`)."""
from __future__ import annotations

import argparse
import os
from dataclasses import asdict
from pathlib import Path

from nad_ext.cli.common import (add_execution_args, add_model_args, add_nonfinite_arg, add_pipeline_args,
                                add_selective_args, add_units_arg, config_from_args, load_data, load_model, load_tasks,
                                network_from_args, setup)


def beta_value(value: str):
    """--beta: a positive number or 'auto'."""
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {value!r}") from None


def add(sub) -> None:
    # Defaults are NADConfig's, written out so that --help shows them without importing torch;
    # python_tests/test_cli.py checks that they agree.
    p = sub.add_parser("disentangle", help="learn every task's gates; writes a mask bank")
    add_model_args(p)
    p.add_argument("--out", required=True, help="output folder (mask bank, per-epoch copies, log.json)")
    p.add_argument("--gate-points", help="comma-separated module names ('name:axis' for channels not on axis 1, "
                                         "'name:heads' for attention heads), 'auto', or a preset name (default: "
                                         "the model's preset)")
    add_units_arg(p)
    p.add_argument("--beta", type=beta_value, help="sparsity weight, or auto to calibrate it (default: the model "
                                                   "preset's: vgg16 4.5, resnet50 0.02, densenet121 0.02, darts "
                                                   "0.45; the others have none)")
    p.add_argument("--calibrate-by", choices=["fidelity", "open-ratio"], default="fidelity",
                   help="with --beta auto: fidelity chooses the largest beta at which every task's binary gates "
                        "keep its accuracy on its classes within 5 points of the original network's and answer "
                        "more than one class; open-ratio chooses the beta that gives --target-open-ratio")
    p.add_argument("--target-open-ratio", type=float, default=0.3,
                   help="with --beta auto --calibrate-by open-ratio: the mean open ratio the calibrated beta aims for")
    p.add_argument("--lr", type=float, default=0.1, help="step size of the normalised-gradient update")
    p.add_argument("--epochs", type=int, default=21, help="epochs over every task's images")
    p.add_argument("--batch-size", type=int, default=16, help="images per task per step")
    p.add_argument("--tasks-per-step", type=int, default=16, help="tasks trained together in one step (batched mode)")
    p.add_argument("--mode", choices=["batched", "paper"], default="batched",
                   help="batched: many tasks per step; paper: one task per step, as the reference code (same gates)")
    p.add_argument("--seed", type=int, default=0, help="seed of the gates' initialisation and the data order")
    p.add_argument("--image-size", type=int, help="training crop size (default: the model preset's input size)")
    add_execution_args(p)
    add_pipeline_args(p, bad_images=True)
    add_nonfinite_arg(p)
    p.add_argument("--fidelity-check", choices=["on", "off"], default="on",
                   help="after the last epoch, run each task's binary gates on a sample of val/ (16 images of its "
                        "classes, 64 of others) and warn, naming the tasks, when one answers the same class for "
                        "every image or keeps less than half the original network's accuracy on its classes; the "
                        "figures go into the bank and log.json")
    add_selective_args(p, "each task batch", "a task")
    p.add_argument("--tasks", help='JSON file {"task": ["class", ...]} (default: one task per class)')
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last committed epoch (starts a new run, with a note, "
                        "when --out has no mask bank)")
    p.add_argument("--strict-resume", action="store_true", help="like --resume, but refuse when --out has no mask bank")
    p.add_argument("--overwrite", action="store_true", help="start again and replace the mask bank in --out")
    p.set_defaults(func=run)


def run(args) -> None:
    from nad_ext.training.rundir import BANK_FILE

    out = Path(args.out)
    if out.is_symlink() and not out.exists():
        raise FileNotFoundError(f"--out {out} is a symbolic link to {os.readlink(out)}, which does not exist; expected "
                                "a folder (a link to an existing folder is followed)")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; expected a folder for the run (mask bank, per-epoch copies, "
                              "log.json), new or holding an earlier run")
    existing = out / BANK_FILE
    if existing.exists() and not (args.resume or args.overwrite):  # before data and model load
        raise FileExistsError(f"{existing} exists: pass --resume to continue that run, or --overwrite to "
                              "start again and replace it")
    created = _first_missing(out)  # what this command creates, removed again if it fails before a commit
    try:
        _run(args)
    except BaseException:
        if created is not None:
            _remove_if_unused(out, created)
        raise


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (None when ``path`` exists)."""
    missing = None
    for folder in [path, *path.parents]:
        if os.path.lexists(folder):
            break
        missing = folder
    return missing


def _remove_if_unused(out: Path, created: Path) -> None:
    """After a failed command: the run folder it created, if it holds nothing but the lock file of
    this command's (released) lock, and the empty parents it created, up to ``created``."""
    from nad_ext.training.rundir import LOCK_FILE

    lock = out / LOCK_FILE
    try:
        if not out.is_dir() or out.is_symlink() or {p.name for p in out.iterdir()} - {LOCK_FILE}:
            return
        if lock.exists() and not lock.is_symlink():
            import fcntl

            fd = os.open(lock, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # no other process has opened the folder since
                lock.unlink()
            finally:
                os.close(fd)
        for folder in [out, *out.parents]:
            folder.rmdir()  # only empty folders
            if folder == created:
                break
    except (OSError, ImportError):
        pass  # best effort: the failure itself is what gets reported


def _run(args) -> None:
    from nad_ext.gates.maskbank import describe_objective
    from nad_ext.training import CalibrationSettings, disentangle
    from nad_ext.training.rundir import BANK_FILE

    train, val = load_data(args, "train"), load_data(args, "val")
    network = network_from_args(args, load_model(args, train, val))
    tasks = load_tasks(args.tasks, train.classes) if args.tasks else None
    if args.overwrite and (Path(args.out) / BANK_FILE).exists():
        # --overwrite deletes the earlier run when the folder opens: a gate point that is no module
        # of the network (or outputs no tensor) must not cost it, so they are probed first.
        from nad_ext import models

        network.gated(1, args.image_size or models.get_spec(args.model).input_size)
    ctx = setup(args)
    resume = "strict" if args.strict_resume else args.resume
    config = config_from_args(args)
    if ctx.rank == 0:
        print(f"objective: {describe_objective(asdict(config))}")
    calibration = CalibrationSettings(criterion=args.calibrate_by.replace("-", "_"))
    bank = disentangle(network, train, config=config, tasks=tasks, out_dir=args.out, resume=resume,
                       overwrite=args.overwrite, calibration=calibration, fidelity=args.fidelity_check == "on",
                       check_images=val)
    if ctx.rank == 0:
        print(f"{len(bank.tasks)} tasks x {len(bank.gate_points)} gate points, epoch {bank.epoch}: "
              f"{Path(args.out) / BANK_FILE}")
