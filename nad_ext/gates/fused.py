"""The fast path's network rewrites: BatchNorm folding and fused gated convolutions.

Both work on a private copy of the frozen network (the caller's model is never changed) and
keep every module name, so gate points, hooks and weights files still refer to the same names.

- :func:`fold_batchnorm`: an eval-mode BatchNorm2d that reads a Conv2d's output directly is an
  affine map per channel, so it goes into the convolution's weight and bias, and the
  BatchNorm becomes ``nn.Identity``. The folded network is checked against the unfolded one,
  in IEEE float32 (:func:`ieee_float32`: no TF32, whatever the caller's settings).
- :func:`fuse_gated_convolutions`: a gate point at the end of ``Conv2d [folded BN] [ReLU]
  [pools]`` inside one ``nn.Sequential`` is computed by ``nad::masked_conv2d``: the gate moves
  onto the convolution's output, fused with bias and ReLU. That is exact, not approximate:
  the gate is a positive per-channel factor (sigmoid > 0; 0 or 1 in binary mode), and ReLU,
  max-pooling and average pooling commute with such factors, so gating before them gives the
  same output at the gate point, and the same gradients.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nad_ext.ops import masked_conv2d

# Modules y = f(x) with f(s * x) = s * f(x) for a per-channel factor s >= 0 (eval mode).
_POSITIVELY_HOMOGENEOUS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                           nn.Dropout, nn.Identity)

# gate_source() -> (logits, task_ids) for a masked pass, None for the original network.
GateSource = Callable[[], Optional[tuple]]


# The float32 precision settings PyTorch (2.9 on) keeps per backend and operator: TF32 on CUDA
# (cuDNN convolutions, cuBLAS matrix products), TF32 or bfloat16 in oneDNN on CPUs.
_FP32_PRECISION = (("cudnn", "conv"), ("cuda", "matmul"), ("mkldnn", "conv"), ("mkldnn", "matmul"))


@contextlib.contextmanager
def ieee_float32():
    """Inside the block float32 convolutions and matrix products compute in IEEE float32 (no TF32);
    every setting is restored after it, exactly as it was, by whichever API it was set.

    cuDNN runs float32 convolutions in TF32 by default on Ampere and later GPUs (10-bit mantissa,
    relative rounding ~5e-4): comparisons meant to see float32 rounding use this.
    """
    settings = []
    for backend, op in _FP32_PRECISION:
        holder = getattr(getattr(torch.backends, backend, None), op, None)
        if holder is not None and hasattr(holder, "fp32_precision"):
            settings.append((holder, holder.fp32_precision))
    if settings:
        try:
            for holder, _ in settings:
                holder.fp32_precision = "ieee"
            yield
        finally:
            for holder, before in reversed(settings):
                holder.fp32_precision = before
        return
    # PyTorch before 2.9: the two TF32 switches.
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _call_counts(model: nn.Module) -> dict[int, int]:
    """How many names each module object has in ``model`` (a shared module has several)."""
    counts: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    return counts


@torch.no_grad()
def _conv_bn_pairs(model: nn.Module, example_input: torch.Tensor) -> list[tuple[str, str]]:
    """(conv name, bn name) for every eval BatchNorm2d whose input is a Conv2d's output."""
    named = _call_counts(model)
    outputs: dict[int, tuple[str, torch.Tensor]] = {}
    pairs, handles = [], []
    for name, m in model.named_modules():
        if named[id(m)] != 1:
            continue
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: outputs.__setitem__(id(out), (name, out))))
        elif isinstance(m, nn.BatchNorm2d) and m.track_running_stats and m.running_mean is not None:
            def pre_hook(mod, inp, name=name):
                source = outputs.get(id(inp[0]))
                if source is not None and source[1] is inp[0]:
                    pairs.append((source[0], name))
            handles.append(m.register_forward_pre_hook(pre_hook))
    try:
        model(example_input)
    finally:
        for h in handles:
            h.remove()
    convs = [c for c, _ in pairs]
    return [(c, b) for c, b in pairs if convs.count(c) == 1]


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    bias = shift if conv.bias is None else conv.bias * scale + shift
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                       conv.dilation, conv.groups, True, conv.padding_mode,
                       device=conv.weight.device, dtype=conv.weight.dtype)
    folded.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
    folded.bias.copy_(bias)
    return folded.eval().requires_grad_(False)


