"""The ``nad`` command line: each verb is one call of the Python API plus argument parsing and
printing. ``nad <verb> --help`` lists a verb's options. ``python -m nad_ext`` is the same
command; under torchrun (``torchrun --nproc-per-node=N -m nad_ext disentangle ...``)
``disentangle`` and ``analyze`` share their work among the processes (nad_ext.distributed).

Nothing heavy is imported before the arguments are parsed (torch takes seconds to load), so
``--help``, ``--version`` and argument errors answer at once; each verb imports what it uses.

Exit status: 0 done; 2 a user error (bad arguments, a missing or invalid file, an unknown
model, a run that would be overwritten, a full disk, a run folder in use, another torchrun
process's failure), reported as one ``error:`` line; 130 interrupted; 1 anything else (a bug:
the traceback is shown).
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import warnings
from dataclasses import asdict, fields
from pathlib import Path

from nad_ext import __version__

BUILTIN = "builtin"
USER_ERROR = 2  # argparse's own exit status for usage errors; used for every user error
# objective.SELECTIVE_DEFAULTS, written out so that --help shows them without importing torch
# (python_tests/test_cli.py checks that they agree).
_SELECTIVE = {"negatives": 0.25, "negative_weight": 2.0}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after each option's help, except where there is nothing to show (a
    flag, or a default of None whose meaning the help text states itself)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or isinstance(action, argparse._VersionAction):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser with :class:`_HelpFormatter`; its sub-commands get it too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="registry name: vgg16, resnet50, densenet121, darts, vit_b_16, "
                                                   "swin_t, convnext_tiny, or the built-in zoo's zoo_plain, "
                                                   "zoo_residual, zoo_dense, zoo_nas, zoo_vit")
    p.add_argument("--weights", help="weights file (.pt/.pth state dict or .safetensors) (default: for zoo models "
                                     "on the built-in data, the cached zoo, trained on first use)")
    p.add_argument("--data", default=BUILTIN,
                   help="an ImageFolder tree with train/ and val/ (one folder per class), a cache made by "
                        "`nad prepare-data`, or 'builtin' for the generated shapes")
    p.add_argument("--cache", default=".nad_cache", help="where the built-in zoo's weights are cached")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:1, ..., or auto: cuda when available (under torchrun, cuda means "
                        "cuda:LOCAL_RANK)")
    p.add_argument("--dist-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="under torchrun: how long a collective waits for the other processes")


def _setup(args):
    """This process's place in a torchrun world (a world of one without torchrun)."""
    from nad_ext import distributed

    return distributed.setup(args.device, args.dist_timeout)


def _add_units_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--units", default="channels", choices=["channels", "mlp", "heads"],
                   help="what a preset (or 'auto') gates: block channels, the MLP hidden units of "
                        "transformer/ConvNeXt blocks, or attention heads")


def _load_data(args, split: str):
    from nad_ext import data, datacache

    if args.data == BUILTIN:
        return data.generated_shapes(split)
    if datacache.is_cache(args.data):
        return datacache.open_split(args.data, split)
    return data.image_folder(args.data, split)


def _add_pipeline_args(p: argparse.ArgumentParser, bad_images: bool) -> None:
    p.add_argument("--data-pipeline", choices=["auto", "exact", "fast"], default="auto",
                   help="image loading: exact (PIL + per-image transforms, the reference), fast (libjpeg-turbo or "
                        "batched nvjpeg decode, crops on the step's device; on the CPU the same pixels); "
                        "auto: fast")
    if bad_images:
        p.add_argument("--on-bad-image", choices=["skip", "stop"], default="skip",
                       help="an unreadable image file is skipped with a warning and listed in log.json (skip) "
                            "or stops the run with its path (stop)")


def _load_model(args, train, val):
    from nad_ext import models

    if args.weights is None and args.model in models.ZOO:
        if args.data != BUILTIN:
            raise ValueError(f"--weights is required for {args.model} on data other than the built-in set")
        return models.load_zoo(args.cache, train, val, names=[args.model])[args.model][0]
    if args.weights is None:
        raise ValueError(f"--weights is required for {args.model}: no pretrained weights can be downloaded")
    return models.load_model(args.model, args.weights, num_classes=len(train.classes))


