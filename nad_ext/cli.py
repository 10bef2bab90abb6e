"""The ``nad`` command line: each verb is one call of the Python API plus argument parsing and
printing. ``nad <verb> --help`` lists a verb's options."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, fields
from pathlib import Path

BUILTIN = "builtin"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="registry name (vgg16, resnet50, densenet121, darts, zoo_plain, ...)")
    p.add_argument("--weights", help="weights file (.pt/.pth state dict or .safetensors); zoo models default to the cached zoo")
    p.add_argument("--data", default=BUILTIN,
                   help="an ImageFolder tree with train/ and val/, or 'builtin' for the generated shapes (default)")
    p.add_argument("--cache", default=".nad_cache", help="where the built-in zoo's weights are cached")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def _load_data(args, split: str):
    from nad_ext import data

    return data.generated_shapes(split) if args.data == BUILTIN else data.image_folder(args.data, split)


def _load_model(args, train, val):
    from nad_ext import models

    if args.weights is None and args.model in models.ZOO:
        if args.data != BUILTIN:
            raise SystemExit(f"error: --weights is required for {args.model} on data other than the built-in set")
        return models.load_zoo(args.cache, train, val, names=[args.model])[args.model][0]
    if args.weights is None:
        raise SystemExit(f"error: --weights is required for {args.model}: no pretrained weights can be downloaded")
    return models.load_model(args.model, args.weights, num_classes=len(train.classes))


def cmd_gate_points(args) -> None:
    from nad_ext import models
    from nad_ext.trainer import build_gated_model

    train = _load_data(args, "train")
    model = _load_model(args, train, _load_data(args, "val")) if args.weights or args.model in models.ZOO \
        else models.load_model(args.model, num_classes=len(train.classes))
    size = args.image_size or models.get_spec(args.model).input_size
    gated = build_gated_model(model, "auto" if args.auto else args.model, 1, size, model_id=args.model)
    for i, p in enumerate(gated.gate_points):
        print(f"{i:3d}  {p.name:40s} {p.channels:6d} channels")
    print(f"{len(gated.gate_points)} gate points, {sum(gated.layer_sizes)} channels")


def _config_from_args(args):
    from nad_ext.objective import SELECTIVE_DEFAULTS
    from nad_ext.trainer import NADConfig

    values = {f.name: getattr(args, f.name) for f in fields(NADConfig) if getattr(args, f.name, None) is not None}
    if args.selective:  # explicit --negatives / --negative-weight win over the switch's defaults
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


def cmd_disentangle(args) -> None:
    from nad_ext.objective import describe_objective
    from nad_ext.trainer import disentangle

    train, val = _load_data(args, "train"), _load_data(args, "val")
    model = _load_model(args, train, val)
    gate_points = args.gate_points.split(",") if args.gate_points and "," in args.gate_points else (args.gate_points or args.model)
    if isinstance(gate_points, str) and gate_points not in ("auto", args.model):
        gate_points = [gate_points]
    tasks = _load_tasks(args.tasks, train.classes) if args.tasks else None
    config = _config_from_args(args)
    print(f"objective: {describe_objective(asdict(config))}")
    bank = disentangle(model, train, gate_points, model_id=args.model, config=config, tasks=tasks,
                       out_dir=args.out, resume=args.resume, overwrite=args.overwrite)
    print(f"{len(bank.tasks)} tasks x {len(bank.gate_points)} gate points, epoch {bank.epoch}: "
          f"{Path(args.out) / 'masks.safetensors'}")


def cmd_analyze(args) -> None:
    from nad_ext import analysis, models
    from nad_ext.maskbank import MaskBank
    from nad_ext.trainer import build_gated_model

    bank = MaskBank.load(args.bank)
    if bank.model_id != args.model:  # before its gate points are looked up in the wrong network
        raise ValueError(f"mask bank does not match the model: {args.bank} is for model {bank.model_id!r}, "
                         f"not {args.model!r}")
    train, val = _load_data(args, "train"), _load_data(args, "val")
    model = _load_model(args, train, val)
    size = args.image_size or bank.config.get("image_size") or models.get_spec(args.model).input_size
    gated = build_gated_model(model, [p.name for p in bank.gate_points], len(bank.tasks), size, model_id=args.model)
    analysis.run_all(gated, bank, val, size, args.out, num_mosaics=args.mosaics, seed=args.seed)
    print(f"analyses written to {args.out}")


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
    parser = argparse.ArgumentParser(prog="nad", description="Neural Architecture Disentanglement")
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("demo", help="train the built-in zoo, disentangle every class, write the report")
    p.add_argument("--out", default="nad_output/demo")
    p.add_argument("--cache", default=".nad_cache")
    p.add_argument("--epochs", type=int, default=None, help="NAD epochs (default: the demo's setting)")
    p.add_argument("--mosaics", type=int, default=None, help="mosaics for the hit rate (default: the demo's setting)")
    p.add_argument("--device", default="auto")
    p.add_argument("--selective", action="store_true",
                   help="the selective objective (not the paper's): sub-architectures that also reject other classes")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("gate-points", help="list a model's gate points (its preset, or --auto proposals)")
    _add_model_args(p)
    p.add_argument("--auto", action="store_true", help="propose gate points for an unknown network")
    p.add_argument("--image-size", type=int, default=None)
    p.set_defaults(func=cmd_gate_points)

    p = sub.add_parser("disentangle", help="learn every task's gates; writes a mask bank")
    _add_model_args(p)
    p.add_argument("--out", required=True, help="output folder (mask bank, per-epoch copies, log.json)")
    p.add_argument("--gate-points", help="comma-separated module names, 'auto', or a preset name (default: the model's preset)")
    p.add_argument("--beta", type=float)
    p.add_argument("--lr", type=float)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--tasks-per-step", type=int)
    p.add_argument("--mode", choices=["batched", "paper"])
    p.add_argument("--seed", type=int)
    p.add_argument("--image-size", type=int)
    p.add_argument("--fuse", choices=["auto", "on", "off"],
                   help="fused fast path: BatchNorm folded, nad::masked_conv2d (default auto: on with CUDA)")
    p.add_argument("--precision", choices=["auto", "float32", "bfloat16"],
                   help="network precision; gate logits stay float32 (default auto: bfloat16 on the fused CUDA path)")
    p.add_argument("--cuda-graph", choices=["auto", "on", "off"],
                   help="replay the step from CUDA graphs (default auto: on with the fused CUDA path)")
    p.add_argument("--negatives", type=float, metavar="R",
                   help="selective objective: R x batch size images of other classes join each task batch "
                        "(default 0: the paper's objective)")
    p.add_argument("--negative-weight", type=float, metavar="GAMMA",
                   help="selective objective: weight of the term that keeps a task from predicting itself on them")
    p.add_argument("--selective", action="store_true",
                   help="the selective objective with the settings tuned on the demo zoo "
                        "(nad_ext.objective.SELECTIVE_DEFAULTS; printed at the start); --negatives and "
                        "--negative-weight override them")
    p.add_argument("--tasks", help='JSON file {"task": ["class", ...]}; default: one task per class')
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the mask bank in --out")
    p.set_defaults(func=cmd_disentangle)

    p = sub.add_parser("analyze", help="run the paper's analyses on a mask bank")
    _add_model_args(p)
    p.add_argument("--bank", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--mosaics", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=None)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("report", help="write the HTML report of one or more analysis folders")
    p.add_argument("results", nargs="+", help="folders written by `nad analyze` (one per network)")
    p.add_argument("--out", default="nad_output/report.html")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("similarity", help="task x task similarity matrix of a mask bank (CSV)")
    p.add_argument("--bank", required=True)
    p.add_argument("--metric", default="iou", choices=["iou", "iomin"])
    p.add_argument("--out")
    p.set_defaults(func=cmd_similarity)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
