"""nad::task_gate and nad::gate_mse on channels-innermost layouts, read in place: the (N, C, L)
view of (N, L, C) tokens, the (N, C, H, W) view of an NHWC map (channels_last), a 5-D
(N, C, D, H, W) view of channels-last volumes, against the pure-PyTorch references, with
float64 gradcheck, bfloat16, the fakes' strides, and no copy of the activations."""
import pytest
import torch

from conftest import DEVICES, assert_fake_matches_real
from nad_ext.ops import gate_mse, gate_mse_reference, task_gate, task_gate_reference
from nad_ext.ops._layout import channels_inner

N, C, T = 5, 6, 3
# name -> the stored tensor's shape, and the dim its channels are on (moved to 1 for the ops).
LAYOUTS = {
    "tokens": ((N, 7, C), 2),
    "nhwc": ((N, 3, 4, C), 3),
    "ndhwc": ((N, 2, 3, 2, C), 4),
    "contiguous": ((N, C, 7), 1),
}
INNER = ["tokens", "nhwc", "ndhwc"]


def _stored(layout, device, dtype=torch.float64):
    shape, _ = LAYOUTS[layout]
    return torch.randn(shape, device=device, dtype=dtype)


def _view(layout, stored):
    """The (N, C, *spatial) view the ops get: no copy."""
    return stored.movedim(LAYOUTS[layout][1], 1)


def _args(device, dtype=torch.float64):
    logits = torch.randn(T, C, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    ids = torch.tensor([0, 2, 1, 2, 0], device=device)
    return logits, ids


def test_the_views_are_the_layouts_meant():
    for layout in INNER:
        x = _view(layout, _stored(layout, "cpu"))
        assert channels_inner(x) and x.stride(1) == 1
    assert _view("nhwc", _stored("nhwc", "cpu")).is_contiguous(memory_format=torch.channels_last)
    assert not channels_inner(_view("contiguous", _stored("contiguous", "cpu")))
    assert not channels_inner(torch.randn(N, 7, C)[:, :5].movedim(2, 1))  # a slice: not dense
    assert not channels_inner(torch.randn(N, C, 4, 3).transpose(2, 3))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_task_gate_matches_the_reference_and_keeps_the_layout(device, layout, dtype):
    stored = _stored(layout, device, dtype)
    x = _view(layout, stored)
    logits, ids = _args(device, dtype)
    y = task_gate(x, logits, ids)
    torch.testing.assert_close(y, task_gate_reference(x, logits, ids))
    assert y.stride() == x.stride()  # the same layout as x (tokens: (L*C, 1, C))
    grad_y = _view(layout, torch.randn_like(stored))
    gx, gl = torch.ops.nad.task_gate_backward(grad_y, x, logits, ids)
    assert gx.stride() == x.stride()
    xr, lr = x.detach().clone().requires_grad_(True), logits.clone().requires_grad_(True)
    task_gate_reference(xr, lr, ids).backward(grad_y)
    torch.testing.assert_close(gx, xr.grad)
    torch.testing.assert_close(gl, lr.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gradcheck_float64(device, layout):
    """The ops see the layout's view (taken inside the function, so every perturbed input is in
    that layout); gradients flow back to the stored tensor."""
    logits, ids = _args(device)
    stored = _stored(layout, device).requires_grad_(True)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s, m: task_gate(_view(layout, s), m, ids), (stored, logits))
    original = _stored(layout, device)
    counts = torch.tensor([True, True, False, True, True], device=device)
    assert torch.autograd.gradcheck(
        lambda s: gate_mse(_view(layout, s), _view(layout, original), counts, ids, T), (stored,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gate_mse_matches_the_reference_and_keeps_the_layout(device, layout):
    masked, original = _stored(layout, device, torch.float32), _stored(layout, device, torch.float32)
    m, o = _view(layout, masked), _view(layout, original)
    _, ids = _args(device)
    counts = torch.tensor([True, False, True, True, True], device=device)
    torch.testing.assert_close(gate_mse(m, o, counts, ids, T), gate_mse_reference(m, o, counts, ids, T))
    grad = torch.rand(T, device=device)
    g = torch.ops.nad.gate_mse_backward(grad, m, o, counts, ids, T)
    assert g.stride() == m.stride()
    mr = m.detach().clone().requires_grad_(True)
    (gate_mse_reference(mr, o, counts, ids, T) * grad).sum().backward()
    torch.testing.assert_close(g, mr.grad)
    # A pair of different layouts is copied to one, with the same result.
    mixed = gate_mse(m, o.contiguous(), counts, ids, T)
    torch.testing.assert_close(mixed, gate_mse_reference(m, o, counts, ids, T))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", INNER)
def test_bfloat16(device, layout):
    stored = _stored(layout, device, torch.bfloat16)
    x = _view(layout, stored).requires_grad_(True)
    logits, ids = _args(device, torch.bfloat16)
    logits.requires_grad_(True)
    y = task_gate(x, logits, ids)
    assert y.dtype == torch.bfloat16 and y.stride() == x.stride()
    xr, lr = x.detach().double().requires_grad_(True), logits.detach().double().requires_grad_(True)
    ref = task_gate_reference(xr, lr, ids)
    torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=1e-2)
    grad_y = _view(layout, torch.randn_like(stored))
    y.backward(grad_y)
    ref.backward(grad_y.double())
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(logits.grad.double(), lr.grad, rtol=2e-2, atol=2e-2)
    original = _view(layout, _stored(layout, device, torch.bfloat16))
    counts = torch.ones(N, dtype=torch.bool, device=device)
    out = gate_mse(y.detach(), original, counts, ids, T)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), gate_mse_reference(y.detach().double(), original.double(), counts, ids, T),
                               rtol=1e-4, atol=1e-5)  # bf16 inputs, summed in float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", list(LAYOUTS) + ["sliced_tokens", "one_token", "nhwc_h1"])
