"""``nad::masked_conv2d``: a frozen convolution fused with bias, ReLU and the task gate."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from . import checks, _layout

IntPair = Union[int, Sequence[int]]


def _pair(name: str, value: IntPair, minimum: int) -> list:
    pair = [value, value] if isinstance(value, int) else list(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= minimum for v in pair):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them; got {value!r}")
    return pair


def masked_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    logits: torch.Tensor,
    task_ids: torch.Tensor,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    relu: bool = True,
) -> torch.Tensor:
    """Gated convolution with frozen weights, everything around the convolution fused.

    ``y = sigmoid(logits[task_ids])[:, :, None, None] * act(conv2d(x, weight, bias))``, with
    ``act`` = ReLU when ``relu`` else the identity. The convolution runs through ATen (cuDNN on
    GPU); bias, activation and gate are one pass that also saves the activation for backward.

    Args:
        x: (N, C_in, H, W), float32/float16/bfloat16 (float64 for gradcheck); contiguous or
            channels_last (the output keeps channels_last).
        weight: (C_out, C_in / groups, kH, kW), x's dtype; frozen (must not require grad).
        bias: (C_out,) in x's dtype, or None; frozen.
        logits: gate logits (T, C_out), float32 (float64 only with float64 ``x``).
        task_ids: (N,) int64 in [0, T), the task of each sample.
        stride, padding, dilation, groups: as in :func:`torch.nn.functional.conv2d`.
        relu: apply ReLU before the gate.

    Returns:
        (N, C_out, H_out, W_out) in x's dtype. Differentiable with respect to ``x`` and
        ``logits`` (the logits gradient accumulated in float32).
    """
    checks.tensor("x", x, dims=4, dtypes=checks.FLOAT_TYPES)
    checks.tensor("weight", weight, dims=4, dtypes=(x.dtype,))
    if bias is not None:
        checks.tensor("bias", bias, dims=1, dtypes=(x.dtype,))
    checks.tensor("logits", logits, dims=2, dtypes=(torch.float32, torch.float64))
    checks.tensor("task_ids", task_ids, dims=1, dtypes=(torch.int64,))
    devices = dict(x=x, weight=weight, logits=logits, task_ids=task_ids)
    checks.same_device(**devices, **({} if bias is None else {"bias": bias}))
    if logits.dtype == torch.float64 and x.dtype != torch.float64:
        raise ValueError(f"logits may be float64 only when x is float64; x is {x.dtype}")
    stride, padding, dilation = _pair("stride", stride, 1), _pair("padding", padding, 0), _pair("dilation", dilation, 1)
    c_in, c_out = x.shape[1], weight.shape[0]
    if not isinstance(groups, int) or groups < 1 or c_in % groups or c_out % groups:
        raise ValueError(
            f"groups must be a positive int dividing x's {c_in} input channels and weight's {c_out} "
            f"output channels; got {groups!r}"
        )
    if weight.shape[1] * groups != c_in:
        raise ValueError(
            f"weight must have shape ({c_out}, {c_in // groups}, kH, kW) for x's {c_in} channels "
            f"in {groups} group(s); got {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape[0] != c_out:
        raise ValueError(f"bias must have shape ({c_out},); got {tuple(bias.shape)}")
    if logits.shape[1] != c_out:
        raise ValueError(f"logits must have shape (T, {c_out}) to match weight's output channels; got {tuple(logits.shape)}")
    if task_ids.shape[0] != x.shape[0]:
        raise ValueError(f"task_ids must have shape ({x.shape[0]},), one task per sample of x; got {tuple(task_ids.shape)}")
    if torch.is_grad_enabled():
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.requires_grad:
                raise ValueError(
                    f"{name} requires grad, but weights are frozen in NAD: masked_conv2d gives "
                    f"gradients to x and logits only; call {name}.requires_grad_(False)"
                )
    checks.ids_in_range("task_ids", task_ids, logits.shape[0], "one row of logits per task")
    return torch.ops.nad.masked_conv2d(x, weight, bias, logits, task_ids, stride, padding, dilation, groups, relu)


def masked_conv2d_reference(x, weight, bias, logits, task_ids, stride=1, padding=0, dilation=1, groups=1, relu=True):
    """Pure-PyTorch definition of :func:`masked_conv2d`, used by the tests and benchmarks."""
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if relu:
        y = torch.relu(y)
    return y * torch.sigmoid(logits)[task_ids][:, :, None, None].to(y.dtype)


def _output_like(x, weight, stride, padding, dilation):
    n, _, h, w = x.shape
    size = [n, weight.shape[0]]
    for i, extent in enumerate((h, w)):
        size.append((extent + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1)
    # Same rule as the kernels: channels_last output for a channels_last input.
    return _layout.empty_in_gate_format(x, size)


@torch.library.register_fake("nad::masked_conv2d")
def _(x, weight, bias, logits, task_ids, stride, padding, dilation, groups, relu):
    return _output_like(x, weight, stride, padding, dilation)


@torch.library.register_fake("nad::masked_conv2d_forward")
def _(x, weight, bias, logits, task_ids, stride, padding, dilation, groups, relu):
    return _output_like(x, weight, stride, padding, dilation), _output_like(x, weight, stride, padding, dilation)


@torch.library.register_fake("nad::masked_conv2d_backward")
def _(grad_y, x, weight, act, logits, task_ids, stride, padding, dilation, groups, relu, x_grad):
    grad_x = _layout.empty_in_gate_format(x) if x_grad else x.new_empty((0,))
    return grad_x, torch.empty_like(logits, memory_format=torch.contiguous_format)
