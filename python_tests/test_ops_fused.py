"""The fused NAD ops (nad::masked_conv2d, nad::gate_mse, nad::normalized_gradient_step_)
against their pure-PyTorch references and against METHOD.md's formulas written plainly.

float32 means IEEE float32 here, on CUDA too: conftest turns TF32 off for every test (under
cuDNN's default TF32 the float32 convolution would sit ~5e-4 from the float64 reference, past
the 1e-5 below)."""
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES
from nad_ext.ops import (
    gate_mse,
    gate_mse_reference,
    masked_conv2d,
    masked_conv2d_reference,
    normalized_gradient_step_,
    normalized_gradient_step_reference,
)


def _rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


# ---------------------------------------------------------------- masked_conv2d

# (C_in, C_out, kernel, stride, padding, dilation, groups)
CONVS = [
    (3, 4, 3, 1, 0, 1, 1),
    (3, 5, 3, 2, 1, 1, 1),
    (2, 3, 3, 1, 2, 2, 1),
    (4, 6, 1, 1, 0, 1, 2),
    (4, 4, 3, (2, 1), (1, 0), (1, 2), 4),
]


def _conv_inputs(device, conv=CONVS[1], dtype=torch.float64, n=5, hw=(7, 6), tasks=3, bias=True):
    c_in, c_out, k, stride, padding, dilation, groups = conv
    x = torch.randn(n, c_in, *hw, device=device, dtype=dtype)
    w = torch.randn(c_out, c_in // groups, k, k, device=device, dtype=dtype) / (c_in * k)
    b = torch.randn(c_out, device=device, dtype=dtype) * 0.5 if bias else None
    logits = torch.randn(tasks, c_out, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    ids = torch.randint(0, tasks, (n,), device=device)
    return (x, w, b, logits, ids), dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_masked_conv2d_gradcheck_float64(device, conv, relu, bias):
    (x, w, b, logits, ids), kw = _conv_inputs(device, conv, bias=bias)
    x.requires_grad_(True)
    logits.requires_grad_(True)
    fn = lambda a, m: masked_conv2d(a, w, b, m, ids, relu=relu, **kw)  # noqa: E731
    torch.testing.assert_close(fn(x, logits), masked_conv2d_reference(x, w, b, logits, ids, relu=relu, **kw))
    assert torch.autograd.gradcheck(fn, (x, logits))


def _forward_backward(fn, x, logits, grad_y):
    x = x.detach().requires_grad_(True)  # keeps x's strides (clone would not for a slice)
    logits = logits.detach().requires_grad_(True)
    y = fn(x, logits)
    y.backward(grad_y)
    return y, x.grad, logits.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("relu", [True, False])
def test_masked_conv2d_matches_reference(device, dtype, tol, relu):
    (x, w, b, logits, ids), kw = _conv_inputs(device, CONVS[1], dtype=dtype, n=8, hw=(12, 11), tasks=4)
    grad_y = torch.randn(8, 5, 6, 6, device=device, dtype=dtype)
    y, gx, gl = _forward_backward(lambda a, m: masked_conv2d(a, w, b, m, ids, relu=relu, **kw), x, logits, grad_y)
    # The reference in float64 from the same (rounded) inputs.
    ry, rgx, rgl = _forward_backward(
        lambda a, m: masked_conv2d_reference(a, w.double(), b.double(), m, ids, relu=relu, **kw),
        x.double(), logits.double(), grad_y.double(),
    )
    assert y.dtype == dtype and gx.dtype == dtype and gl.dtype == torch.float32
    for got, ref in ((y, ry), (gx, rgx), (gl, rgl)):
        assert _rel_err(got, ref) < tol


@pytest.mark.parametrize("device", DEVICES)
def test_masked_conv2d_channels_last_and_non_contiguous(device):
    (x, w, b, logits, ids), kw = _conv_inputs(device, CONVS[4], dtype=torch.float32, n=4, hw=(9, 8))
    grad_y = torch.randn_like(masked_conv2d_reference(x, w, b, logits, ids, **kw))
    ref = _forward_backward(lambda a, m: masked_conv2d_reference(a, w, b, m, ids, **kw), x, logits, grad_y)
    layouts = {
        "channels_last": x.to(memory_format=torch.channels_last),
        "transposed": x.transpose(2, 3).contiguous().transpose(2, 3),  # neither layout
        "sliced": torch.stack([x, x], dim=-1)[..., 0],
    }
    for name, xl in layouts.items():
        y, gx, gl = _forward_backward(lambda a, m: masked_conv2d(a, w, b, m, ids, **kw), xl, logits, grad_y)
        if name == "channels_last":
            assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
        for got, r in zip((y, gx, gl), ref):
            torch.testing.assert_close(got, r, rtol=1e-4, atol=1e-5, msg=name)
    # channels_last weights and a channels_last grad_y change nothing either.
    y, gx, gl = _forward_backward(
        lambda a, m: masked_conv2d(a, w.to(memory_format=torch.channels_last), b, m, ids, **kw),
        x, logits, grad_y.to(memory_format=torch.channels_last),
    )
    for got, r in zip((y, gx, gl), ref):
        torch.testing.assert_close(got, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_conv2d_logits_only_and_no_grad(device):
    (x, w, b, logits, ids), kw = _conv_inputs(device, dtype=torch.float32)
    logits.requires_grad_(True)
    masked_conv2d(x, w, b, logits, ids, **kw).sum().backward()
    ref = logits.detach().clone().requires_grad_(True)
    masked_conv2d_reference(x, w, b, ref, ids, **kw).sum().backward()
    torch.testing.assert_close(logits.grad, ref.grad, rtol=1e-4, atol=1e-5)
    w.requires_grad_(True)  # allowed where nothing is differentiated
    with torch.no_grad():
        y = masked_conv2d(x, w, b, logits, ids, **kw)
    torch.testing.assert_close(y, masked_conv2d_reference(x, w, b, logits, ids, **kw))


@pytest.mark.parametrize("device", DEVICES)
def test_masked_conv2d_tasks_without_samples_get_zero_gradient(device):
    (x, w, b, logits, ids), kw = _conv_inputs(device, dtype=torch.float32, tasks=4)
    logits.requires_grad_(True)
    masked_conv2d(x, w, b, logits, torch.zeros_like(ids), **kw).sum().backward()
    assert torch.all(logits.grad[1:] == 0) and torch.any(logits.grad[0] != 0)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x, w, b, l, i: (x[0], w, b, l, i), "x must have 4"),
        (lambda x, w, b, l, i: (x, w.float(), b, l, i), "weight must have dtype float64"),
        (lambda x, w, b, l, i: (x, w, b[:2], l, i), r"bias must have shape \(5,\)"),
        (lambda x, w, b, l, i: (x, w, b, l[:, :3], i), r"logits must have shape \(T, 5\)"),
        (lambda x, w, b, l, i: (x, w[:, :2], b, l, i), "weight must have shape"),
        (lambda x, w, b, l, i: (x.float(), w.float(), b.float(), l, i), "logits may be float64 only"),
        (lambda x, w, b, l, i: (x, w, b, l, i + 3), r"task_ids must lie in \[0, 3\)"),
        (lambda x, w, b, l, i: (x, w, b, l, i[:2]), "task_ids must have shape"),
        (lambda x, w, b, l, i: (x, w, b, l, i.int()), "task_ids must have dtype int64"),
        (lambda x, w, b, l, i: (x.int(), w, b, l, i), "x must have dtype"),
        (lambda x, w, b, l, i: (x, w, b, l.to("meta"), i), "must be on one device"),
        (lambda x, w, b, l, i: (x, w.to("meta"), b, l, i), "must be on one device"),
        (lambda x, w, b, l, i: (x, w.clone().requires_grad_(True), b, l, i), "weight requires grad.*frozen in NAD"),
        (lambda x, w, b, l, i: (x, w, b.clone().requires_grad_(True), l, i), "bias requires grad.*frozen in NAD"),
    ],
)
def test_masked_conv2d_bad_input_is_named(change, message):
    args, kw = _conv_inputs("cpu")
    with pytest.raises(ValueError, match=message):
        masked_conv2d(*change(*args), **kw)


