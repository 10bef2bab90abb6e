"""The settings of a run: :class:`NADConfig` (training settings, the paper's defaults), and the
run's tasks and their images (:func:`resolve_run`: the model preset's beta and input size
filled in where the config leaves them open)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from nad_ext import models
from nad_ext.data import ImageSet
from nad_ext.data import pipeline as nad_pipeline
from nad_ext.gates.maskbank import Task
from nad_ext.training.nonfinite import POLICIES as NONFINITE_POLICIES

DEFAULT_TARGET = 0.3  # the paper's typical open ratio: the default target of beta calibration


def check_target(target_open_ratio) -> None:
    """ValueError unless ``target_open_ratio`` is a number in (0, 1)."""
    if (not isinstance(target_open_ratio, (int, float)) or isinstance(target_open_ratio, bool)
            or not 0 < target_open_ratio < 1):
        raise ValueError(f"target_open_ratio must be a number in (0, 1), got {target_open_ratio!r}")


@dataclass
class NADConfig:
    """Training settings; the defaults are the paper's (METHOD.md).

    ``beta`` None takes the model preset's value; ``"auto"`` calibrates it (see
    :func:`nad_ext.training.calibration.calibrate_beta`) for a mean open ratio near
    ``target_open_ratio``; ``image_size`` None takes the preset's input size (224 for the
    ImageNet networks). ``data_pipeline`` and ``on_bad_image``: see
    :mod:`nad_ext.data.pipeline` ("auto": the fast pipeline). ``negatives`` r > 0 and
    ``negative_weight`` gamma > 0 choose the selective objective
    (:mod:`nad_ext.training.objective`; not the paper's): each task batch of own-class images is
    joined by round(r x its size) images of other classes, whose prediction as the task is
    penalised with weight gamma. 0 and 0 (default) is the paper's. ``on_nonfinite``: what a
    NaN or Inf in a task's gate gradient does (:mod:`nad_ext.training.nonfinite`): "stop" the
    run naming the task, gate points and epoch, before the epoch is committed, or "skip" that
    task's step and count it in log.json (``nonfinite_steps``). ``gate``: how the gates are
    trained; "soft" (the paper's) multiplies by sigmoid(m); "annealed" by sigmoid(m / tau),
    tau lowered geometrically from 1 in the first epoch to ``gate_temperature`` in the last,
    so that the gates trained last are nearly the binary ones the analyses keep;
    "straight_through" by the binary gates themselves, with the soft gates' gradient (see
    :func:`nad_ext.gates.model.straight_through_gate`). Only "soft" is the paper's.
    """

    beta: float | str | None = None
    target_open_ratio: float = DEFAULT_TARGET
    lr: float = 0.1
    batch_size: int = 16
    epochs: int = 21
    init_std: float = 1.0
    seed: int = 0
    image_size: int | None = None
    mode: str = "batched"
    tasks_per_step: int = 16
    device: str = "auto"
    keep_every_epoch: bool = True
    fuse: str = "auto"
    precision: str = "auto"
    cuda_graph: str = "auto"
    data_pipeline: str = "auto"
    on_bad_image: str = "skip"
    negatives: float = 0.0
    negative_weight: float = 0.0
    on_nonfinite: str = "stop"
    gate: str = "soft"
    gate_temperature: float = 0.2

    def validate(self) -> None:
        for name in ("beta", "lr", "init_std"):
            value = getattr(self, name)
            if name == "beta" and (value is None or value == "auto"):
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        for name in ("batch_size", "epochs", "tasks_per_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.image_size is not None and (not isinstance(self.image_size, int) or self.image_size < 8):
            raise ValueError(f"image_size must be an integer >= 8, got {self.image_size!r}")
        if self.mode not in ("batched", "paper"):
            raise ValueError(f"mode must be 'batched' or 'paper', got {self.mode!r}")
        if self.fuse not in FUSE:
            raise ValueError(f"fuse must be one of {', '.join(map(repr, FUSE))}, got {self.fuse!r}")
        if self.cuda_graph not in ("auto", "on", "off"):
            raise ValueError(f"cuda_graph must be 'auto', 'on' or 'off', got {self.cuda_graph!r}")
        if self.data_pipeline not in nad_pipeline.PIPELINES:
            raise ValueError(f"data_pipeline must be one of {', '.join(nad_pipeline.PIPELINES)}, "
                             f"got {self.data_pipeline!r}")
        if self.on_bad_image not in nad_pipeline.BAD_IMAGE_POLICIES:
            raise ValueError(f"on_bad_image must be one of {', '.join(nad_pipeline.BAD_IMAGE_POLICIES)}, "
                             f"got {self.on_bad_image!r}")
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, got {self.on_nonfinite!r}")
        value = self.gate_temperature
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1:
            raise ValueError(f"gate_temperature must be a number in (0, 1], got {value!r}")
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {', '.join(GATES)}, got {self.gate!r}")
        if self.mode == "paper" and self.gate != "soft":
            raise ValueError(f"mode='paper' trains the paper's soft gates; gate={self.gate!r} is not the paper's "
                             "(use mode='batched')")
        check_target(self.target_open_ratio)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("negatives", "negative_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if (self.negatives > 0) != (self.negative_weight > 0):
            raise ValueError(f"the selective objective needs both negatives > 0 and negative_weight > 0 "
                             f"(0 and 0: the paper's); got negatives={self.negatives!r}, "
                             f"negative_weight={self.negative_weight!r}")

    def execution(self, device: torch.device) -> "Execution":
        """How the step runs on ``device`` (:class:`Execution`), with "auto" resolved."""
        cuda = device.type == "cuda"
        mode = ("on" if cuda else "fold") if self.fuse == "auto" else self.fuse
        fuse = mode == "on"
        precision = self.precision
        if precision == "auto":
            precision = "bfloat16" if fuse and cuda else "float32"
        if self.cuda_graph == "on" and not cuda:
            raise ValueError(f"cuda_graph='on' needs a CUDA device; the device is {device}")
        graph = self.cuda_graph == "on" or (self.cuda_graph == "auto" and cuda and fuse)
        dtype = PRECISIONS[precision]
        return Execution(fuse, mode == "fold", dtype, dtype != torch.float32 or mode == "fold", graph)


# NADConfig.fuse: "on" the fused gated convolutions (BatchNorm folded, nad::masked_conv2d: CUDA's
# fast path; on a CPU their CPU kernels run, slower than oneDNN's convolutions), "fold" BatchNorm
# folded and the network channels_last, gates by hooks (the CPU's fast path: 1.3-1.8x the eager
# network on the zoo, benchmarks/RESULTS.md), "off" the network as written; "auto": "on" with
# CUDA, "fold" on a CPU.
FUSE = ("auto", "on", "fold", "off")


@dataclass(frozen=True)
class Execution:
    """How a step runs (:meth:`NADConfig.execution`): ``fuse`` (fused gated convolutions),
    ``fold`` (BatchNorm folded only), the network's ``dtype`` and ``channels_last`` memory format
    (:class:`~nad_ext.gates.model.GatedModel`), and whether the step replays a CUDA ``graph``."""

    fuse: bool
    fold: bool
    dtype: torch.dtype
    channels_last: bool
    graph: bool

    def gated_options(self) -> dict:
        """The keyword arguments of :func:`~nad_ext.training.build.build_gated_model` that say it."""
        return dict(fuse=self.fuse, fold=self.fold, dtype=self.dtype, channels_last=self.channels_last)

    def describe(self) -> str:
        """E.g. "fused, bfloat16, CUDA graphs" or "BatchNorm folded, channels_last, float32"."""
        return ", ".join((["fused"] if self.fuse else []) + (["BatchNorm folded"] if self.fold else [])
                         + (["channels_last"] if self.channels_last else []) + [str(self.dtype).replace("torch.", "")]
                         + (["CUDA graphs"] if self.graph else []))


GATES = ("soft", "annealed", "straight_through")


def gate_temperature(config: NADConfig, epoch: int) -> float:
    """The soft gates' temperature in ``epoch`` (0-based): 1, except under ``gate="annealed"``,
    geometric from 1 in the first epoch to ``config.gate_temperature`` in the last."""
    if config.gate != "annealed":
        return 1.0
    return config.gate_temperature ** (epoch / max(config.epochs - 1, 1))


PRECISIONS = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}
# Settings that change how a run executes but not its result; a run may resume with others.
# (target_open_ratio only matters before training, when it chooses beta.)
# (on_nonfinite only matters when a gradient is NaN or Inf: a run stopped by one may go on skipping.)
EXECUTION_SETTINGS = ("epochs", "device", "mode", "tasks_per_step", "keep_every_epoch", "fuse", "precision",
                      "cuda_graph", "data_pipeline", "on_bad_image", "target_open_ratio", "on_nonfinite")


def default_tasks(images: ImageSet) -> list[Task]:
    """One task per class, named after the class."""
    return [Task(name, (c,)) for c, name in enumerate(images.classes)]


def task_indices(images: ImageSet, tasks: Sequence[Task]) -> list[list[int]]:
    """Each task's training images (indices into ``images``, ascending); ValueError naming a task
    whose classes ``images`` lacks or that has no images."""
    out = []
    for task in tasks:
        bad = [c for c in task.classes if not 0 <= c < len(images.classes)]
        if bad:
            raise ValueError(f"task {task.name!r} names classes {bad} that {images.name} does not have")
        idx = sorted(i for c in task.classes for i in images.indices_of_class(c))
        if not idx:
            raise ValueError(f"task {task.name!r} has no training images in {images.name}")
        out.append(idx)
    return out


def resolve_run(train: ImageSet, model_id: str, tasks: Sequence[Task] | None,
                config: NADConfig | None) -> tuple[NADConfig, list[Task], list[list[int]]]:
    """The run's config (a copy, the model preset's defaults filled in, validated), its tasks
    (default: one per class) and each task's training images."""
    config = NADConfig(**asdict(config)) if config is not None else NADConfig()
    spec = models.MODELS.get(model_id)
    if config.beta is None:
        if spec is None:
            raise ValueError(f"beta must be given for model {model_id!r}, which has no preset: pass a number, "
                             "or beta='auto' to calibrate it")
        if spec.beta is None:
            raise ValueError(f"model {model_id!r} has no tuned beta (the paper did not disentangle it): pass "
                             "beta=<number> (--beta), or beta='auto' (--beta auto) to calibrate it")
        config.beta = spec.beta
    if config.image_size is None:
        config.image_size = spec.input_size if spec is not None else 224
    config.validate()
    tasks = list(tasks) if tasks is not None else default_tasks(train)
    if not tasks:
        raise ValueError("tasks is empty")
    indices = task_indices(train, tasks)
    if config.negatives:
        for task, idx in zip(tasks, indices):
            if len(idx) == len(train):
                raise ValueError(f"task {task.name!r} covers every class of {train.name}: the selective "
                                 f"objective (negatives > 0) needs other classes' images as its negatives")
    return config, tasks, indices
