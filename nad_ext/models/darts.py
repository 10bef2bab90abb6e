"""DARTS networks (Liu et al., "DARTS: Differentiable Architecture Search", ICLR 2019) built
from any genotype in DARTS's notation, for evaluation.

The module structure and parameter names follow DARTS's ``model.py``/``operations.py``
(``stem0``, ``stem1``, ``cells.<i>.preprocess0/1``, ``cells.<i>._ops.<j>.op``, ``classifier``),
so state dicts of that code load here. Differences: every ReLU is out-of-place (forward hooks
may then gate a module's output without a later in-place op changing it), the global pooling is
adaptive (same result as DARTS's ``AvgPool2d(7)`` at 224x224, and works at other sizes), and
there is no auxiliary head and no drop path (inference only). Registered: ``darts`` (DARTS V2 on
ImageNet, the paper's) and the zoo's ``zoo_nas``.
"""
from __future__ import annotations

import ast
import re
from collections import namedtuple

import torch
from torch import nn

from nad_ext.models.registry import ModelSpec, register

Genotype = namedtuple("Genotype", "normal normal_concat reduce reduce_concat")

# DARTS (second order) from DARTS's genotypes.py.
DARTS_V2 = Genotype(
    normal=[("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)],
    normal_concat=[2, 3, 4, 5],
    reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)],
    reduce_concat=[2, 3, 4, 5],
)


# ----------------------------------------------------------------------------------------------
# Operations


class ReLUConvBN(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int):
        super().__init__()
        self.op = nn.Sequential(nn.ReLU(), nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False),
                                nn.BatchNorm2d(c_out))

    def forward(self, x):
        return self.op(x)


class DilConv(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, dilation: int):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(c_in, c_in, kernel, stride, padding, dilation=dilation, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )

    def forward(self, x):
        return self.op(x)


class SepConv(nn.Module):
    """Two stacked (ReLU, depthwise conv, pointwise conv, BN) units; the first one strided."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(c_in, c_in, kernel, stride, padding, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_in, 1, bias=False),
            nn.BatchNorm2d(c_in),
            nn.ReLU(),
            nn.Conv2d(c_in, c_in, kernel, 1, padding, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )

    def forward(self, x):
        return self.op(x)


class Identity(nn.Module):
    def forward(self, x):
        return x


class Zero(nn.Module):
    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class FactorizedReduce(nn.Module):
    """Halves the resolution with two offset strided 1x1 convs whose outputs are concatenated."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.relu = nn.ReLU()
        self.conv_1 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x):
        x = self.relu(x)
        a, b = self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])
        if b.shape[-2:] != a.shape[-2:]:  # odd sizes: pad the shifted branch to match
            b = nn.functional.pad(b, (0, a.shape[-1] - b.shape[-1], 0, a.shape[-2] - b.shape[-2]))
        return self.bn(torch.cat([a, b], dim=1))


def _conv_7x1_1x7(c: int, stride: int) -> nn.Module:
    return nn.Sequential(
        nn.ReLU(),
        nn.Conv2d(c, c, (1, 7), stride=(1, stride), padding=(0, 3), bias=False),
        nn.Conv2d(c, c, (7, 1), stride=(stride, 1), padding=(3, 0), bias=False),
        nn.BatchNorm2d(c),
    )


OPS = {
    "none": lambda c, stride: Zero(stride),
    "avg_pool_3x3": lambda c, stride: nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False),
    "max_pool_3x3": lambda c, stride: nn.MaxPool2d(3, stride=stride, padding=1),
    "skip_connect": lambda c, stride: Identity() if stride == 1 else FactorizedReduce(c, c),
    "sep_conv_3x3": lambda c, stride: SepConv(c, c, 3, stride, 1),
    "sep_conv_5x5": lambda c, stride: SepConv(c, c, 5, stride, 2),
    "sep_conv_7x7": lambda c, stride: SepConv(c, c, 7, stride, 3),
    "dil_conv_3x3": lambda c, stride: DilConv(c, c, 3, stride, 2, 2),
    "dil_conv_5x5": lambda c, stride: DilConv(c, c, 5, stride, 4, 2),
    "conv_7x1_1x7": _conv_7x1_1x7,
}


# ----------------------------------------------------------------------------------------------
# Cells and networks