def cmd_gate_points(args) -> None:
    from nad_ext import models
    from nad_ext.gates import describe_layout
    from nad_ext.trainer import build_gated_model

    train = _load_data(args, "train")
    model = _load_model(args, train, _load_data(args, "val")) if args.weights or args.model in models.ZOO \
        else models.load_model(args.model, num_classes=len(train.classes))
    spec = models.get_spec(args.model)
    size = args.image_size or spec.input_size
    gated = build_gated_model(model, "auto" if args.auto else args.model, 1, size, model_id=args.model,
                              units=args.units)
    fmt = lambda values: "(" + ", ".join(f"{v:.3f}" for v in values) + ")"  # noqa: E731
    beta = f"{spec.beta:g}" if spec.beta is not None else "none tuned (pass --beta, or --beta auto to calibrate)"
    print(f"{args.model}: input {size}x{size}, normalisation mean {fmt(spec.mean)} std {fmt(spec.std)}, beta {beta}")
    for i, (p, shape) in enumerate(zip(gated.gate_points, gated.example_shapes)):
        print(f"{i:3d}  {p.name:44s} {p.channels:6d} {p.units:8s} {describe_layout(p, shape)} "
              f"{tuple(shape)[1:]}, axis {p.channel_axis}")
    print(f"{len(gated.gate_points)} gate points, {sum(gated.layer_sizes)} {args.units}")


def _config_from_args(args):
    from nad_ext.objective import SELECTIVE_DEFAULTS
    from nad_ext.trainer import NADConfig

    values = {f.name: getattr(args, f.name) for f in fields(NADConfig) if getattr(args, f.name, None) is not None}
    if getattr(args, "selective", False):  # explicit --negatives / --negative-weight win over the switch's defaults
        values = {**SELECTIVE_DEFAULTS, **values}
    return NADConfig(**values)


def _load_tasks(path: str, classes: list[str]):
    """Tasks from a JSON file {"task name": ["class", ...], ...}."""
    from nad_ext.maskbank import Task

    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read tasks file {path}: {err}") from err
    if not isinstance(spec, dict) or not spec:
        raise ValueError(f"tasks file {path} must hold a non-empty JSON object {{task: [class, ...]}}")
    tasks = []
    for name, members in spec.items():
        unknown = [c for c in members if c not in classes]
        if unknown or not members:
            raise ValueError(f"task {name!r} in {path}: unknown classes {unknown}; the data has {classes}")
        tasks.append(Task(name, tuple(classes.index(c) for c in members)))
    return tasks


def _gate_points_arg(args):
    """--gate-points: comma-separated specs, 'auto', or a preset name (default: the model's)."""
    gate_points = args.gate_points.split(",") if args.gate_points and "," in args.gate_points else (args.gate_points or args.model)
    if isinstance(gate_points, str) and gate_points not in ("auto", args.model):
        gate_points = [gate_points]
    return gate_points


def _beta(value: str):
    """--beta: a positive number or 'auto'."""
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {value!r}") from None


def cmd_disentangle(args) -> None:
    from nad_ext.objective import describe_objective
    from nad_ext.trainer import BANK_FILE, disentangle

    existing = Path(args.out) / BANK_FILE
    if existing.exists() and not (args.resume or args.overwrite):  # before data and model load
        raise FileExistsError(f"{existing} exists: pass --resume to continue that run, or --overwrite to "
                              "start again and replace it")
    train, val = _load_data(args, "train"), _load_data(args, "val")
    model = _load_model(args, train, val)
    gate_points = _gate_points_arg(args)
    tasks = _load_tasks(args.tasks, train.classes) if args.tasks else None
    ctx = _setup(args)
    resume = "strict" if args.strict_resume else args.resume
    config = _config_from_args(args)
    if ctx.rank == 0:
        print(f"objective: {describe_objective(asdict(config))}")
    bank = disentangle(model, train, gate_points, model_id=args.model, config=config, tasks=tasks,
                       out_dir=args.out, resume=resume, overwrite=args.overwrite, units=args.units)
    if ctx.rank == 0:
        print(f"{len(bank.tasks)} tasks x {len(bank.gate_points)} gate points, epoch {bank.epoch}: "
              f"{Path(args.out) / 'masks.safetensors'}")


def cmd_analyze(args) -> None:
    from nad_ext import analysis, models, pipeline
    from nad_ext.maskbank import MaskBank
    from nad_ext.trainer import build_gated_model

    bank = MaskBank.load(args.bank)
    if bank.model_id != args.model:  # before its gate points are looked up in the wrong network
        raise ValueError(f"mask bank does not match the model: {args.bank} is for model {bank.model_id!r}, "
                         f"not {args.model!r}")
    train, val = _load_data(args, "train"), _load_data(args, "val")
    model = _load_model(args, train, val)
    size = args.image_size or bank.config.get("image_size") or models.get_spec(args.model).input_size
    ctx = _setup(args)
    gated = build_gated_model(model, bank.gate_points, len(bank.tasks), size, model_id=args.model,
                              device=ctx.device)
    # The analyses' batches come from this loader, on the analyses' device.
    with pipeline.make_loader(val, size, ctx.device, args.data_pipeline or "auto") as loader:
        analysis.run_all(gated, bank, pipeline.with_loader(val, loader), size, args.out, num_mosaics=args.mosaics,
                         seed=args.seed, device=str(ctx.device), map_units=ctx.map_units, write=ctx.rank == 0,
                         progress=ctx.rank == 0)
    if ctx.rank == 0:
        print(f"analyses written to {args.out}")