def _outputs(model: nn.Module, x: torch.Tensor, names: Sequence[str]) -> list[torch.Tensor]:
    modules = dict(model.named_modules())
    seen: list[torch.Tensor] = []
    handles = [modules[n].register_forward_hook(lambda m, i, o: seen.append(o)) for n in names]
    try:
        with torch.no_grad():
            seen.append(model(x))
    finally:
        for h in handles:
            h.remove()
    return seen


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def fold_batchnorm(model: nn.Module, example_input: torch.Tensor, watch: Sequence[str] = ()) -> int:
    """Folds every eval-mode BatchNorm2d that reads a Conv2d's output into that convolution, in
    place; returns how many were folded.

    The pairs are found by running ``example_input`` once. The folded network is then compared
    with the unfolded one on a random input (logits and the outputs of the modules ``watch``):
    if a convolution's output was also used elsewhere (so that folding changed the function),
    nothing is folded and a warning says so. Both passes of the comparison run in IEEE float32
    (:func:`ieee_float32`), so that what it sees is the fold's float32 rounding (~1e-6), not
    TF32's (~1e-3 on a deep network, which would refuse every fold on a GPU).
    """
    model.eval()
    pairs = _conv_bn_pairs(model, example_input)
    if not pairs:
        return 0
    probe = torch.randn(example_input.shape, generator=torch.Generator().manual_seed(0)).to(example_input)
    with ieee_float32():
        before = _outputs(model, probe, watch)
    originals = {name: model.get_submodule(name) for pair in pairs for name in pair}
    for conv, bn in pairs:
        _set_module(model, conv, _fold(originals[conv], originals[bn]))
        _set_module(model, bn, nn.Identity())
    with ieee_float32():
        after = _outputs(model, probe, watch)
    worst = max(_relative_error(a, b) for a, b in zip(after, before))
    if worst > 1e-4:
        for name, module in originals.items():
            _set_module(model, name, module)
        warnings.warn(f"BatchNorm folding changed the network's outputs (relative error {worst:.1e}); "
                      "a convolution's output is used elsewhere, so the network is left unfolded")
        return 0
    return len(pairs)


class GatedConv2d(nn.Module):
    """A frozen Conv2d (+ ReLU) whose output carries a gate point's gate: ``nad::masked_conv2d``
    in masked passes, a plain convolution (+ ReLU) in the original network's passes.

    Its buffers are named ``weight`` and ``bias``, like the convolution it replaces.
    """

    def __init__(self, conv: nn.Conv2d, relu: bool, gate_source: GateSource):
        super().__init__()
        self.register_buffer("weight", conv.weight.detach().clone())
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())
        self.stride, self.padding, self.dilation = list(conv.stride), list(conv.padding), list(conv.dilation)
        self.groups, self.relu = conv.groups, relu
        self.gate_source = gate_source

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_source()
        if gate is None:
            y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
            return torch.relu(y) if self.relu else y
        logits, task_ids = gate
        return masked_conv2d(x, self.weight, self.bias, logits, task_ids, self.stride, self.padding,
                             self.dilation, self.groups, self.relu)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1] * self.groups}, {self.weight.shape[0]}, kernel_size={tuple(self.weight.shape[2:])}, "
                f"stride={tuple(self.stride)}, relu={self.relu}")


def _fusable_conv(module: nn.Module) -> bool:
    return (isinstance(module, nn.Conv2d) and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def fuse_gated_convolutions(model: nn.Module, gate_points: Sequence[str],
                            gate_source: Callable[[int], GateSource],
                            only: Optional[Sequence[int]] = None) -> list[int]:
    """Replaces ``Conv2d [Identity...] [ReLU] [pools...]`` chains that end at a gate point (all
    inside one ``nn.Sequential``, none of their modules shared or another gate point) by a
    :class:`GatedConv2d` carrying that gate point's gate; the chain's ReLU becomes Identity.

    ``gate_source(i)`` gives gate point i's source of (logits, task_ids). ``only``: the indices
    of the gate points that may fuse (default all; a gate point whose channels are not on axis
    1, or that gates attention heads, is never a convolution's output channels). Returns the
    indices of the gate points now gated inside a convolution (their hooks must not gate again).
    """
    modules = dict(model.named_modules())
    counts = _call_counts(model)
    point_names = set(gate_points)
    fused = []
    for index, name in enumerate(gate_points):
        if only is not None and index not in only:
            continue
        parent_name, _, key = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        if type(parent) is not nn.Sequential:
            continue
        keys = list(parent._modules)
        pos = keys.index(key)
        relu_key, conv_key = None, None
        for j in range(pos, -1, -1):
            m = parent._modules[keys[j]]
            full = f"{parent_name}.{keys[j]}" if parent_name else keys[j]
            if counts[id(m)] != 1 or (j != pos and full in point_names):
                break
            if isinstance(m, nn.ReLU) and relu_key is None:
                relu_key = keys[j]
            elif isinstance(m, _POSITIVELY_HOMOGENEOUS) and (relu_key is None or isinstance(m, nn.Identity)):
                continue  # pools only after the ReLU (they commute with it), folded BNs anywhere
            elif _fusable_conv(m):
                conv_key = keys[j]
                break
            else:
                break
        if conv_key is None:
            continue
        parent._modules[conv_key] = GatedConv2d(parent._modules[conv_key], relu_key is not None, gate_source(index))
        if relu_key is not None:
            parent._modules[relu_key] = nn.Identity()
        fused.append(index)
    return fused
