"""What the verbs share: the parser class, the argument groups several verbs take, and loading
their data, model, tasks and config from the parsed arguments. Nothing heavy is imported at
module level (torch takes seconds to load): each helper imports what it uses when it runs."""
from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

BUILTIN = "builtin"
USER_ERROR = 2  # argparse's own exit status for usage errors; used for every user error
# training.SELECTIVE_DEFAULTS and NADConfig.gate_temperature, written out so that --help shows
# them without importing torch (python_tests/test_cli.py checks that they agree).
SELECTIVE = {"negatives": 0.25, "negative_weight": 2.0, "gate": "annealed"}
GATE_TEMPERATURE = 0.2


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after each option's help, except where there is nothing to show (a
    flag, or a default of None whose meaning the help text states itself)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or isinstance(action, argparse._VersionAction):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser with :class:`HelpFormatter`; its sub-commands get it too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def add_model_args(p: argparse.ArgumentParser) -> None:
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


def add_units_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--units", default="channels", choices=["channels", "mlp", "heads"],
                   help="what a preset (or 'auto') gates: block channels, the MLP hidden units of "
                        "transformer/ConvNeXt blocks, or attention heads")


def add_pipeline_args(p: argparse.ArgumentParser, bad_images: bool) -> None:
    p.add_argument("--data-pipeline", choices=["auto", "exact", "fast"], default="auto",
                   help="image loading: exact (PIL + per-image transforms, the reference), fast (libjpeg-turbo or "
                        "batched nvjpeg decode, crops on the step's device; on the CPU the same pixels); "
                        "auto: fast")
    if bad_images:
        p.add_argument("--on-bad-image", choices=["skip", "stop"], default="skip",
                       help="an unreadable image file is skipped with a warning and listed in log.json (skip) "
                            "or stops the run with its path (stop)")


def add_nonfinite_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--on-nonfinite", choices=["stop", "skip"], default="stop",
                   help="a NaN or Inf in a task's gate gradient stops the run, naming the task, gate points and "
                        "epoch, before that epoch is committed (stop), or skips that task's step and counts it in "
                        "log.json (skip)")


def setup(args):
    """This process's place in a torchrun world (a world of one without torchrun)."""
    from nad_ext import distributed

    return distributed.setup(args.device, args.dist_timeout)


def load_data(args, split: str):
    from nad_ext import data
    from nad_ext.data import cache

    if args.data == BUILTIN:
        return data.generated_shapes(split)
    if cache.is_cache(args.data):
        return cache.open_split(args.data, split)
    return data.image_folder(args.data, split)


def check_splits(args, train, val) -> None:
    """train/ and val/ of ``--data`` must have the same classes: the model is sized, and tasks and
    banks indexed, by train's; a val/ with other class folders would be scored against wrong labels."""
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        diff = "; ".join(part for part in (f"only in train/: {only_train}" if only_train else "",
                                           f"only in val/: {only_val}" if only_val else "") if part) \
            or "the same names in another order"
        raise ValueError(f"--data {args.data}: train/ and val/ must have the same class folders ({diff})")


def load_model(args, train, val):
    from nad_ext import models

    check_splits(args, train, val)
    if args.weights is None and args.model in models.ZOO:
        if args.data != BUILTIN:
            raise ValueError(f"--weights is required for {args.model} on data other than the built-in set")
        return models.load_zoo(args.cache, train, val, names=[args.model])[args.model][0]
    if args.weights is None:
        raise ValueError(f"--weights is required for {args.model}: no pretrained weights can be downloaded")
    return models.load_model(args.model, args.weights, num_classes=len(train.classes))


def add_execution_args(p) -> None:
    """--fuse, --precision, --cuda-graph: how a step runs (NADConfig's execution settings)."""
    p.add_argument("--fuse", choices=["auto", "on", "fold", "off"], default="auto",
                   help="fast path: on = BatchNorm folded + nad::masked_conv2d (CUDA's), fold = BatchNorm folded + "
                        "channels_last (the CPU's), off = the network as written (auto: on with CUDA, fold on a CPU)")
    p.add_argument("--precision", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="network precision; gate logits stay float32 (auto: bfloat16 on the fused CUDA path)")
    p.add_argument("--cuda-graph", choices=["auto", "on", "off"], default="auto",
                   help="replay the step from CUDA graphs (auto: on with the fused CUDA path)")


