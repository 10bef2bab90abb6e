"""Property tests of the native operators (hypothesis): random shapes (0- and 1-sized dims
included), strides (channels innermost, permuted, sliced, expanded), dtypes, task counts and ids,
against the pure-PyTorch references in float64, forward and backward, and
``torch.library.opcheck`` on samples drawn the same way. Derandomized, with a bounded number of
examples: CI runs the same cases every time."""
from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from nad_ext.ops import (  # noqa: E402
    gate_mse,
    mask_overlap,
    masked_conv2d,
    normalized_gradient_step_,
    task_gate,
)
from nad_ext.ops.gate_mse import gate_mse_reference  # noqa: E402
from nad_ext.ops.mask_overlap import mask_overlap_reference  # noqa: E402
from nad_ext.ops.masked_conv2d import masked_conv2d_reference  # noqa: E402
from nad_ext.ops.normalized_step import normalized_gradient_step_reference  # noqa: E402
from nad_ext.ops.task_gate import task_gate_reference  # noqa: E402


def _settings(examples: int):
    return settings(derandomize=True, max_examples=examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


EXAMPLES, OPCHECK_EXAMPLES = 60, 8
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Relative tolerance of one result rounded to the dtype (the references compute in float64).
RTOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, what: str) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=what)


def _layout(base_shape, layout: str, gen: torch.Generator) -> torch.Tensor:
    """A float32 tensor of shape ``base_shape`` = (N, C, *spatial) in ``layout``."""
    n, c, *spatial = base_shape
    if layout == "channels_innermost":  # (N, *spatial, C) seen as (N, C, *spatial): tokens, NHWC
        return torch.randn(n, *spatial, c, generator=gen).movedim(-1, 1)
    if layout == "permuted":  # the spatial dims stored in reverse order
        t = torch.randn(n, c, *reversed(spatial), generator=gen)
        return t.permute(0, 1, *range(t.dim() - 1, 1, -1))
    if layout == "sliced":  # every other element of the last dim
        return torch.randn(n, c, *spatial[:-1], 2 * spatial[-1], generator=gen)[..., ::2]
    if layout == "expanded":  # the last dim broadcast from size 1 (stride 0)
        return torch.randn(n, c, *spatial[:-1], 1, generator=gen).expand(n, c, *spatial)
    return torch.randn(n, c, *spatial, generator=gen)


@st.composite
def activations(draw, max_channels=12):
    """(x, task_ids, num_tasks): x of shape (N, C, *spatial) in one of the layouts and dtypes."""
    dtype = draw(st.sampled_from(DTYPES))
    n, c = draw(st.integers(0, 4)), draw(st.integers(1, max_channels))
    spatial = draw(st.lists(st.integers(0, 5), min_size=0, max_size=3))
    layouts = ["contiguous"] + (["channels_innermost", "sliced", "expanded"] if spatial else [])
    layouts += ["permuted"] if len(spatial) >= 2 else []
    layout = draw(st.sampled_from(layouts))
    num_tasks = draw(st.integers(1, 4))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = _layout((n, c, *spatial), layout, gen).to(dtype)
    ids = torch.randint(0, num_tasks, (n,), generator=gen)
    return x, ids, num_tasks, f"x {tuple(x.shape)} strides {x.stride()} {dtype}, T {num_tasks}"


def _opcheck_ready(t: torch.Tensor) -> torch.Tensor:
    """opcheck copies its inputs with torch's clone_input, which fails on a strided view with no
    elements ("negative dimension -1"): such inputs are passed contiguous (the numeric tests keep
    the views)."""
    return t.contiguous() if t.numel() == 0 else t


