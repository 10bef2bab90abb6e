"""Mask banks: all tasks' gate logits with their metadata, in one safetensors file.

The format (``nad-ext.maskbank/1``) is specified in docs/DESIGN.md; it is read by the C++
side too. Files are written atomically (:func:`nad_ext._utils.storage.atomic_write`), so an
interrupted run never leaves a half-written bank, and carry a CRC-32 checksum of every tensor,
verified on load (a bank written before checksums existed loads with a note).
:func:`describe_objective` names the objective a bank's config stands for.
"""
from __future__ import annotations

import json
import numbers
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from nad_ext._utils.storage import CorruptFileError, load_safetensors, save_safetensors
from nad_ext.gates.model import GatedModel
from nad_ext.gates.points import RECORDS, UNITS, GatePoint

FORMAT = "nad-ext.maskbank/1"


def describe_objective(config: dict) -> str:
    """Which objective a run's config (``NADConfig`` as a dict, e.g. a mask bank's) stands for:
    "paper" or "selective (negatives r, weight gamma)" (the variant of
    :mod:`nad_ext.training.objective`), followed by how the gates were trained when that was not
    the paper's way (``NADConfig.gate``). Banks from before the variants: paper."""
    r, gamma = config.get("negatives") or 0, config.get("negative_weight") or 0
    name = "paper" if not r else f"selective (negatives {r:g}, weight {gamma:g})"
    gate = config.get("gate", "soft")
    if gate == "annealed":
        return name + f", gates annealed to temperature {config.get('gate_temperature', 0.1):g}"
    return name + (", straight-through gates" if gate == "straight_through" else "")


@dataclass(frozen=True)
class Task:
    """A task: a name and the classes whose images make it up (one class by default)."""

    name: str
    classes: tuple[int, ...]

    def __post_init__(self):
        # What a bank can store and read back (MaskBank.load refuses other names and classes).
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"a task name must be a non-empty string, got {self.name!r}")
        classes = tuple(self.classes) if not isinstance(self.classes, (str, bytes)) else None
        if classes is None or not all(isinstance(c, numbers.Integral) and not isinstance(c, bool) and c >= 0
                                      for c in classes):
            raise ValueError(f"task {self.name!r}: classes must be class indices (integers >= 0), got {self.classes!r}")
        object.__setattr__(self, "classes", tuple(int(c) for c in classes))


