"""The network to disentangle and its gated model: the one place where the model registry
meets the gates (a preset's name becomes its gate points here).

:class:`Network` says what is gated: the frozen network, its gate points (specs, "auto", or a
model preset's name) and how to read them. :func:`~nad_ext.training.driver.disentangle`,
:func:`~nad_ext.training.loop.train_in_memory` and
:func:`~nad_ext.training.calibration.calibrate_beta` take one, with one
:class:`~nad_ext.training.config.NADConfig`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from nad_ext import models
from nad_ext.gates.model import GatedModel
from nad_ext.gates.points import GatePoint, resolve_gate_points


@dataclass
class Network:
    """What is gated, and how.

    Args:
        model: the pretrained network (its weights are never changed).
        gate_points: gate-point specs (module names, ``"name:axis"``, ``"name:heads"``, or a mask
            bank's :class:`GatePoint` list), ``"auto"`` (proposals), or the name of a model
            preset (``nad_ext.models.list_models()``; ``units`` picks its "channels", "mlp" or
            "heads" preset).
        model_id: the network's identifier, stored in mask banks (a preset name when it is one;
            its beta and input size are then the run's defaults).
        units: which preset (or "auto") units to gate: "channels", "mlp" or "heads".
        channel_axis: overrides probed channel axes (one int, or ``{gate point: axis}``; see
            :class:`~nad_ext.gates.model.GatedModel`).
    """

    model: nn.Module
    gate_points: Sequence[str | GatePoint] | str
    model_id: str
    units: str = "channels"
    channel_axis: int | Mapping[str, int] | None = None

    def gated(self, num_tasks: int, image_size: int, **kwargs) -> GatedModel:
        """:func:`build_gated_model` of this network (``kwargs``: its seed, init_std, device,
        fuse, fold, dtype, channels_last and straight_through)."""
        return build_gated_model(self.model, self.gate_points, num_tasks, image_size, model_id=self.model_id,
                                 units=self.units, channel_axis=self.channel_axis, **kwargs)


def preset_or_specs(model: nn.Module, gate_points: Sequence[str | GatePoint] | str, example: torch.Tensor,
                    units: str = "channels") -> list[str | GatePoint]:
    """Gate-point specs: a model preset's by name (its ``units`` preset), else
    :func:`~nad_ext.gates.points.resolve_gate_points` (a list as it is, or "auto")."""
    if isinstance(gate_points, str) and gate_points != "auto":
        return models.get_spec(gate_points).points(model, units)
    return resolve_gate_points(model, gate_points, example, units)


def build_gated_model(
    model: nn.Module,
    gate_points: Sequence[str | GatePoint] | str,
    num_tasks: int,
    image_size: int,
    *,
    model_id: str,
    units: str = "channels",
    channel_axis: int | Mapping[str, int] | None = None,
    seed: int = 0,
    init_std: float = 1.0,
    device: torch.device | str = "cpu",
    fuse: bool = False,
    fold: bool = False,
    dtype: torch.dtype = torch.float32,
    channels_last: bool | None = None,
    straight_through: bool = False,
) -> GatedModel:
    """Wraps ``model`` with gates at ``gate_points``: gate-point specs (module names, with
    ``:axis`` / ``:heads`` suffixes, or a mask bank's ``GatePoint`` list), ``"auto"``, or the
    name of a model preset (see ``nad_ext.models.list_models()``; ``units`` picks its
    "channels", "mlp" or "heads" preset). ``channel_axis`` overrides probed channel axes.
    ``fuse`` and a low-precision ``dtype`` give the CUDA fast path, ``fold`` the CPU's (see
    :class:`GatedModel`; ``channels_last`` None: with reduced precision or ``fold``; a run's are
    :meth:`NADConfig.execution(device).gated_options() <nad_ext.training.config.Execution>`);
    ``straight_through``: train the binary gates (:class:`GatedModel`)."""
    model = model.to(device)
    example = torch.zeros(1, 3, image_size, image_size, device=device)
    gate_points = preset_or_specs(model, gate_points, example, units)
    low_precision = dtype != torch.float32
    if channels_last is None:
        channels_last = low_precision or fold
    return GatedModel(model, gate_points, num_tasks, example, channel_axis=channel_axis, seed=seed,
                      init_std=init_std, model_id=model_id, fuse=fuse, fold=fold,
                      dtype=dtype if low_precision else None, channels_last=channels_last,
                      straight_through=straight_through)