def cmd_calibrate(args) -> None:
    from nad_ext.calibration import CalibrationSettings, calibrate_beta
    from nad_ext.storage import atomic_write

    train = _load_data(args, "train")
    model = _load_model(args, train, _load_data(args, "val"))
    tasks = _load_tasks(args.tasks, train.classes) if args.tasks else None
    ctx = _setup(args)
    settings = CalibrationSettings(num_tasks=args.num_tasks, images_per_task=args.images_per_task,
                                   epochs=args.run_epochs, runs=args.runs)
    found = calibrate_beta(model, train, _gate_points_arg(args), model_id=args.model, tasks=tasks,
                           config=_config_from_args(args), settings=settings, units=args.units,
                           progress=ctx.rank == 0)
    if args.out and ctx.rank == 0:
        payload = json.dumps(found, indent=1)
        atomic_write(Path(args.out), lambda tmp: Path(tmp).write_text(payload))
        print(f"calibration: {args.out}")


def cmd_prepare_data(args) -> None:
    from nad_ext import datacache, models

    if args.verify:
        bad = datacache.verify(args.verify)
        for line in bad:
            print(line, file=sys.stderr)
        if bad:
            raise ValueError(f"{args.verify}: {len(bad)} damaged images; prepare the cache again")
        print(f"{args.verify}: every image matches its checksum")
        return
    if not args.data or not args.out:
        raise ValueError("prepare-data needs --data DIR and --out CACHE (or --verify CACHE)")
    size = args.image_size or (models.get_spec(args.model).input_size if args.model else 224)
    out = datacache.prepare(args.data, args.out, size, short_side=args.short_side, encoding=args.format,
                            quality=args.quality, overwrite=args.overwrite, on_bad_image=args.on_bad_image,
                            workers=args.workers)
    cache = datacache.DataCache(out)
    counts = ", ".join(f"{s}: {m['count']} images" + (f" ({len(m['skipped'])} skipped)" if m["skipped"] else "")
                       for s, m in cache.splits.items())
    print(f"cache for image size {size} (short side {cache.settings['short_side']}, {args.format}): {out} ({counts})")


def cmd_report(args) -> None:
    from nad_ext import analysis, report

    results = {Path(d).resolve().name: analysis.load_results(d) for d in args.results}
    path = report.write_report(results, args.out, metadata={"sources": args.results})
    print(f"report: {path}")


def cmd_similarity(args) -> None:
    import numpy as np

    from nad_ext import analysis
    from nad_ext.maskbank import MaskBank

    bank = MaskBank.load(args.bank)
    sim = analysis.similarity(bank, metric=args.metric)
    names = bank.task_names
    lines = [",".join(["task"] + names)] + [",".join([n] + [f"{v:.6f}" for v in row]) for n, row in zip(names, np.asarray(sim))]
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
        print(f"similarity matrix ({len(names)} x {len(names)}): {args.out}")
    else:
        sys.stdout.write(text)