@dataclass
class MaskBank:
    """Gate logits of T tasks at L gate points of one model.

    ``logits[l]`` has shape (T, C_l), float32. The gate of task t at gate point l is
    sigmoid(logits[l][t]); its binary sub-architecture is the channels with logits > 0.
    """

    model_id: str
    gate_points: list[GatePoint]
    tasks: list[Task]
    logits: list[torch.Tensor]
    config: dict = field(default_factory=dict)
    epoch: int = 0
    calibration: dict | None = None  # how beta was found, when it was calibrated (beta="auto")
    # The fidelity check after the run's last epoch (nad_ext.training.fidelity), when it was made.
    fidelity: dict | None = None

    def __post_init__(self):
        if len(self.logits) != len(self.gate_points):
            raise ValueError(f"{len(self.logits)} logits tensors for {len(self.gate_points)} gate points")
        for point, m in zip(self.gate_points, self.logits):
            if tuple(m.shape) != (len(self.tasks), point.channels):
                raise ValueError(
                    f"logits of gate point {point.name!r} must have shape "
                    f"({len(self.tasks)}, {point.channels}); got {tuple(m.shape)}"
                )

    @classmethod
    def from_gated(cls, gated: GatedModel, tasks: Sequence[Task], config: dict, epoch: int,
                   calibration: dict | None = None) -> "MaskBank":
        return cls(
            model_id=gated.model_id,
            gate_points=list(gated.gate_points),
            tasks=list(tasks),
            logits=[m.detach().float().cpu().clone() for m in gated.logits],
            config=dict(config),
            epoch=epoch,
            calibration=calibration,
        )

    # --- views -------------------------------------------------------------------------
    @property
    def layer_sizes(self) -> list[int]:
        return [p.channels for p in self.gate_points]

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def binary(self) -> torch.Tensor:
        """(T, K) bool: each task's open channels, all gate points concatenated in order."""
        return torch.cat([m > 0 for m in self.logits], dim=1)

    def open_ratio(self) -> torch.Tensor:
        """(T, L) float: the fraction of open channels per task and gate point."""
        return torch.stack([(m > 0).float().mean(dim=1) for m in self.logits], dim=1)

    # --- checks ------------------------------------------------------------------------
    def mismatch(self, gate_points: Sequence[GatePoint], model_id: str | None = None) -> list[str]:
        """What differs between this bank and a model's gate points (empty when they match).
        What a gate point records for the objective (``GatePoint.record``) is not compared: the
        gates fit either way (a resumed run compares it, :func:`nad_ext.training.loop.run_epochs`)."""
        problems = []
        if model_id is not None and model_id != self.model_id:
            problems.append(f"the bank is for model {self.model_id!r}, not {model_id!r}")
        mine = {p.name: p for p in self.gate_points}
        theirs = {p.name: p for p in gate_points}
        for name in mine.keys() - theirs.keys():
            problems.append(f"gate point {name!r} is in the bank but not in the model")
        for name in theirs.keys() - mine.keys():
            problems.append(f"gate point {name!r} is in the model but not in the bank")
        for name in mine.keys() & theirs.keys():
            a, b = mine[name], theirs[name]
            if a.units != b.units:
                problems.append(f"gate point {name!r} gates {a.units} in the bank but {b.units} in the model")
            elif a.channels != b.channels:
                problems.append(
                    f"gate point {name!r} has {a.channels} {a.units} in the bank but {b.channels} in the model"
                )
            elif a.channel_axis != b.channel_axis:
                problems.append(f"gate point {name!r} gates axis {a.channel_axis} in the bank but axis "
                                f"{b.channel_axis} in the model")
        if not problems and [p.name for p in self.gate_points] != [p.name for p in gate_points]:
            problems.append("the gate points are in another order")
        return problems

    def check_matches(self, gate_points: Sequence[GatePoint], model_id: str | None = None) -> None:
        problems = self.mismatch(gate_points, model_id)
        if problems:
            raise ValueError("mask bank does not match the model: " + "; ".join(problems))

    def apply_to(self, gated: GatedModel) -> None:
        """Loads these gates into a gated model after checking that they belong to it."""
        self.check_matches(gated.gate_points, gated.model_id)
        if gated.num_tasks != len(self.tasks):
            raise ValueError(f"the bank has {len(self.tasks)} tasks, the gated model {gated.num_tasks}")
        gated.set_logits(self.logits)

    # --- storage -------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Writes the bank atomically (see docs/DESIGN.md for the format)."""
        tensors = {f"logits.{i:03d}": m.detach().float().cpu().contiguous() for i, m in enumerate(self.logits)}
        metadata = {
            "format": FORMAT,
            "model_id": self.model_id,
            "gate_points": json.dumps([p.name for p in self.gate_points]),
            "channels": json.dumps([p.channels for p in self.gate_points]),
            "channel_axes": json.dumps([p.channel_axis for p in self.gate_points]),
            "units": json.dumps([p.units for p in self.gate_points]),
            "records": json.dumps([p.record for p in self.gate_points]),
            "tasks": json.dumps([t.name for t in self.tasks]),
            "task_classes": json.dumps([list(t.classes) for t in self.tasks]),
            "config": json.dumps(self.config, sort_keys=True),
            "epoch": str(self.epoch),
        }
        if self.calibration is not None:
            metadata["calibration"] = json.dumps(self.calibration, sort_keys=True)
        if self.fidelity is not None:
            metadata["fidelity"] = json.dumps(self.fidelity, sort_keys=True)
        save_safetensors(tensors, path, metadata)

    @classmethod
    def load(cls, path: str | Path) -> "MaskBank":
        """Reads a bank; a missing, corrupted or foreign file gets an error that says which."""
        path = Path(path)
        if path.is_dir():
            hint = f" (such as {path / 'masks.safetensors'})" if (path / "masks.safetensors").is_file() else ""
            raise IsADirectoryError(f"mask bank {path} is a folder; expected a mask bank file{hint}")
        if not path.is_file():
            raise FileNotFoundError(f"mask bank {path} does not exist")
        try:
            tensors, meta, verified = load_safetensors(path, "mask bank", _describe_tensor)
        except CorruptFileError as err:
            raise ValueError(str(err)) from err
        except OSError as err:
            raise ValueError(f"mask bank {path} cannot be read: {err}") from err
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a nad-ext mask bank (format {meta.get('format')!r}, expected {FORMAT!r})")
        if not verified:
            warnings.warn(f"mask bank {path} has no checksums (written by an earlier nad-ext): "
                          "loaded without verifying its tensors", stacklevel=2)
        try:
            names = json.loads(meta["gate_points"])
            channels = json.loads(meta["channels"])
            task_names = json.loads(meta["tasks"])
            task_classes = json.loads(meta["task_classes"])
            config = json.loads(meta["config"])
            epoch = int(meta["epoch"])
            # Banks written before channel axes and head units existed gate axis-1 channels.
            axes = json.loads(meta.get("channel_axes", json.dumps([1] * len(names))))
            units = json.loads(meta.get("units", json.dumps(["channels"] * len(names))))
            bad = [u for u in units if u not in UNITS]
            if bad:
                raise ValueError(f"unknown gate units {bad}")
            # Banks written before records existed compared every gate point's gated output.
            records = json.loads(meta.get("records", json.dumps(["output"] * len(names))))
            bad = [r for r in records if r not in RECORDS]
            if bad:
                raise ValueError(f"unknown gate-point records {bad}")
            calibration = json.loads(meta["calibration"]) if "calibration" in meta else None
            fidelity = json.loads(meta["fidelity"]) if "fidelity" in meta else None
            _check_fields(names, channels, axes, task_names, task_classes, config, epoch)
            logits = [tensors[f"logits.{i:03d}"] for i in range(len(names))]
            for i, m in enumerate(logits):
                _check_logits(f"logits.{i:03d}", names[i], m)
            return cls(
                model_id=meta["model_id"],
                gate_points=[GatePoint(n, int(c), int(a), u, r)
                             for n, c, a, u, r in zip(names, channels, axes, units, records, strict=True)],
                tasks=[Task(n, tuple(c)) for n, c in zip(task_names, task_classes, strict=True)],
                logits=logits,
                config=config,
                epoch=epoch,
                calibration=calibration,
                fidelity=fidelity,
            )
        except _Invalid as err:
            raise CorruptFileError(f"mask bank {path} is corrupted: {err}") from None
        except (KeyError, ValueError, TypeError) as err:
            raise ValueError(f"mask bank {path} is corrupted: {type(err).__name__}: {err}") from err