def test_fakes_give_the_real_strides(device, layout):
    # Size-1 dims (whose strides do not count for contiguity): one token is contiguous (N, C, 1),
    # an NHWC map of height 1 stays channels innermost.
    odd = {"sliced_tokens": lambda: torch.randn(N, 9, C, device=device)[:, 2:].movedim(2, 1),  # not dense: copied
           "one_token": lambda: torch.randn(N, 1, C, device=device).movedim(2, 1),
           "nhwc_h1": lambda: torch.randn(N, 1, 4, C, device=device).movedim(3, 1)}
    if layout in odd:
        x, o = odd[layout](), odd[layout]()
    else:
        x, o = _view(layout, _stored(layout, device, torch.float32)), _view(layout, _stored(layout, device, torch.float32))
    logits, ids = _args(device, torch.float32)
    counts = torch.tensor([True, False, True, True, True], device=device)
    ops = torch.ops.nad
    for name, op, args in [
        ("task_gate", ops.task_gate, (x, logits, ids)),
        ("task_gate_backward", ops.task_gate_backward, (torch.randn_like(x), x, logits, ids)),
        ("task_gate_backward (contiguous grad)", ops.task_gate_backward, (torch.randn(x.shape, device=device), x,
                                                                          logits, ids)),
        ("gate_mse", ops.gate_mse, (x, o, counts, ids, T)),
        ("gate_mse_backward", ops.gate_mse_backward, (torch.ones(T, device=device), x, o, counts, ids, T)),
        ("gate_mse_backward (mixed)", ops.gate_mse_backward, (torch.ones(T, device=device), x, o.contiguous(),
                                                              counts, ids, T)),
    ]:
        assert_fake_matches_real(op, *args, what=f"{name} on {layout}")


# What would copy an activation: a contiguous() / clone / dtype conversion of a tensor of its size.
_COPIES = {"aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy"}


def _copies_of(numel, fn):
    """The copy-like aten ops that ``fn`` runs on tensors of ``numel`` elements."""
    from math import prod

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return [e.name for e in prof.events()
            if e.name in _COPIES and any(isinstance(s, list) and s and prod(s) == numel for s in e.input_shapes)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_no_copy_of_the_activations(device, layout):
    """Forward and backward of both ops, through autograd as training runs them, copy nothing
    of the size of the activations; a strided slice (the control) is copied."""
    masked = _stored(layout, device, torch.float32)
    original = _stored(layout, device, torch.float32)
    logits, ids = _args(device, torch.float32)
    logits.requires_grad_(True)
    counts = torch.tensor([True, False, True, True, True], device=device)

    def step(view):
        x = view(masked).requires_grad_(True)
        y = task_gate(x, logits, ids)
        # The next layer reads the stored layout back, as a network does ((N, L, C) tokens).
        after = y.movedim(1, LAYOUTS[layout][1])
        loss = gate_mse(y, view(original), counts, ids, T).sum() + (after * after.detach()).sum()
        torch.autograd.grad(loss, [x, logits])

    assert _copies_of(masked.numel(), lambda: step(lambda t: _view(layout, t))) == []
    # The control: every other token, (N, C, L) with a channel stride of 1 but not dense.
    wide = torch.randn(N, 2 * masked.shape[1], *masked.shape[2:], device=device)
    sliced = lambda t: _view(layout, wide[:, ::2] if t is masked else t)  # noqa: E731
    assert _copies_of(masked.numel(), lambda: step(sliced)) != []
