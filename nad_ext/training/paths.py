"""Per-image routing paths (issue 26): NAD with one task per image.

The path of an image is the sub-architecture that carries that one image: a task whose batches
are ``views`` augmented views of the image (the paper's crop and flip, METHOD.md, drawn from the
image's own generator, seeded by (seed, step, image index)), whose label is the image's label or,
with ``target="prediction"``, the original network's prediction on the image's evaluation view
(CDRP's choice), trained with the paper's objective (or the selective one, ``negatives`` > 0:
other classes' images join each step's views) and update by :func:`~nad_ext.training.loop.train_step`
itself, many images per step. An image's initial gates are seeded by its index, so its path
depends neither on which images it is trained with nor on the chunking (tested).

:func:`iter_paths` yields the paths chunk by chunk (:class:`~nad_ext.gates.pathstore.PathChunk`);
:func:`learn_paths` keeps them in memory or writes them to a path store. Images whose path is not
meaningful get a status (:data:`~nad_ext.gates.pathstore.STATUS`) and a :class:`PathWarning`.
"""
from __future__ import annotations

import math
import time
from collections import Counter
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator, Sequence

import torch

from nad_ext import distributed, models
from nad_ext._utils import progress as nad_progress
from nad_ext.data import ImageSet
from nad_ext.data import pipeline as nad_pipeline
from nad_ext.data.decode import BadImageError
from nad_ext.gates.model import init_logits
from nad_ext.gates.pathstore import STATUS, PathChunk, PathStore
from nad_ext.training.build import Network
from nad_ext.training.config import EXECUTION_SETTINGS as RUN_EXECUTION_SETTINGS
from nad_ext.training.config import NADConfig, gate_temperature
from nad_ext.training.loop import epoch_generator, train_step
from nad_ext.training.negatives import draw_negatives, negatives_per_batch, task_class_matrix
from nad_ext.training.nonfinite import NonFiniteGradientError

TARGETS = ("label", "prediction")
FIELDS = ("image_index", "label", "target", "prediction", "status")  # PathChunk's, before its logits
OK, MISCLASSIFIED, NO_VIEWS, NONFINITE = (next(k for k, v in STATUS.items() if v == name)
                                          for name in ("ok", "misclassified", "no_views", "nonfinite"))
EVAL_BATCH = 256  # evaluation views per forward pass (the predictions)


class PathWarning(UserWarning):
    """Some images got no meaningful path (misclassified, unreadable, non-finite gradients)."""