def test_masked_conv2d_groups_must_divide_channels():
    (x, w, b, logits, ids), _ = _conv_inputs("cpu", CONVS[3])  # 4 -> 6 channels
    for groups in (3, 4, 0):
        with pytest.raises(ValueError, match="groups must be a positive int dividing"):
            masked_conv2d(x, w, b, logits, ids, groups=groups)
    with pytest.raises(ValueError, match="stride must be"):
        masked_conv2d(x, w, b, logits, ids, stride=(1, 2, 3), groups=2)


def test_masked_conv2d_cpp_checks_protect_direct_dispatcher_calls():
    (x, w, b, logits, ids), _ = _conv_inputs("cpu")
    op = torch.ops.nad.masked_conv2d
    with pytest.raises(RuntimeError, match="task_ids must lie in"):
        op(x, w, b, logits, ids + 5, [1, 1], [0, 0], [1, 1], 1, True)
    with pytest.raises(RuntimeError, match="groups"):
        op(x, w, b, logits, ids, [1, 1], [0, 0], [1, 1], 2, True)
    with pytest.raises(RuntimeError, match="weights are frozen in NAD"):
        op(x, w.clone().requires_grad_(True), b, logits, ids, [1, 1], [0, 0], [1, 1], 1, True)


# ---------------------------------------------------------------- gate_mse