def cmd_demo(args) -> None:
    from nad_ext.demo import run_demo

    run_demo(args.out, cache_dir=args.cache, epochs=args.epochs, num_mosaics=args.mosaics, device=args.device,
             selective=args.selective)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nad", description="Neural Architecture Disentanglement: per-task sub-architectures of "
                                             "a pretrained CNN (Hu et al., ICCV 2021)",
                     epilog="exit status: 0 done, 2 user error (bad arguments or input files), 130 interrupted, "
                            "1 unexpected error")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="<verb>")

    # Defaults below are NADConfig's and the demo's, written out so that --help shows them
    # without importing torch; python_tests/test_cli.py checks that they agree.
    p = sub.add_parser("demo", help="train the built-in zoo, disentangle every class, write the report",
                       description="The whole method on the built-in shapes data: trains (or loads) one small "
                                   "network per connection type, disentangles every class, runs the analyses and "
                                   "writes the report.")
    p.add_argument("--out", default="nad_output/demo", help="output folder (mask banks, analyses, report.html)")
    p.add_argument("--cache", default=".nad_cache", help="where the zoo's trained weights are cached")
    p.add_argument("--epochs", type=int, default=8, help="NAD epochs")
    p.add_argument("--mosaics", type=int, default=40, help="mosaics for the hit rate")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ..., or auto: cuda when available")
    p.add_argument("--selective", action="store_true",
                   help="learn with the selective objective (not the paper's; its settings tuned on this zoo, "
                        "see `nad disentangle --help`): sub-architectures that also reject other classes")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("gate-points", help="list a model's gate points (its preset, or --auto proposals)")
    _add_model_args(p)
    p.add_argument("--auto", action="store_true", help="propose gate points for an unknown network")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: the model preset's)")
    _add_units_arg(p)
    p.set_defaults(func=cmd_gate_points)

    p = sub.add_parser("disentangle", help="learn every task's gates; writes a mask bank")
    _add_model_args(p)
    p.add_argument("--out", required=True, help="output folder (mask bank, per-epoch copies, log.json)")
    p.add_argument("--gate-points", help="comma-separated module names ('name:axis' for channels not on axis 1, "
                                         "'name:heads' for attention heads), 'auto', or a preset name (default: "
                                         "the model's preset)")
    _add_units_arg(p)
    p.add_argument("--beta", type=_beta, help="sparsity weight, or auto to calibrate it (default: the model preset's: "
                                              "vgg16 4.5, resnet50 0.02, densenet121 0.02, darts 0.45; the "
                                              "others have none)")
    p.add_argument("--target-open-ratio", type=float, default=0.3,
                   help="with --beta auto: the mean open ratio the calibrated beta aims for")
    p.add_argument("--lr", type=float, default=0.1, help="step size of the normalised-gradient update")
    p.add_argument("--epochs", type=int, default=21, help="epochs over every task's images")
    p.add_argument("--batch-size", type=int, default=16, help="images per task per step")
    p.add_argument("--tasks-per-step", type=int, default=16, help="tasks trained together in one step (batched mode)")
    p.add_argument("--mode", choices=["batched", "paper"], default="batched",
                   help="batched: many tasks per step; paper: one task per step, as the reference code (same gates)")
    p.add_argument("--seed", type=int, default=0, help="seed of the gates' initialisation and the data order")
    p.add_argument("--image-size", type=int, help="training crop size (default: the model preset's input size)")
    p.add_argument("--fuse", choices=["auto", "on", "off"], default="auto",
                   help="fused fast path: BatchNorm folded, nad::masked_conv2d (auto: on with CUDA)")
    p.add_argument("--precision", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="network precision; gate logits stay float32 (auto: bfloat16 on the fused CUDA path)")
    p.add_argument("--cuda-graph", choices=["auto", "on", "off"], default="auto",
                   help="replay the step from CUDA graphs (auto: on with the fused CUDA path)")
    _add_pipeline_args(p, bad_images=True)
    p.add_argument("--negatives", type=float, metavar="R",
                   help="selective objective (not the paper's): R x batch size images of other classes join each "
                        f"task batch (default: 0, the paper's objective; {_SELECTIVE['negatives']:g} with --selective)")
    p.add_argument("--negative-weight", type=float, metavar="GAMMA",
                   help="selective objective: weight of the term that keeps a task from predicting itself on "
                        f"other classes' images (default: 0; {_SELECTIVE['negative_weight']:g} with --selective)")
    p.add_argument("--selective", action="store_true",
                   help="the selective objective with the settings tuned on the demo zoo (the --negatives and "
                        "--negative-weight above); either option given explicitly overrides its value")
    p.add_argument("--tasks", help='JSON file {"task": ["class", ...]} (default: one task per class)')
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last committed epoch (starts a new run, with a note, "
                        "when --out has no mask bank)")
    p.add_argument("--strict-resume", action="store_true", help="like --resume, but refuse when --out has no mask bank")
    p.add_argument("--overwrite", action="store_true", help="start again and replace the mask bank in --out")
    p.set_defaults(func=cmd_disentangle)

    p = sub.add_parser("calibrate", help="find the beta that gives a target open ratio (short runs, log-space bisection)")
    _add_model_args(p)
    p.add_argument("--gate-points", help="as for disentangle (default: the model's preset)")
    _add_units_arg(p)
    p.add_argument("--target-open-ratio", type=float, default=0.3, help="the mean open ratio to aim for")
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
    _add_pipeline_args(p, bad_images=True)
    p.add_argument("--out", help="JSON file for the calibration: beta, curve, settings (default: none, printed only)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("analyze", help="run the paper's analyses on a mask bank")
    _add_model_args(p)
    p.add_argument("--bank", required=True, help="mask bank written by `nad disentangle` (masks.safetensors)")
    p.add_argument("--out", required=True, help="output folder (results.json, similarity CSVs, examples)")
    p.add_argument("--mosaics", type=int, default=100, help="mosaics for the hit rate")
    p.add_argument("--seed", type=int, default=0, help="seed of the mosaics and the null baseline")
    p.add_argument("--image-size", type=int, default=None,
                   help="evaluation size (default: the bank's training size, else the model preset's)")
    _add_pipeline_args(p, bad_images=False)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("prepare-data", help="decode and resize an ImageFolder tree once into a cache that --data reads")
    p.add_argument("--data", help="the ImageFolder tree (train/ and val/) (default: none; required unless --verify)")
    p.add_argument("--out", help="the cache folder to write (default: none; required unless --verify)")
    p.add_argument("--image-size", type=int, help="the input size it is for (default: --model's, else 224)")
    p.add_argument("--model", help="take the input size of this model preset (default: none)")
    p.add_argument("--short-side", type=int, help="stored short side (default: the evaluation resize, 256 for 224)")
    p.add_argument("--format", choices=["raw", "jpeg"], default="raw",
                   help="raw uint8 pixels (default, fastest) or re-encoded JPEG (about 7x smaller)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality for --format jpeg")
    p.add_argument("--on-bad-image", choices=["skip", "stop"], default="skip",
                   help="an unreadable image file is left out with a warning (skip) or stops with its path (stop)")
    p.add_argument("--workers", type=int, help="decoding threads (default: one per CPU core)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache at --out")
    p.add_argument("--verify", metavar="CACHE",
                   help="check every image of CACHE against its checksum instead (default: none)")
    p.set_defaults(func=cmd_prepare_data)

    p = sub.add_parser("report", help="write the HTML report of one or more analysis folders")
    p.add_argument("results", nargs="+", help="folders written by `nad analyze` (one per network)")
    p.add_argument("--out", default="nad_output/report.html", help="the HTML file to write")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("similarity", help="task x task similarity matrix of a mask bank (CSV)")
    p.add_argument("--bank", required=True, help="mask bank (masks.safetensors)")
    p.add_argument("--metric", default="iou", choices=["iou", "iomin"],
                   help="per-gate-point overlap: iou (the paper's) or intersection over the smaller set")
    p.add_argument("--out", help="CSV file to write (default: print to stdout)")
    p.set_defaults(func=cmd_similarity)
    return parser


def _note(show, message, category, filename, lineno, file=None, line=None) -> None:
    """nad-ext's warnings (a bank without checksums, ...) as one line; others by ``show``."""
    if Path(filename).resolve().is_relative_to(Path(__file__).resolve().parent):
        print(f"note: {message}", file=sys.stderr)
    else:
        show(message, category, filename, lineno, file, line)


def _is_user_error(err: RuntimeError) -> bool:
    """A run folder in use, or another torchrun process's failure (the modules that raise them
    are loaded by then)."""
    rundir, distributed = sys.modules.get("nad_ext.rundir"), sys.modules.get("nad_ext.distributed")
    return (rundir is not None and isinstance(err, rundir.RunLockedError)) or (
        distributed is not None and isinstance(err, distributed.PeerError))


def _distributed_call(name: str, *args) -> None:
    """``nad_ext.distributed.<name>(*args)`` if a verb has loaded it (not otherwise: it imports torch)."""
    distributed = sys.modules.get("nad_ext.distributed")
    if distributed is not None:
        getattr(distributed, name)(*args)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    shown = warnings.showwarning
    warnings.showwarning = functools.partial(_note, shown)
    try:
        if getattr(args, "model", None) is not None:  # an unknown name first, before any other complaint
            from nad_ext import models

            models.get_spec(args.model)
        args.func(args)
    except (ValueError, OSError, RuntimeError) as err:
        # OSError: missing, unreadable or unwritable files (a full disk); RuntimeError: only ours
        # (a run folder in use, another torchrun process failed) count as user errors.
        if isinstance(err, RuntimeError) and not _is_user_error(err):
            raise
        print(f"error: {err}", file=sys.stderr)
        _distributed_call("record_error", err)
        return USER_ERROR
    except KeyboardInterrupt:
        print("interrupted" + (" (continue with --resume)" if getattr(args, "verb", "") == "disentangle" else ""),
              file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = shown
        _distributed_call("shutdown")
    return 0


if __name__ == "__main__":
    sys.exit(main())