@dataclass
class PathSettings:
    """How paths are trained.

    Defaults (20 steps of 4 views from gates N(0, 0.01^2)) from the studies on the zoo in
    benchmarks/RESULTS.md ("Per-image paths: steps, views, start" and "Per-image paths, again"):
    from the class runs' start (std 1) a step moves a gate point's logits by lr in L2 norm
    against their norm of 4-8, so 20 steps leave a path near its random start; from std 0.1 or
    0.01 the first steps set each channel's sign, with the same path-to-class agreement at 20
    and 40 steps (within 4 points), and from 0.01 an image's paths under two seeds agree more
    (IoU 0.83-0.94 against 0.68-0.74 at 20 steps); views beyond 4 changed nothing measured;
    steps kept helping up to 40 (a cost choice).

    ``steps``: training steps per image; ``views``: augmented views of the image per step (its
    batch); ``images_per_step``: images trained together in one step; ``chunk_size``: images whose
    gates are held in memory together (one chunk of the output). ``target``: "label" (the image's
    label) or "prediction" (the original network's answer on its evaluation view). ``beta`` None
    takes the model preset's (:func:`PathSettings.from_config` takes a run's); ``lr``, ``seed``,
    ``init_std``, ``negatives``/``negative_weight`` (the selective objective), ``gate`` and
    ``gate_temperature`` (annealed over the steps instead of epochs), ``image_size`` (None:
    the preset's) and the execution settings (``device``, ``fuse``, ``precision``, ``cuda_graph``,
    ``data_pipeline``, ``on_nonfinite``) mean what they mean in :class:`NADConfig`; under
    ``on_nonfinite="skip"`` an image with a non-finite gate gradient gets status "nonfinite".
    """

    steps: int = 20
    views: int = 4
    images_per_step: int = 64
    chunk_size: int = 1024
    target: str = "label"
    beta: float | None = None
    lr: float = 0.1
    seed: int = 0
    init_std: float = 0.01
    negatives: float = 0.0
    negative_weight: float = 0.0
    gate: str = "soft"
    gate_temperature: float = NADConfig.gate_temperature
    image_size: int | None = None
    device: str = "auto"
    fuse: str = "auto"
    precision: str = "auto"
    cuda_graph: str = "auto"
    data_pipeline: str = "auto"
    on_nonfinite: str = "stop"

    @classmethod
    def from_config(cls, config: NADConfig | dict, **overrides) -> "PathSettings":
        """The settings a class-task run used (its :class:`NADConfig`, or a mask bank's
        ``config`` dict) for the fields both have but the paths' own (steps, views, grouping,
        target, init_std), then ``overrides``."""
        values = asdict(config) if isinstance(config, NADConfig) else dict(config)
        # The paths' own: not a class run's (its init_std of 1 would leave paths near their start).
        names = {f.name for f in fields(cls)} - {"views", "steps", "images_per_step", "chunk_size", "target",
                                                 "init_std"}
        return cls(**{**{k: v for k, v in values.items() if k in names}, **overrides})

    def validate(self) -> None:
        """ValueError naming the first bad setting."""
        for name, low in (("steps", 1), ("views", 1), ("images_per_step", 1), ("chunk_size", 1), ("seed", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(map(repr, TARGETS))}, got {self.target!r}")
        if self.beta is not None and (not isinstance(self.beta, (int, float)) or isinstance(self.beta, bool)
                                      or not math.isfinite(self.beta) or self.beta <= 0):
            raise ValueError(f"beta must be a positive number (or None: the model preset's), got {self.beta!r}")
        self._config(1.0 if self.beta is None else self.beta).validate()

    def nad_config(self, model_id: str) -> NADConfig:
        """The :class:`NADConfig` that :func:`train_step` gets: beta and image size filled in
        from the model preset where they are None; validated."""
        self.validate()
        spec = models.MODELS.get(model_id)
        beta = self.beta
        if beta is None:
            if spec is None or spec.beta is None:
                what = "has no preset" if spec is None else "has no tuned beta"
                raise ValueError(f"beta must be given for model {model_id!r}, which {what}: pass a number "
                                 "(a class-task run's: PathSettings.from_config(bank.config))")
            beta = spec.beta
        config = self._config(beta)
        if config.image_size is None:
            config.image_size = spec.input_size if spec is not None else 224
        config.validate()
        return config

    def _config(self, beta: float) -> NADConfig:
        shared = {f.name for f in fields(NADConfig)} & {f.name for f in fields(self)} - {"beta"}
        return NADConfig(beta=beta, batch_size=self.views, epochs=self.steps, on_bad_image="skip",
                         **{k: getattr(self, k) for k in shared})


def check_indices(indices, num_images: int) -> list[int]:
    """The images to train (default: all), as a list of distinct ints in range; ValueError otherwise."""
    if indices is None:
        return list(range(num_images))
    out = [int(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]
    if not out:
        raise ValueError("indices is empty: give at least one image")
    bad = [i for i in out if not 0 <= i < num_images]
    if bad:
        raise ValueError(f"indices {bad[:5]} out of range: the image set has {num_images} images")
    if len(set(out)) != len(out):
        twice = sorted(i for i, n in Counter(out).items() if n > 1)[:5]
        raise ValueError(f"indices lists images {twice} more than once; each image has one path")
    return out


def iter_paths(network: Network, images: ImageSet, *, indices=None, settings: PathSettings | None = None,
               progress: bool = True) -> Iterator[PathChunk]:
    """The paths of ``images[indices]`` (default: all), one :class:`PathChunk` per
    ``settings.chunk_size`` images, in the order of ``indices``; nothing is kept. Warns
    (:class:`PathWarning`) after the last chunk when images got no meaningful path."""
    return _chunks(_Trainer(network, images, indices, settings or PathSettings()), progress, stacklevel=3)


def learn_paths(network: Network, images: ImageSet, *, indices=None, settings: PathSettings | None = None,
                out: str | Path | None = None, keep_logits: bool = False, overwrite: bool = False,
                resume: bool = False, progress: bool = True) -> PathChunk:
    """Trains the path of each image of ``images[indices]`` (default: all; a list of indices, e.g.
    the misclassified images an analysis selects) with ``settings`` (:class:`PathSettings`).

    Without ``out`` the paths stay in memory: one :class:`PathChunk` of every image, in the
    order of ``indices``. With ``out`` each chunk goes to a path store in that folder
    (:class:`~nad_ext.gates.pathstore.PathStore`; binary paths, or the gate logits too with
    ``keep_logits``) and the returned chunk has every image's index, label, target, prediction and
    status but no logits (``logits == []``). An existing store is refused unless ``overwrite``
    (replaced) or ``resume`` (continued: it must have been made with the same settings, network
    and images; the images it holds are not trained again, nor returned). Warns
    (:class:`PathWarning`) naming how many images got no meaningful path, and why.
    """
    trainer = _Trainer(network, images, indices, settings or PathSettings())
    store = None if out is None else open_store(out, trainer, keep_logits, overwrite, resume)
    if store is not None:
        trainer.indices = [i for i in trainer.indices if i not in store.done_indices()]
    parts = []
    try:
        for chunk in _chunks(trainer, progress, stacklevel=4) if trainer.indices else ():
            if store is not None:
                store.append(chunk)
                chunk = PathChunk(*(getattr(chunk, name) for name in FIELDS), [])
            parts.append(chunk)
    finally:
        if store is not None:
            store.close()
    return concat_chunks(parts, len(trainer.gated.logits) if store is None else 0)


def _chunks(trainer: "_Trainer", progress: bool, stacklevel: int) -> Iterator[PathChunk]:
    counts = {k: 0 for k in STATUS}
    config = trainer.config
    trainer.start = time.perf_counter()
    with nad_progress.bar(len(trainer.indices), "paths", unit="image", enabled=progress) as bar, \
            nad_pipeline.make_loader(trainer.images, config.image_size, trainer.device, config.data_pipeline,
                                     "skip") as loader:
        for start in range(0, len(trainer.indices), trainer.chunk):
            chunk = trainer.train_chunk(trainer.indices[start: start + trainer.chunk], loader, bar)
            for k in STATUS:
                counts[k] += int((chunk.status == k).sum())
            yield chunk
        bar.set_postfix(img_s=f"{trainer.images_done / max(time.perf_counter() - trainer.start, 1e-9):.1f}")
    _warn(counts, trainer.settings.target, trainer.unreadable, stacklevel)


def concat_chunks(parts: Sequence[PathChunk], num_points: int) -> PathChunk:
    """One chunk of ``parts`` in order (``num_points`` gate points; 0: chunks without logits)."""
    if not parts:
        return PathChunk(*(torch.zeros(0, dtype=torch.int64) for _ in range(4)), torch.zeros(0, dtype=torch.int8), [])
    fields_ = [torch.cat([getattr(p, name) for p in parts]) for name in FIELDS]
    return PathChunk(*fields_, [torch.cat([p.logits[l] for p in parts]) for l in range(num_points)])


def predict(model, indices: Sequence[int], loader, unreadable: list[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``model``'s (a function of a batch: its logits) prediction on the evaluation view of each
    image ``indices`` that ``loader`` makes, -1 where the file is unreadable; which are readable
    ((N,) bool); the number of outputs. The messages naming unreadable files go to ``unreadable``."""
    prediction, readable, outputs = torch.full((len(indices),), -1), torch.ones(len(indices), dtype=torch.bool), 0
    for s in range(0, len(indices), EVAL_BATCH):
        block = list(range(s, min(s + EVAL_BATCH, len(indices))))
        try:
            views = [(block, loader.eval_batch([indices[t] for t in block])[0])]
        except BadImageError:  # one by one, to find the unreadable ones
            views = []
            for t in block:
                try:
                    views.append(([t], loader.eval_batch([indices[t]])[0]))
                except BadImageError as err:
                    readable[t] = False
                    unreadable.append(str(err).split(" (to skip")[0])
        for positions, x in views:
            with torch.no_grad():
                out = model(x)
            prediction[positions] = out.argmax(1).cpu()
            outputs = out.shape[1]
    return prediction, readable, outputs


SELECTIONS = ("misclassified", "correct")


def select_images(network: Network, images: ImageSet, which: str, *, indices=None, image_size: int | None = None,
                  device: str = "auto", data_pipeline: str = "auto") -> list[int]:
    """The images of ``images[indices]`` (default: all) that the original network misclassifies
    (``which="misclassified"``) or gets right ("correct") on their evaluation view, in the order
    of ``indices`` (e.g. :func:`learn_paths`' ``indices``). Unreadable images are in neither (a
    :class:`PathWarning` names them). ``image_size`` None: the model preset's (else 224)."""
    if which not in SELECTIONS:
        raise ValueError(f"which must be one of {', '.join(map(repr, SELECTIONS))}, got {which!r}")
    indices = check_indices(indices, len(images))
    spec = models.MODELS.get(network.model_id)
    size = image_size or (spec.input_size if spec is not None else 224)
    torch_device = distributed.resolve_device(device)
    model = network.model.to(torch_device).eval()
    unreadable: list[str] = []
    with nad_pipeline.make_loader(images, size, torch_device, data_pipeline, "skip") as loader:
        prediction, readable, _ = predict(model, indices, loader, unreadable)
    if unreadable:
        warnings.warn(f"{len(unreadable)} unreadable image(s) left out of the selection: {_listing(unreadable)}",
                      PathWarning, stacklevel=2)
    wrong = [p != images.labels[i] for i, p in zip(indices, prediction.tolist())]
    return [i for i, ok, w in zip(indices, readable.tolist(), wrong) if ok and w == (which == "misclassified")]


# Settings that change how paths are computed, not what they are: a store may be resumed with others.
# (NADConfig's execution settings that paths have, and how images are grouped.)
EXECUTION_SETTINGS = ("images_per_step", "chunk_size") + tuple(
    name for name in RUN_EXECUTION_SETTINGS if name in {f.name for f in fields(PathSettings)})


def open_store(out, trainer: "_Trainer", keep_logits: bool, overwrite: bool, resume: bool):
    """The path store in ``out`` for this run (:class:`~nad_ext.gates.pathstore.PathStore`): a new
    one (``overwrite``: replacing one there), or with ``resume`` the one there if it was made by
    the same settings, network and images; the disk's free space checked first."""
    images, config = trainer.images, trainer.config
    settings = {k: v for k, v in asdict(trainer.settings).items() if k not in EXECUTION_SETTINGS}
    meta = {"settings": {**settings, "beta": config.beta, "image_size": config.image_size},
            "images": images.name, "num_images": len(images), "classes": images.classes}
    return PathStore.create(out, trainer.gated.gate_points, trainer.network.model_id, meta, logits=keep_logits,
                            overwrite=overwrite, resume=resume, num_images=len(trainer.indices))


def _listing(messages: list[str]) -> str:
    return "; ".join(messages[:3]) + ("; ..." if len(messages) > 3 else "")


def _warn(counts: dict[int, int], target: str, unreadable: list[str], stacklevel: int) -> None:
    notes = []
    if counts[MISCLASSIFIED]:
        hint = ("train them toward the network's own answer with target='prediction' (--target prediction)"
                if target == "label" else "more views or steps may give them a correct view")
        notes.append(f"{counts[MISCLASSIFIED]} image(s) have no trained path (status 'misclassified'): the original "
                     f"network got none of their views right under target={target!r}, so their gates never "
                     f"trained; {hint}")
    if counts[NO_VIEWS]:
        notes.append(f"{counts[NO_VIEWS]} image(s) have no path (status 'no_views'): every view was unreadable"
                     + (f" ({_listing(unreadable)})" if unreadable else ""))
    if counts[NONFINITE]:
        notes.append(f"{counts[NONFINITE]} image(s) had steps skipped for a non-finite gate gradient "
                     "(status 'nonfinite')")
    if notes:
        warnings.warn("; ".join(notes), PathWarning, stacklevel=stacklevel + 1)


def _raise_nonfinite(part: list[int], nonfinite: torch.Tensor) -> None:
    """Under on_nonfinite="stop": the error naming the images (of ``part``) with a non-finite
    gate gradient, raised when their group's last step has run (not after the whole chunk)."""
    bad = [part[t] for t in nonfinite.nonzero().flatten().tolist()]
    raise NonFiniteGradientError(
        f"non-finite gate gradient (NaN or Inf) while training the paths of image(s) {bad[:5]}"
        f"{' and more' if len(bad) > 5 else ''}; to skip such steps and mark those images with status "
        "'nonfinite' instead, pass on_nonfinite='skip' (--on-nonfinite skip)")


class _Trainer:
    """One run of paths: the config, the device, the gated model of ``chunk`` tasks, the step."""

    def __init__(self, network: Network, images: ImageSet, indices, settings: PathSettings):
        self.network, self.images, self.settings = network, images, settings
        self.config = settings.nad_config(network.model_id)
        self.indices = check_indices(indices, len(images))
        self.device = distributed.resolve_device(self.config.device)
        self.chunk = min(settings.chunk_size, len(self.indices))
        execution = self.config.execution(self.device)
        graph = execution.graph
        self.gated = network.gated(self.chunk, self.config.image_size, seed=settings.seed,
                                   init_std=settings.init_std, device=self.device,
                                   straight_through=self.config.gate == "straight_through",
                                   **execution.gated_options())
        self.task_classes = None
        self.step = lambda *batch: train_step(self.gated, *batch, self.config, self.task_classes)  # noqa: E731
        if graph:
            from nad_ext.training.step_graph import GraphedSteps

            self.step = GraphedSteps(self.gated, lambda g, *b: train_step(g, *b, self.config, self.task_classes))
        self.members: dict[int, list[int]] = {}  # class -> its images (negatives are drawn outside them)
        self.images_done, self.start, self.shown = 0, 0.0, 0.0
        self.unreadable: list[str] = []  # the messages naming unreadable files

    def requests(self, part: list[int], targets: list[int], group: list[int], step: int):
        """One step's loader request: per image of ``group`` (positions in ``part``), its views
        and (selective objective) its negatives, each an own part with its own generator."""
        settings, parts = self.settings, []
        for t in group:
            gen = epoch_generator(settings.seed, step, part[t])
            parts.append(([part[t]] * settings.views, gen))
            if settings.negatives:
                if targets[t] not in self.members:
                    self.members[targets[t]] = [i for i, y in enumerate(self.images.labels) if y == targets[t]]
                own = self.members[targets[t]]
                count = negatives_per_batch(settings.views, settings.negatives)
                drawn = draw_negatives(own, len(self.images), count, gen)
                child = torch.Generator().manual_seed(int(torch.randint(2 ** 62, (1,), generator=gen)))
                parts.append((drawn, child))
        return parts

    def train_chunk(self, part: list[int], loader, bar) -> PathChunk:
        settings, gated, n = self.settings, self.gated, len(part)
        labels = torch.tensor([self.images.labels[i] for i in part], dtype=torch.int64)
        original = lambda x: self.gated.original(x, record=False)[0]  # noqa: E731
        prediction, readable, outputs = predict(original, part, loader, self.unreadable)
        target = labels.clone() if settings.target == "label" else prediction.clone()
        targets = target.tolist()
        init = init_logits(part, gated.layer_sizes, settings.seed, settings.init_std)
        gated.set_logits([torch.cat([m, torch.zeros(self.chunk - n, m.shape[1])]) for m in init])
        if settings.negatives:  # filled in place: a CUDA graph of the step keeps reading the same tensor
            width = max(outputs, len(self.images.classes), max(targets) + 1,
                        0 if self.task_classes is None else self.task_classes.shape[1])
            rows = [[c] if c >= 0 else [] for c in targets] + [[]] * (self.chunk - n)
            matrix = task_class_matrix(rows, width, self.device)
            if self.task_classes is None or self.task_classes.shape != matrix.shape:
                self.task_classes = matrix
            else:
                self.task_classes.copy_(matrix)
        trainable = [t for t in range(n) if readable[t]]
        per_step = settings.images_per_step
        groups = [trainable[s: s + per_step] for s in range(0, len(trainable), per_step)]
        plan = [(g, s) for g in groups for s in range(settings.steps)]
        per_part = 2 if settings.negatives else 1
        trained = torch.zeros(self.chunk, dtype=torch.bool, device=self.device)
        nonfinite = torch.zeros(self.chunk, dtype=torch.bool, device=self.device)
        views_seen = torch.zeros(n, dtype=torch.int64)
        bar.update(n - len(trainable))  # unreadable images: nothing to train
        batches = loader.prefetch(self.requests(part, targets, g, s) for g, s in plan)
        for (group, step), batch in zip(plan, batches):
            counts = torch.tensor(batch.counts).view(len(group), per_part)
            views_seen[group] += counts[:, 0]
            if len(batch.labels):
                if self.config.gate == "annealed":
                    gated.set_temperature(gate_temperature(self.config, step))
                positions = torch.tensor(group)
                task_ids = torch.repeat_interleave(positions.repeat_interleave(per_part), counts.flatten())
                own = torch.repeat_interleave(torch.arange(per_part).repeat(len(group)) == 0, counts.flatten())
                wanted = torch.repeat_interleave(target[group].repeat_interleave(per_part), counts.flatten())
                y = torch.where(own.to(self.device), wanted.to(self.device), batch.labels)
                with torch.enable_grad():  # also when called under torch.no_grad()
                    terms = self.step(batch.x, y, task_ids, positions)
                trained |= terms.counted
                nonfinite |= terms.nonfinite.any(dim=1)
            if step == settings.steps - 1:
                if settings.on_nonfinite == "stop" and nonfinite.any():  # a device sync per group
                    _raise_nonfinite(part, nonfinite[:n].cpu())
                bar.update(len(group))
                self.images_done += len(group)
                elapsed = time.perf_counter() - self.start
                if elapsed - self.shown >= 1.0:  # the rate about once a second
                    self.shown = elapsed
                    bar.set_postfix(img_s=f"{self.images_done / max(elapsed, 1e-9):.1f}")
        trained, nonfinite = trained[:n].cpu(), nonfinite[:n].cpu()
        status = torch.full((n,), OK, dtype=torch.int8)
        status[~trained] = MISCLASSIFIED
        status[nonfinite] = NONFINITE
        status[(views_seen == 0) | ~readable] = NO_VIEWS
        logits = [m[:n].detach().float().cpu().clone() for m in gated.logits]
        return PathChunk(torch.tensor(part, dtype=torch.int64), labels, target, prediction, status, logits)