def _mse_inputs(device, dtype=torch.float64, shape=(7, 4, 5, 3), tasks=4):
    masked = torch.randn(shape, device=device, dtype=dtype)
    original = torch.randn(shape, device=device, dtype=dtype)
    counts = torch.rand(shape[0], device=device) > 0.3
    counts[0] = True
    ids = torch.randint(0, tasks, (shape[0],), device=device)
    return masked, original, counts, ids


@pytest.mark.parametrize("device", DEVICES)
def test_gate_mse_gradcheck_float64(device):
    masked, original, counts, ids = _mse_inputs(device)
    masked.requires_grad_(True)
    fn = lambda m: gate_mse(m, original, counts, ids, 4)  # noqa: E731
    torch.testing.assert_close(fn(masked), gate_mse_reference(masked, original, counts, ids, 4))
    assert torch.autograd.gradcheck(fn, (masked,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
def test_gate_mse_matches_reference(device, dtype, tol):
    masked, original, counts, ids = _mse_inputs(device, dtype, shape=(16, 8, 9, 9), tasks=5)
    grad = torch.randn(5, device=device)
    got_m = masked.clone().requires_grad_(True)
    out = gate_mse(got_m, original, counts, ids, 5)
    out.backward(grad)
    ref_m = masked.double().requires_grad_(True)
    ref = gate_mse_reference(ref_m, original.double(), counts, ids, 5)
    ref.backward(grad.double())
    assert out.dtype == torch.float32 and got_m.grad.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)  # float32 accumulation of exact inputs
    assert _rel_err(got_m.grad, ref_m.grad) < tol


@pytest.mark.parametrize("device", DEVICES)
def test_gate_mse_is_the_papers_per_task_mse(device):
    """METHOD.md's term, written plainly: task t's MSE over its correctly classified samples."""
    n, tasks = 12, 4
    correct = torch.rand(n, device=device) > 0.4
    ids = torch.randint(0, tasks, (n,), device=device)
    ids[-1], correct[ids == 3] = 3, False  # task 3 present but with an empty K
    for shape in [(n, 5, 6, 6), (n, 7)]:
        masked = torch.randn(shape, device=device, requires_grad=True)
        original = masked.detach() + 0.3 * torch.randn(shape, device=device)
        keep = [(ids == t) & correct for t in range(tasks)]
        expected = torch.stack([F.mse_loss(masked[k], original[k]) if k.any() else masked.sum() * 0 for k in keep])
        out = gate_mse(masked, original, correct, ids, tasks)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-7)
        assert out[3] == 0
        got, = torch.autograd.grad(out.sum(), masked)
        ref, = torch.autograd.grad(expected.sum(), masked)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("device", DEVICES)