class _Invalid(ValueError):
    """A bank's metadata or tensors break the format (reported as a corrupted bank, without the
    exception type: the message says what was expected)."""


def _check_fields(names, channels, axes, task_names, task_classes, config, epoch) -> None:
    """The metadata's types and ranges, so that a damaged or hand-made bank is refused when it is
    read, not deep inside an analysis."""
    def strings(value, what):
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise _Invalid(f"{what} must be a JSON list of non-empty strings, got {json.dumps(value)[:80]}")

    def counts(value, what, low):
        if not isinstance(value, list) or not all(type(v) is int and v >= low for v in value):
            raise _Invalid(f"{what} must be a JSON list of integers >= {low}, got {json.dumps(value)[:80]}")

    strings(names, "'gate_points'")
    counts(channels, "'channels'", 1)
    counts(axes, "'channel_axes'", 1)
    strings(task_names, "'tasks' (the task names)")
    if not isinstance(task_classes, list) or len(task_classes) != len(task_names):
        raise _Invalid(f"'task_classes' must be a JSON list of {len(task_names)} lists (one per task)")
    for name, members in zip(task_names, task_classes):
        if not isinstance(members, list) or not members or not all(type(c) is int and c >= 0 for c in members):
            raise _Invalid(f"'task_classes' of task {name!r} must be a non-empty JSON list of class indices >= 0, "
                           f"got {json.dumps(members)[:80]}")
    if not isinstance(config, dict):
        raise _Invalid("'config' must be a JSON object")
    if epoch < 0:
        raise _Invalid(f"'epoch' must be >= 0, got {epoch}")


def _check_logits(name: str, point: str, m: torch.Tensor) -> None:
    """A logits tensor: float32 (the format's dtype) and finite (no run commits a NaN or an
    infinite gate logit: the non-finite guard stops or skips the step before that)."""
    about = f"tensor {name!r} (gate point {point!r})"
    if m.dtype != torch.float32:
        raise _Invalid(f"{about} is {str(m.dtype).replace('torch.', '')}; gate logits must be float32")
    bad = ~torch.isfinite(m)
    if bad.any():
        nan, inf = int(torch.isnan(m).sum()), int(bad.sum()) - int(torch.isnan(m).sum())
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise _Invalid(f"{about} holds {nan} NaN and {inf} infinite values (the first at {first}); "
                       "gate logits must be finite")


def _describe_tensor(name: str, meta: dict) -> str:
    """" (gate point 'features.3')" for tensor logits.001 of a bank, for error messages."""
    try:
        return f" (gate point {json.loads(meta['gate_points'])[int(name.split('.')[1])]!r})"
    except (KeyError, ValueError, IndexError, TypeError):
        return ""