class Cell(nn.Module):
    """A DARTS cell: two inputs (the outputs of the previous two cells), ``len(ops) // 2``
    intermediate nodes each summing two operations, output = concatenation of the ``concat``
    nodes. A reduction cell applies its input-facing operations with stride 2."""

    def __init__(self, genotype: Genotype, c_prev_prev: int, c_prev: int, c: int,
                 reduction: bool, reduction_prev: bool):
        super().__init__()
        self.reduction = reduction
        self.preprocess0 = FactorizedReduce(c_prev_prev, c) if reduction_prev else ReLUConvBN(c_prev_prev, c, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(c_prev, c, 1, 1, 0)
        ops, concat = (genotype.reduce, genotype.reduce_concat) if reduction else (genotype.normal, genotype.normal_concat)
        if len(ops) % 2:
            raise ValueError(f"a cell needs an even number of (op, input) pairs, got {len(ops)}")
        for step, (name, index) in enumerate(ops):
            if name not in OPS:
                raise ValueError(f"unknown DARTS operation {name!r}; known: {sorted(OPS)}")
            if not 0 <= index < 2 + step // 2:
                raise ValueError(f"operation {step} ({name}) reads node {index}, which is not computed yet")
        self._steps = len(ops) // 2
        self._indices = [index for _, index in ops]
        self._concat = list(concat)
        self.multiplier = len(self._concat)
        self._ops = nn.ModuleList(OPS[name](c, 2 if reduction and index < 2 else 1) for name, index in ops)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(self._steps):
            h1 = self._ops[2 * i](states[self._indices[2 * i]])
            h2 = self._ops[2 * i + 1](states[self._indices[2 * i + 1]])
            states.append(h1 + h2)
        return torch.cat([states[i] for i in self._concat], dim=1)


class _Network(nn.Module):
    """Stems, then ``layers`` cells with reductions at layers // 3 and 2 * layers // 3."""

    def __init__(self, stem0: nn.Module, stem1: nn.Module, c: int, num_classes: int, layers: int,
                 genotype: Genotype | str):
        super().__init__()
        genotype = parse_genotype(genotype) if isinstance(genotype, str) else genotype
        self.stem0, self.stem1 = stem0, stem1
        c_prev_prev, c_prev, c_curr = c, c, c
        self.cells = nn.ModuleList()
        reduction_prev = True  # stem1 halves the resolution of stem0's output
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            c_curr = c_curr * 2 if reduction else c_curr
            cell = Cell(genotype, c_prev_prev, c_prev, c_curr, reduction, reduction_prev)
            self.cells.append(cell)
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, cell.multiplier * c_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = self.stem0(x)
        s1 = self.stem1(s0)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1)
        return self.classifier(torch.flatten(self.global_pooling(s1), 1))


def _stems(C: int, second_stride: int) -> tuple[nn.Module, nn.Module]:
    """DARTS's two stems: a stride-2 conv and a conv of ``second_stride`` (stem0), then a
    stride-2 conv (stem1)."""
    stem0 = nn.Sequential(
        nn.Conv2d(3, C // 2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C // 2), nn.ReLU(),
        nn.Conv2d(C // 2, C, 3, stride=second_stride, padding=1, bias=False), nn.BatchNorm2d(C),
    )
    stem1 = nn.Sequential(nn.ReLU(), nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C))
    return stem0, stem1


class NetworkImageNet(_Network):
    """DARTS's ImageNet network (224x224 inputs; the stems reduce by 8)."""

    def __init__(self, C: int, num_classes: int, layers: int, genotype: Genotype | str):
        super().__init__(*_stems(C, 2), C, num_classes, layers, genotype)


class NetworkSmall(_Network):
    """A DARTS network for small (e.g. 64x64) images: the stems reduce by 4, not 8."""

    def __init__(self, C: int, num_classes: int, layers: int, genotype: Genotype | str):
        super().__init__(*_stems(C, 1), C, num_classes, layers, genotype)


# ----------------------------------------------------------------------------------------------
# Genotype text


def parse_genotype(text: str) -> Genotype:
    """Parses ``Genotype(normal=[...], normal_concat=..., reduce=[...], reduce_concat=...)`` as
    DARTS prints it, without ``eval``: each field's value goes through ``ast.literal_eval``.
    ``range(a, b)`` concat values (as in DARTS's genotypes.py) are accepted too."""
    match = re.fullmatch(r"\s*Genotype\s*\((.*)\)\s*", text, flags=re.S)
    if not match:
        raise ValueError(f"not a genotype (expected 'Genotype(normal=..., ...)'): {text[:80]!r}")
    try:
        call = ast.parse(f"f({match.group(1)})", mode="eval").body
    except SyntaxError as err:
        raise ValueError(f"cannot parse genotype {text[:80]!r}: {err}") from err
    if call.args or {kw.arg for kw in call.keywords} != set(Genotype._fields):
        raise ValueError(f"a genotype needs exactly the keyword fields {Genotype._fields}: {text[:80]!r}")
    fields = {}
    for kw in call.keywords:
        value = kw.value
        if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "range":
            fields[kw.arg] = list(range(*(ast.literal_eval(a) for a in value.args)))
            continue
        try:
            fields[kw.arg] = ast.literal_eval(value)
        except ValueError as err:
            raise ValueError(f"genotype field {kw.arg} is not a literal: {ast.unparse(value)!r}") from err
    for key in ("normal", "reduce"):
        ops = fields[key]
        if not all(isinstance(op, (list, tuple)) and len(op) == 2 and isinstance(op[0], str)
                   and isinstance(op[1], int) for op in ops):
            raise ValueError(f"genotype field {key} must be a list of (operation, input) pairs: {ops!r}")
        fields[key] = [tuple(op) for op in ops]
    return Genotype(**{k: (list(v) if not isinstance(v, list) else v) for k, v in fields.items()})


# ----------------------------------------------------------------------------------------------
# Registry entries


def darts_points(model: nn.Module) -> list[str]:
    """After each of the two stems and after each cell's concatenated output, as in the
    authors' darts.py (``mask0``, ``mask1``, each cell's ``mask``).

    The first records relu of its gated output (``:relu``, ``GatePoint.record``): in the
    authors' model the in-place ReLU that begins ``stem1`` overwrites ``mask0``'s output before
    their loss reads it, so their MSE there is taken on relu(gate output). The forward is the
    same here (stem1 and the first cell's FactorizedReduce both begin with a ReLU)."""
    return ["stem0:relu", "stem1"] + [f"cells.{i}" for i in range(len(model.cells))]


register(ModelSpec("darts", "nas", lambda n: NetworkImageNet(48, n, 14, DARTS_V2), darts_points, 0.45, 224))
register(ModelSpec("zoo_nas", "nas", lambda n: NetworkSmall(12, n, 5, DARTS_V2), darts_points, 0.45, 64))