def test_gate_mse_layouts(device):
    masked, original, counts, ids = _mse_inputs(device, torch.float32, shape=(6, 5, 4, 4))
    ref = gate_mse_reference(masked, original, counts, ids, 4)
    cl = lambda t: t.to(memory_format=torch.channels_last)  # noqa: E731
    cases = {
        "channels_last": (cl(masked), cl(original)),
        "mixed": (cl(masked), original),
        "non_contiguous": (masked.transpose(2, 3).contiguous().transpose(2, 3), original[:, :, :, :]),
    }
    for name, (m, o) in cases.items():
        m = m.detach().requires_grad_(True)
        out = gate_mse(m, o, counts, ids, 4)
        torch.testing.assert_close(out, ref, msg=name)
        out.sum().backward()
        assert m.grad.shape == m.shape
        expected = 2 * (masked - original) * counts[:, None, None, None]
        k = torch.zeros(4, device=device).index_add_(0, ids, counts.float())
        expected = expected / (k[ids] * masked[0].numel()).clamp(min=1)[:, None, None, None]
        torch.testing.assert_close(m.grad, expected, msg=name)
        if name == "channels_last":
            assert m.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m, o, c, i: (m[0, 0, 0], o, c, i), "masked must have at least 2"),
        (lambda m, o, c, i: (m, o[:, :2], c, i), "original must have masked's shape"),
        (lambda m, o, c, i: (m, o.float(), c, i), "original must have dtype float64"),
        (lambda m, o, c, i: (m.int(), o, c, i), "masked must have dtype"),
        (lambda m, o, c, i: (m, o, c.float(), i), "counts must have dtype bool"),
        (lambda m, o, c, i: (m, o, c[:3], i), "counts must have shape"),
        (lambda m, o, c, i: (m, o, c, i + 4), r"task_ids must lie in \[0, 4\)"),
        (lambda m, o, c, i: (m, o, c, i.int()), "task_ids must have dtype int64"),
        (lambda m, o, c, i: (m, o.to("meta"), c, i), "must be on one device"),
        (lambda m, o, c, i: (m, o.clone().requires_grad_(True), c, i), "original requires grad"),
    ],
)
def test_gate_mse_bad_input_is_named(change, message):
    with pytest.raises(ValueError, match=message):
        gate_mse(*change(*_mse_inputs("cpu")), 4)


def test_gate_mse_cpp_checks():
    masked, original, counts, ids = _mse_inputs("cpu")
    with pytest.raises(RuntimeError, match="task_ids must lie in"):
        torch.ops.nad.gate_mse(masked, original, counts, ids + 4, 4)
    with pytest.raises(RuntimeError, match="frozen network"):
        torch.ops.nad.gate_mse(masked, original.requires_grad_(True), counts, ids, 4)


# ---------------------------------------------------------------- normalized_gradient_step_