def _logits(num_tasks: int, channels: int, x_dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    dtype = torch.float64 if x_dtype == torch.float64 else torch.float32
    return torch.randn(num_tasks, channels, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _gate_sum_bound(x: torch.Tensor, grad_y: torch.Tensor, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per (task, channel): sum of |grad_y * x| times g (1 - g), the scale of the logits gradient."""
    terms = (grad_y.double() * x.double()).abs()
    terms = terms.flatten(2).sum(2) if terms.dim() > 2 else terms
    sums = torch.zeros(logits.shape, dtype=torch.float64).index_add_(0, ids, terms)
    g = torch.sigmoid(logits.double())
    return sums * g * (1 - g)


@_settings(EXAMPLES)
@given(activations(), st.integers(0, 2**16))
def test_task_gate_matches_reference(sample, seed):
    x, ids, num_tasks, what = sample
    logits = _logits(num_tasks, x.shape[1], x.dtype, seed)
    gen = torch.Generator().manual_seed(seed)
    grad_y = torch.randn(x.shape, generator=gen).to(x.dtype)
    xg, lg = x.detach().clone().requires_grad_(), logits.clone().requires_grad_()
    y = task_gate(xg, lg, ids)
    x64, l64 = x.double().requires_grad_(), logits.double().requires_grad_()
    ref = task_gate_reference(x64, l64, ids)
    rtol = RTOL[x.dtype]
    _close(y, ref, rtol, 1e-6 if x.dtype != torch.float64 else 1e-14, f"forward, {what}")
    y.backward(grad_y)
    ref.backward(grad_y.double())
    _close(xg.grad, x64.grad, rtol, 1e-6 if x.dtype != torch.float64 else 1e-14, f"grad x, {what}")
    # The logits gradient sums over samples and space in float32 (float64 for float64 x).
    bound = _gate_sum_bound(x, grad_y, ids, logits) * (1e-5 if x.dtype != torch.float64 else 1e-12) + 1e-7
    err = (lg.grad.double() - l64.grad).abs()
    assert bool((err <= bound).all()), f"grad logits, {what}: worst error {err.max():.3g}"


@_settings(OPCHECK_EXAMPLES)
@given(activations(max_channels=6), st.integers(0, 2**16))
def test_task_gate_opcheck(sample, seed):
    x, ids, num_tasks, _ = sample
    logits = _logits(num_tasks, x.shape[1], x.dtype, seed)
    torch.library.opcheck(torch.ops.nad.task_gate.default,
                          (_opcheck_ready(x).requires_grad_(), logits.requires_grad_(), ids))


@st.composite
def mse_pairs(draw):
    x, ids, num_tasks, what = draw(activations())
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    original = (x.detach().double() + torch.randn(x.shape, generator=gen, dtype=torch.float64)).to(x.dtype)
    counts = torch.rand(x.shape[0], generator=gen) < draw(st.sampled_from([0.0, 0.5, 1.0]))
    return x, original, counts, ids, num_tasks, what + f", {int(counts.sum())} counted"


@_settings(EXAMPLES)
@given(mse_pairs(), st.integers(0, 2**16))
def test_gate_mse_matches_reference(sample, seed):
    masked, original, counts, ids, num_tasks, what = sample
    mg = masked.detach().clone().requires_grad_()
    out = gate_mse(mg, original, counts, ids, num_tasks)
    m64 = masked.double().requires_grad_()
    ref = gate_mse_reference(m64, original.double(), counts, ids, num_tasks)
    tight = masked.dtype == torch.float64
    _close(out, ref, 1e-12 if tight else 1e-5, 1e-14 if tight else 1e-6, f"forward, {what}")
    grad = torch.randn(num_tasks, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    out.backward(grad)
    ref.backward(grad.double())
    _close(mg.grad, m64.grad, RTOL[masked.dtype], 1e-6 if not tight else 1e-14, f"grad masked, {what}")


@_settings(OPCHECK_EXAMPLES)
@given(mse_pairs())
def test_gate_mse_opcheck(sample):
    masked, original, counts, ids, num_tasks, _ = sample
    torch.library.opcheck(torch.ops.nad.gate_mse.default,
                          (_opcheck_ready(masked).requires_grad_(), _opcheck_ready(original), counts, ids, num_tasks))


@st.composite
def convolutions(draw):
    dtype = draw(st.sampled_from(DTYPES))
    groups = draw(st.sampled_from([1, 2]))
    c_in, c_out = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 4))
    k, stride, padding, dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(0, 1)),
                                    draw(st.integers(1, 2)))
    n, h, w = draw(st.integers(0, 3)), draw(st.integers(1, 7)), draw(st.integers(1, 7))
    span = dilation * (k - 1) + 1
    hypothesis.assume(h + 2 * padding >= span and w + 2 * padding >= span)
    channels_last = draw(st.booleans())
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(n, c_in, h, w, generator=gen).to(dtype)
    weight = (torch.randn(c_out, c_in // groups, k, k, generator=gen) / k).to(dtype)
    if channels_last:
        x, weight = x.contiguous(memory_format=torch.channels_last), weight.contiguous(memory_format=torch.channels_last)
    bias = torch.randn(c_out, generator=gen).to(dtype) if draw(st.booleans()) else None
    num_tasks = draw(st.integers(1, 3))
    ids = torch.randint(0, num_tasks, (n,), generator=gen)
    relu = draw(st.booleans())
    what = (f"x {tuple(x.shape)} {'channels_last' if channels_last else 'contiguous'} {dtype}, w {tuple(weight.shape)}, "
            f"stride {stride} padding {padding} dilation {dilation} groups {groups}, bias {bias is not None}, relu {relu}")
    return x, weight, bias, ids, num_tasks, (stride, padding, dilation, groups, relu), what


@_settings(EXAMPLES)
@given(convolutions(), st.integers(0, 2**16))
def test_masked_conv2d_matches_reference(sample, seed):
    x, weight, bias, ids, num_tasks, (stride, padding, dilation, groups, relu), what = sample
    logits = _logits(num_tasks, weight.shape[0], x.dtype, seed)
    xg, lg = x.detach().clone().requires_grad_(), logits.clone().requires_grad_()
    y = masked_conv2d(xg, weight, bias, lg, ids, stride, padding, dilation, groups, relu)
    x64, l64 = x.double().requires_grad_(), logits.double().requires_grad_()
    ref = masked_conv2d_reference(x64, weight.double(), None if bias is None else bias.double(), l64, ids, stride,
                                  padding, dilation, groups, relu)
    low = x.dtype in (torch.bfloat16, torch.float16)
    # The convolution itself runs in x's dtype: a sum of up to 18 products, each rounded.
    rtol, atol = (RTOL[x.dtype] * 4, RTOL[x.dtype] * 4) if low else (1e-5, 1e-5) if x.dtype == torch.float32 else (1e-10, 1e-12)
    _close(y, ref, rtol, atol, f"forward, {what}")
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(x.dtype)
    y.backward(grad_y)
    ref.backward(grad_y.double())
    _close(xg.grad, x64.grad, rtol, atol, f"grad x, {what}")
    scale = l64.grad.abs().max().item() if l64.grad.numel() else 0.0
    _close(lg.grad, l64.grad, rtol, atol * max(1.0, scale) * (20 if low else 1), f"grad logits, {what}")


@_settings(OPCHECK_EXAMPLES)
@given(convolutions())
def test_masked_conv2d_opcheck(sample):
    x, weight, bias, ids, num_tasks, (stride, padding, dilation, groups, relu), _ = sample
    logits = _logits(num_tasks, weight.shape[0], x.dtype)
    torch.library.opcheck(torch.ops.nad.masked_conv2d.default,
                          (x.requires_grad_(), weight, bias, logits.requires_grad_(), ids, [stride] * 2, [padding] * 2,
                           [dilation] * 2, groups, relu))


@st.composite
def steps(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    num_tasks = draw(st.integers(1, 4))
    widths = draw(st.lists(st.integers(1, 9), min_size=1, max_size=4))
    tasks = draw(st.lists(st.integers(0, num_tasks - 1), min_size=0, max_size=5))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    transposed = draw(st.booleans())
    logits, grads = [], []
    for c in widths:
        m = torch.randn(c, num_tasks, generator=gen).t() if transposed else torch.randn(num_tasks, c, generator=gen)
        g = torch.randn(num_tasks, c, generator=gen)
        g[torch.rand(num_tasks, generator=gen) < 0.3] = 0  # rows with a zero norm stay unchanged
        logits.append(m.to(dtype))
        grads.append(g.to(dtype))
    return logits, grads, torch.tensor(tasks, dtype=torch.int64), f"widths {widths}, tasks {tasks}, {dtype}"


@_settings(EXAMPLES)
@given(steps(), st.floats(0.01, 1.0))
def test_normalized_step_matches_reference(sample, lr):
    logits, grads, tasks, what = sample
    ours = [m.clone() if not m.t().is_contiguous() else m.t().clone().t() for m in logits]
    ref = [m.double() for m in logits]
    normalized_gradient_step_(ours, grads, tasks, lr)
    normalized_gradient_step_reference(ref, [g.double() for g in grads], tasks, lr)
    for l, (o, r) in enumerate(zip(ours, ref)):
        tight = o.dtype == torch.float64
        _close(o, r, 1e-12 if tight else 1e-6, 1e-12 if tight else 1e-6, f"gate point {l}, {what}")
        assert o.stride() == logits[l].stride(), f"gate point {l}: strides changed, {what}"


@_settings(OPCHECK_EXAMPLES)
@given(steps())
def test_normalized_step_opcheck(sample):
    logits, grads, tasks, _ = sample
    torch.library.opcheck(torch.ops.nad.normalized_gradient_step_.default, (logits, grads, tasks, 0.1))


@st.composite
def mask_sets(draw):
    sizes = draw(st.lists(st.integers(1, 70), min_size=1, max_size=4))
    ta, tb = draw(st.integers(0, 5)), draw(st.integers(0, 5))
    density = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    a = torch.rand(2 * ta, sum(sizes), generator=gen) < density
    b = torch.rand(tb, sum(sizes), generator=gen) < density
    a = a[::2] if draw(st.booleans()) else a[:ta]  # rows of a as a strided view, or contiguous
    return a, b, sizes, f"a {tuple(a.shape)} strides {a.stride()}, b {tuple(b.shape)}, layers {sizes}, density {density}"


@_settings(EXAMPLES)
@given(mask_sets(), st.sampled_from(["iou", "iomin", "intersection"]), st.booleans())
def test_mask_overlap_matches_reference(sample, metric, per_layer):
    a, b, sizes, what = sample
    out = mask_overlap(a, b, sizes, metric, per_layer)
    ref = mask_overlap_reference(a, b, sizes, metric, per_layer)
    _close(out, ref, 1e-6, 1e-6, f"{metric}, per_layer {per_layer}, {what}")


@_settings(OPCHECK_EXAMPLES)
@given(mask_sets(), st.sampled_from(["iou", "iomin", "intersection"]), st.booleans())
def test_mask_overlap_opcheck(sample, metric, per_layer):
    a, b, sizes, _ = sample
    torch.library.opcheck(torch.ops.nad.mask_overlap.default,
                          (_opcheck_ready(a), _opcheck_ready(b), sizes, metric, per_layer))