def add_selective_args(p, batch: str, task: str) -> None:
    """--negatives, --negative-weight, --selective and the gate options: the objective's variants.
    ``batch`` names what the negatives join ("each task batch"), ``task`` what must not claim them."""
    p.add_argument("--negatives", type=float, metavar="R",
                   help=f"selective objective (not the paper's): R x its size images of other classes join {batch} "
                        f"(default: 0, the paper's objective; {SELECTIVE['negatives']:g} with --selective)")
    p.add_argument("--negative-weight", type=float, metavar="GAMMA",
                   help=f"selective objective: weight of the term that keeps {task} from predicting its classes on "
                        f"other classes' images (default: 0; {SELECTIVE['negative_weight']:g} with --selective)")
    p.add_argument("--selective", action="store_true",
                   help="the selective objective with the settings tuned on the demo zoo and a real-data CNN (the "
                        "--negatives, --negative-weight and --gate here); an option given explicitly overrides its "
                        "value")
    add_gate_args(p)


def add_gate_args(p) -> None:
    """--gate and --gate-temperature: how the gates are trained (NADConfig.gate)."""
    p.add_argument("--gate", choices=["soft", "annealed", "straight_through"],
                   help="how the gates are trained: soft, sigmoid(m) (the paper's); annealed, sigmoid(m / tau) with "
                        "tau lowered from 1 to --gate-temperature over the run, so that what is trained ends near "
                        "the binary sub-architecture that is kept; straight_through, the binary gates with the soft "
                        f"gradient (default: soft; {SELECTIVE['gate']} with --selective)")
    p.add_argument("--gate-temperature", type=float, metavar="TAU",
                   help=f"--gate annealed: the temperature at the end of the run (default: {GATE_TEMPERATURE:g})")


def config_from_args(args, kind=None):
    """The settings dataclass ``kind`` (default ``NADConfig``; ``PathSettings`` for ``nad paths``)
    from the parsed arguments of the same names, given ones only; ``--selective`` fills in
    ``SELECTIVE_DEFAULTS`` where no option was given explicitly."""
    from nad_ext.training import SELECTIVE_DEFAULTS, NADConfig

    kind = NADConfig if kind is None else kind
    values = {f.name: getattr(args, f.name) for f in fields(kind) if getattr(args, f.name, None) is not None}
    if getattr(args, "selective", False):  # explicit --negatives / --negative-weight win over the switch's defaults
        values = {**SELECTIVE_DEFAULTS, **values}
    return kind(**values)


def load_tasks(path: str, classes: list[str]):
    """Tasks from a JSON file {"task name": ["class", ...], ...}: every task a non-empty name (JSON
    keys are strings; a duplicated key is refused, not silently dropped) and a non-empty list of
    distinct class names of the data."""
    from nad_ext.gates.maskbank import Task

    where = f"--tasks {path}"
    expected = 'expected a JSON object {"task name": ["class", ...], ...}'

    def no_duplicates(pairs):
        names = [name for name, _ in pairs]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"{where}: task {twice[0]!r} appears more than once; task names must be unique")
        return dict(pairs)

    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ValueError(f"cannot read tasks file {path} ({where}): {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{where} is not a text file; {expected}") from None
    try:
        spec = json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); {expected}, "
                         "task names in double quotes") from None
    if not isinstance(spec, dict) or not spec:
        got = "an empty object" if isinstance(spec, dict) else _json_kind(spec)
        raise ValueError(f"tasks file {path} must hold a non-empty JSON object {{task: [class, ...]}} (--tasks); "
                         f"got {got}")
    tasks = []
    for name, members in spec.items():
        if not name.strip():
            raise ValueError(f"{where}: a task has an empty name; {expected}")
        if not isinstance(members, list) or not all(isinstance(c, str) for c in members):
            got = _json_kind(members) if not isinstance(members, list) else \
                f"an array holding {_json_kind(next(c for c in members if not isinstance(c, str)))}"
            raise ValueError(f"task {name!r} in {path}: expected a list of class names (strings), got {got}")
        if not members:
            raise ValueError(f"task {name!r} in {path} has no classes; give it at least one of {classes}")
        unknown = [c for c in members if c not in classes]
        if unknown:
            raise ValueError(f"task {name!r} in {path}: unknown classes {unknown}; the data has {classes}")
        twice = sorted({c for c in members if members.count(c) > 1})
        if twice:
            raise ValueError(f"task {name!r} in {path} lists class {twice[0]!r} more than once")
        tasks.append(Task(name, tuple(classes.index(c) for c in members)))
    return tasks


def _json_kind(value) -> str:
    """What a parsed JSON value is, in JSON's words: "an array", "a number", "null", ..."""
    kinds = {list: "an array", dict: "an object", str: "a string", int: "a number", float: "a number",
             bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def network_from_args(args, model):
    """The :class:`~nad_ext.training.Network` of ``--model`` and ``--gate-points`` (comma-separated
    specs, 'auto', or a preset name; default: the model's preset) with ``--units``."""
    from nad_ext.training import Network

    gate_points = args.gate_points.split(",") if args.gate_points and "," in args.gate_points else (args.gate_points or args.model)
    if isinstance(gate_points, str) and gate_points not in ("auto", args.model):
        gate_points = [gate_points]
    return Network(model, gate_points, args.model, units=args.units)