def _gates(device, dtype=torch.float32, tasks=6, widths=(5, 9, 1, 300)):
    logits = [torch.randn(tasks, c, device=device, dtype=dtype, requires_grad=True) for c in widths]
    for m in logits:
        m.grad = torch.randn_like(m)
        m.grad[1] = 0  # zero norm: unchanged
    logits[2].grad = None  # no gradient: skipped
    return logits


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normalized_step_equals_its_reference(device, dtype):
    ours, ref = _gates(device, dtype), _gates(device, dtype)
    for m, r in zip(ours, ref):
        with torch.no_grad():
            r.copy_(m)
        r.grad = None if m.grad is None else m.grad.clone()
    tasks = torch.tensor([4, 1, 0, 4, 2], device=device)  # a duplicate, a zero-gradient row
    before = [m.detach().clone() for m in ours]
    normalized_gradient_step_(ours, [m.grad for m in ours], tasks, 0.1)
    normalized_gradient_step_reference(ref, [r.grad for r in ref], tasks, 0.1)
    for m, r, b in zip(ours, ref, before):
        torch.testing.assert_close(m.detach(), r.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(m[[1, 3, 5]].detach(), b[[1, 3, 5]], rtol=0, atol=0)
    assert not torch.equal(ours[0][0], before[0][0])
    assert ours[0].requires_grad and ours[0].is_leaf


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normalized_step_takes_the_authors_step_for_tiny_norms(device, dtype):
    """The authors' update is m - lr * F.normalize(g) (eps 1e-12): a gradient whose norm lies
    in (0, 1e-12) takes a step of lr * ||g|| / 1e-12, shorter than lr, not a full one. Rows with
    norms around the clamp, a zero row, and rows holding a NaN or an Inf (left unchanged: the
    trainer stops or skips such steps before the op sees them)."""
    gen = torch.Generator().manual_seed(3)
    norms = [3e-15, 1e-13, 7e-13, 1e-12, 1.5e-12, 4e-12, 1e-6, 2.0, 0.0]
    direction = torch.randn(len(norms) + 2, 6, generator=gen, dtype=torch.float64)
    direction /= direction.norm(dim=1, keepdim=True)
    g = (direction * torch.tensor(norms + [1.0, 1.0], dtype=torch.float64)[:, None]).to(dtype)
    g[-2, 3] = float("nan")
    g[-1, 1] = float("inf")
    logits = torch.randn(g.shape, generator=gen, dtype=torch.float64).to(dtype)
    before = logits.clone()
    authors = logits - 0.1 * F.normalize(g, dim=1)  # findpath.py's update, every row at once
    tasks = torch.arange(len(g), device=device)
    ours, ref = logits.to(device), logits.clone()
    normalized_gradient_step_([ours], [g.to(device)], tasks, 0.1)
    normalized_gradient_step_reference([ref], [g], tasks, 0.1)
    finite = slice(0, len(norms))
    tol = dict(rtol=0, atol=4 * torch.finfo(dtype).eps)  # |m| < 5: a few ulps of the result
    torch.testing.assert_close(ours.cpu()[finite], authors[finite], **tol)
    torch.testing.assert_close(ref[finite], authors[finite], **tol)
    # the steps' lengths: lr * min(1, ||g|| / 1e-12)
    moved = (ours.cpu()[finite] - before[finite]).double().norm(dim=1)
    expected = torch.tensor([0.1 * min(1.0, n / 1e-12) for n in norms], dtype=torch.float64)
    torch.testing.assert_close(moved, expected, rtol=1e-5 if dtype == torch.float32 else 1e-9, atol=1e-6)
    # non-finite rows: the authors' update would spread the NaN; the op leaves them unchanged
    assert not torch.isfinite(authors[-2:]).all()
    assert torch.equal(ours.cpu()[-2:], before[-2:]) and torch.equal(ref[-2:], before[-2:])


@pytest.mark.parametrize("device", DEVICES)
def test_normalized_step_strided_logits(device):
    base = torch.randn(40, 6, device=device)
    logits = [base.t(), torch.randn(6, 3, device=device)[:, ::2]]  # (6, 40) column-major; a slice
    grads = [torch.randn(6, 40, device=device).t().contiguous().t(), torch.randn(6, 2, device=device)]
    ref = [m.clone() for m in logits]
    tasks = torch.tensor([0, 5, 3], device=device)
    normalized_gradient_step_(logits, grads, tasks, 0.5)
    normalized_gradient_step_reference(ref, grads, tasks, 0.5)
    for m, r in zip(logits, ref):
        torch.testing.assert_close(m, r)
    torch.testing.assert_close(base.t(), ref[0])  # updated in place, through the view


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda l, g, t: (l, g[:1], t), "grads must have one entry per gate point"),
        (lambda l, g, t: (l, g, t.int()), "tasks must have dtype int64"),
        (lambda l, g, t: (l, g, t + 6), r"tasks must lie in \[0, 6\)"),
        (lambda l, g, t: (l, [g[0], g[1][:, :2]], t), r"grads\[1\] must have logits\[1\]'s shape"),
        (lambda l, g, t: (l, [g[0], g[1].double()], t), r"grads\[1\] must have dtype float32"),
        (lambda l, g, t: ([l[0], l[1][:3]], [g[0], g[1][:3]], t), r"logits\[1\] must have shape \(6, C\)"),
        (lambda l, g, t: (l, [g[0], g[1].to("meta")], t), "must be on one device"),
        (lambda l, g, t: ([l[0].half(), l[1]], [g[0].half(), g[1]], t), r"logits\[0\] must have dtype"),
    ],
)
def test_normalized_step_bad_input_is_named(change, message):
    logits = [torch.randn(6, 4), torch.randn(6, 3)]
    grads = [torch.randn_like(m) for m in logits]
    with pytest.raises(ValueError, match=message):
        normalized_gradient_step_(*change(logits, grads, torch.tensor([0, 2])), 0.1)


