"""The model registry, in the manner of torchvision's ``models/_api.py``: each family file
(:mod:`~nad_ext.models.vgg`, :mod:`~nad_ext.models.resnet`, ...) describes its networks as
:class:`ModelSpec` data and :func:`register` s them when it is imported; :func:`get_spec` and
:func:`list_models` look them up."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from nad_ext.data.transforms import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: ``build(num_classes)`` gives an untrained model, ``gate_points(model)``
    its gate-point module names in forward order, ``beta`` the sparsity weight (None where no
    tuned value is known: pass one, or ``beta="auto"`` to calibrate it), ``input_size`` and
    the input normalisation (``mean``, ``std``) the network expects. ``units`` holds other
    preset gate units than the channels of ``gate_points``: ``"mlp"`` (the MLP hidden units
    of every transformer / ConvNeXt block), ``"heads"`` (every attention module's heads)."""

    name: str
    connection: str  # "plain" | "residual" | "dense" | "nas" | "transformer" | "convnext"
    build: Callable[[int], nn.Module]
    gate_points: Callable[[nn.Module], list[str]]
    beta: float | None
    input_size: int
    units: dict[str, Callable[[nn.Module], list[str]]] = field(default_factory=dict)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def points(self, model: nn.Module, units: str = "channels") -> list[str]:
        """The preset's gate points for ``units`` ("channels": :attr:`gate_points`)."""
        if units == "channels":
            return self.gate_points(model)
        if units not in self.units:
            known = ", ".join(["channels", *self.units])
            raise ValueError(f"model {self.name!r} has no {units!r} gate-point preset; its units: {known}")
        return self.units[units](model)


# Every registered model by name, in the order of registration.
MODELS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Adds ``spec`` to the registry under ``spec.name`` (ValueError if the name is taken)."""
    if spec.name in MODELS:
        raise ValueError(f"model {spec.name!r} is registered already")
    MODELS[spec.name] = spec
    return spec


def get_spec(name: str) -> ModelSpec:
    """The registry entry ``name``; ValueError listing the known names otherwise."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    return MODELS[name]


def list_models() -> list[str]:
    """The registered model names, in the order of registration."""
    return list(MODELS)


def stage_blocks(model: nn.Module, block_type: type) -> list[str]:
    """``features.<stage>.<block>`` for every block of type ``block_type`` (Swin, ConvNeXt): a
    helper of the gate-point presets of torchvision's staged networks."""
    return [f"features.{i}.{j}" for i, stage in model.features.named_children() if isinstance(stage, nn.Sequential)
            for j, block in stage.named_children() if isinstance(block, block_type)]
