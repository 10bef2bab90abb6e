"""The gates: task-conditional channel (or head) gates on any ``torch.nn.Module``, and what
is made of them.

- :mod:`~nad_ext.gates.points`: :class:`GatePoint`, gate-point specs, "auto" proposals, the
  probe that finds each gate point's channels and channel axis (with
  :mod:`~nad_ext.gates.probe`);
- :mod:`~nad_ext.gates.attention`: per-head gates on attention modules;
- :mod:`~nad_ext.gates.model`: :class:`GatedModel`, the frozen network with gates in forward
  hooks (``nad::task_gate``), soft or binary;
- :mod:`~nad_ext.gates.fused`: the fast path's rewrites (BatchNorm folded, ``nad::masked_conv2d``);
- :mod:`~nad_ext.gates.export`: torch.export programs and AOTInductor ``.pt2`` packages for C++;
- :mod:`~nad_ext.gates.maskbank`: :class:`MaskBank`, every task's gate logits in one file.

May import: :mod:`nad_ext.ops` (the native operators), :mod:`nad_ext._utils`,
:mod:`nad_ext.distributed`. Not :mod:`nad_ext.models` nor :mod:`nad_ext.data`: the gates work on
any module and any tensor; a model preset's gate points are resolved where the registry meets
the gates, :func:`nad_ext.training.build_gated_model`.
"""
from nad_ext.gates.maskbank import FORMAT, MaskBank, Task, describe_objective
from nad_ext.gates.model import GatedModel, gate_tensor
from nad_ext.gates.points import (RECORDS, UNITS, GatePoint, describe_layout, parse_gate_point,
                                  propose_gate_points, resolve_gate_points)

__all__ = [
    "FORMAT", "RECORDS", "UNITS", "GatePoint", "GatedModel", "MaskBank", "Task", "describe_layout",
    "describe_objective", "gate_tensor", "parse_gate_point", "propose_gate_points", "resolve_gate_points",
]