# ---------------------------------------------------------------- tracing


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4, 3, 9, 8).to(memory_format=torch.channels_last)
        w, logits, ids = torch.empty(6, 3, 3, 3), torch.empty(2, 6), torch.zeros(4, dtype=torch.int64)
        y = torch.ops.nad.masked_conv2d(x, w, None, logits, ids, [2, 1], [1, 0], [1, 2], 1, True)
        y2, act = torch.ops.nad.masked_conv2d_forward(x, w, None, logits, ids, [2, 1], [1, 0], [1, 2], 1, True)
        gx, gl = torch.ops.nad.masked_conv2d_backward(y, x, w, act, logits, ids, [2, 1], [1, 0], [1, 2], 1, True, True)
        mse = torch.ops.nad.gate_mse(y, y2, torch.ones(4, dtype=torch.bool), ids, 2)
        gm = torch.ops.nad.gate_mse_backward(mse, y, y2, torch.ones(4, dtype=torch.bool), ids, 2)
    expected = F.conv2d(torch.empty(4, 3, 9, 8), torch.empty(6, 3, 3, 3), None, (2, 1), (1, 0), (1, 2)).shape
    assert y.shape == y2.shape == act.shape == gm.shape == expected
    assert y.is_contiguous(memory_format=torch.channels_last) and gm.is_contiguous(memory_format=torch.channels_last)
    assert gx.shape == x.shape and gl.shape == (2, 6) and mse.shape == (2,) and mse.dtype == torch.float32


def test_fake_matches_real_layouts():
    from torch._subclasses.fake_tensor import FakeTensorMode

    (x, w, b, logits, ids), kw = _conv_inputs("cpu", CONVS[4], dtype=torch.float32)
    conv = [list(kw["stride"]), list(kw["padding"]), list(kw["dilation"]), kw["groups"], True]
    for xl in (x, x.to(memory_format=torch.channels_last), torch.stack([x, x], -1)[..., 0], x.transpose(2, 3)):
        real = torch.ops.nad.masked_conv2d_forward(xl, w, b, logits, ids, *conv)
        mode = FakeTensorMode()
        fakes = [mode.from_tensor(t) for t in (xl, w, b, logits, ids)]
        with mode:
            fake = torch.ops.nad.masked_conv2d_forward(*fakes, *conv)
        for r, f in zip(real, fake):
            assert r.shape == f.shape and r.stride() == f.stride()
        counts, grad = ids >= 0, torch.ones(3)
        fake_counts, fake_grad_t = mode.from_tensor(counts), mode.from_tensor(grad)
        with mode:
            fake_grad = torch.ops.nad.gate_mse_backward(fake_grad_t, fake[0], fake[1], fake_counts, fakes[4], 3)
        real_grad = torch.ops.nad.gate_mse_backward(grad, real[0], real[1], counts, ids, 3)
        assert real_grad.shape == fake_grad.shape and real_grad.stride() == fake_grad.stride()


def test_torch_compile_fullgraph():
    class Gated(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1).requires_grad_(False)
            self.logits = torch.nn.Parameter(torch.randn(2, 4))

        def forward(self, x, ids):
            y = masked_conv2d(x, self.conv.weight, self.conv.bias, self.logits, ids, padding=1)
            return y.sum(dim=(1, 2, 3))

    model = Gated()
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    ids = torch.tensor([0, 1, 1, 0])
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x, ids)
    torch.testing.assert_close(out, model(x, ids))
    out.sum().backward()
    grads = model.logits.grad.clone(), x.grad.clone()
    model.logits.grad, x.grad = None, None
    model(x, ids).sum().backward()
    torch.testing.assert_close(grads[0], model.logits.grad)
    torch.testing.assert_close(grads[1], x.grad)
