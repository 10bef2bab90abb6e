"""Edge cases every nad operator must handle alike on the CPU and on CUDA: empty batches and
empty tensors, the fakes' strides against the real ops', task ids outside [0, T) (negative ones
included), and sizes past the limits the CUDA launches used to have (the index arithmetic they
share with the CPU). Runs on the CPU in CI; the [cuda] cases run in scripts/gpu_check.sh."""
import pytest
import torch
from torch.utils import _pytree as pytree

from conftest import DEVICES, assert_fake_matches_real
from nad_ext.ops import (
    checks,
    gate_mse,
    gate_mse_reference,
    mask_overlap,
    mask_overlap_reference,
    masked_conv2d,
    masked_conv2d_reference,
    normalized_gradient_step_,
    task_gate,
    task_gate_reference,
)

CONV = dict(stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1)


def _conv_args(relu=True):
    return [CONV["stride"], CONV["padding"], CONV["dilation"], CONV["groups"], relu]


# ---------------------------------------------------------------- empty batches and tensors


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (0, 3), (2, 3, 0, 5), (2, 0, 4)])
def test_task_gate_empty(device, shape):
    x = torch.randn(shape, device=device, requires_grad=True)
    logits = torch.randn(2, shape[1], device=device, requires_grad=True)
    ids = torch.zeros(shape[0], dtype=torch.int64, device=device)
    y = task_gate(x, logits, ids)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_masked_conv2d_empty_batch(device, channels_last):
    x = torch.randn(0, 3, 6, 5, device=device, requires_grad=True)
    if channels_last:
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_(True)
    w = torch.randn(4, 3, 3, 3, device=device)
    logits = torch.randn(2, 4, device=device, requires_grad=True)
    ids = torch.zeros(0, dtype=torch.int64, device=device)
    y = masked_conv2d(x, w, None, logits, ids, padding=1)
    assert y.shape == (0, 4, 6, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (0, 7), (3, 0), (3, 2, 0, 4)])
def test_gate_mse_empty(device, shape):
    """An empty batch (or empty samples) gives zeros forward and a gradient of masked's shape
    backward (backward used to fail reshaping a 0-element tensor to (0, -1))."""
    masked = torch.randn(shape, device=device, requires_grad=True)
    original = torch.randn(shape, device=device)
    counts = torch.ones(shape[0], dtype=torch.bool, device=device)
    ids = torch.zeros(shape[0], dtype=torch.int64, device=device)
    out = gate_mse(masked, original, counts, ids, 3)
    assert torch.equal(out, torch.zeros(3, device=device))
    out.sum().backward()
    assert masked.grad.shape == masked.shape
    assert torch.equal(masked.grad, torch.zeros_like(masked))


@pytest.mark.parametrize("device", DEVICES)
def test_normalized_step_empty(device):
    logits = [torch.randn(4, 3, device=device), torch.randn(4, 5, device=device)]
    before = [m.clone() for m in logits]
    grads = [torch.randn_like(m) for m in logits]
    normalized_gradient_step_(logits, grads, torch.zeros(0, dtype=torch.int64, device=device), 0.1)
    assert all(torch.equal(m, b) for m, b in zip(logits, before))
    empty = [torch.zeros(0, 3, device=device)]  # no tasks at all
    normalized_gradient_step_(empty, [torch.zeros(0, 3, device=device)],
                              torch.zeros(0, dtype=torch.int64, device=device), 0.1)


@pytest.mark.parametrize("device", DEVICES)
def test_mask_overlap_empty(device):
    a = torch.rand(0, 9, device=device) > 0.5
    b = torch.rand(4, 9, device=device) > 0.5
    assert mask_overlap(a, b, [4, 5]).shape == (0, 4)
    assert mask_overlap(b, a, [4, 5], per_layer=True).shape == (2, 4, 0)


# ---------------------------------------------------------------- fakes: shapes and strides

# The layouts the real ops see in practice, each keeping the shape: contiguous, channels_last,
# dense permutations that are neither (H and W swapped in memory, as x.transpose(2, 3) of a
# contiguous tensor; channels outermost), a slice (a non-dense view), a channels_last slice.
def _layout(t, name):
    cl = torch.channels_last
    return {
        "contiguous": lambda: t,
        "channels_last": lambda: t.to(memory_format=cl),
        "transposed": lambda: t.transpose(2, 3).contiguous().transpose(2, 3),
        "channels_outermost": lambda: t.transpose(0, 1).contiguous().transpose(0, 1),
        "sliced": lambda: torch.stack([t, t], dim=-1)[..., 0],
        "channels_last_sliced": lambda: torch.cat([t[:, :, :1], t], dim=2).to(memory_format=cl)[:, :, 1:],
    }[name]()


LAYOUTS = ["contiguous", "channels_last", "transposed", "channels_outermost", "sliced", "channels_last_sliced"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fakes_match_real_strides(device, layout):
    x0 = torch.randn(3, 4, 5, 6, device=device)
    x = _layout(x0, layout)
    assert x.shape == x0.shape and torch.equal(x, x0)
    logits = torch.randn(2, 4, device=device)
    ids = torch.tensor([0, 1, 1], device=device)
    ops = torch.ops.nad
    for name, op, args in [
        ("task_gate", ops.task_gate, (x, logits, ids)),
        ("task_gate_backward", ops.task_gate_backward, (torch.randn_like(x), x, logits, ids)),
        ("task_gate_backward(x_grad=False)", ops.task_gate_backward, (torch.randn_like(x), x, logits, ids, False)),
    ]:
        assert_fake_matches_real(op, *args, what=f"{name} on {layout}")

    w = torch.randn(4, 4, 3, 3, device=device)
    y, act = ops.masked_conv2d_forward(x, w, None, logits, ids, *_conv_args())
    grad_y = _layout(torch.randn(y.shape, device=device), layout)
    for name, op, args in [
        ("masked_conv2d", ops.masked_conv2d, (x, w, None, logits, ids, *_conv_args())),
        ("masked_conv2d_forward", ops.masked_conv2d_forward, (x, w, None, logits, ids, *_conv_args())),
        ("masked_conv2d_backward", ops.masked_conv2d_backward, (grad_y, x, w, act, logits, ids, *_conv_args(), True)),
        ("masked_conv2d_backward(x_grad=False)", ops.masked_conv2d_backward,
         (grad_y, x, w, act, logits, ids, *_conv_args(), False)),
    ]:
        assert_fake_matches_real(op, *args, what=f"{name} on {layout}")

    original = _layout(torch.randn_like(x0), layout)
    counts = torch.tensor([True, False, True], device=device)
    for name, op, args in [
        ("gate_mse", ops.gate_mse, (x, original, counts, ids, 2)),
        ("gate_mse_backward", ops.gate_mse_backward, (torch.ones(2, device=device), x, original, counts, ids, 2)),
        ("gate_mse_backward (mixed layouts)", ops.gate_mse_backward,
         (torch.ones(2, device=device), x, x0, counts, ids, 2)),
    ]:
        assert_fake_matches_real(op, *args, what=f"{name} on {layout}")

    a = x.flatten(1)[:, :20] > 0  # a non-contiguous bool view where the layout is not contiguous
    b = x0.flatten(1)[:2, :20] > 0
    assert_fake_matches_real(ops.mask_overlap, a, b, [8, 12], "iou", False, what=f"mask_overlap on {layout}")
    assert_fake_matches_real(ops.mask_overlap, a, b, [8, 12], "iomin", True, what=f"mask_overlap per_layer on {layout}")


def test_task_gate_layout_is_the_same_on_every_device():
    """The CPU op keeps channels_last like the CUDA one (it used to return contiguous output)."""
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last).requires_grad_(True)
    logits = torch.randn(2, 3, requires_grad=True)
    ids = torch.tensor([1, 0])
    y = task_gate(x, logits, ids)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    y.backward(torch.randn_like(y))
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, task_gate_reference(x.detach().contiguous(), logits, ids))


# ---------------------------------------------------------------- task ids outside [0, T)


def _ops_with_ids(device):
    """(name, call(ids)) for every op that reads task ids, through its Python wrapper."""
    x = torch.randn(3, 4, 5, 5, device=device)
    w = torch.randn(4, 4, 3, 3, device=device)
    logits = torch.randn(2, 4, device=device)
    counts = torch.ones(3, dtype=torch.bool, device=device)
    step_logits = [torch.randn(2, 4, device=device)]
    return [
        ("task_gate", lambda ids: task_gate(x, logits, ids)),
        ("masked_conv2d", lambda ids: masked_conv2d(x, w, None, logits, ids, padding=1)),
        ("gate_mse", lambda ids: gate_mse(x, x.flip(0), counts, ids, 2)),
        ("normalized_gradient_step_",
         lambda ids: normalized_gradient_step_(step_logits, [torch.ones_like(step_logits[0])], ids, 0.1)),
    ]


def _direct_calls(device):
    """(name, call(ids)) through the dispatcher, backward ops included: no Python check."""
    x = torch.randn(3, 4, 5, 5, device=device)
    w = torch.randn(4, 4, 3, 3, device=device)
    logits = torch.randn(2, 4, device=device)
    counts = torch.ones(3, dtype=torch.bool, device=device)
    ops = torch.ops.nad
    y, act = ops.masked_conv2d_forward(x, w, None, logits, torch.tensor([0, 1, 0], device=device), *_conv_args())
    return [
        ("task_gate", lambda ids: ops.task_gate(x, logits, ids)),
        ("task_gate_backward", lambda ids: ops.task_gate_backward(x, x, logits, ids)),
        ("masked_conv2d", lambda ids: ops.masked_conv2d(x, w, None, logits, ids, *_conv_args())),
        ("masked_conv2d_backward", lambda ids: ops.masked_conv2d_backward(y, x, w, act, logits, ids, *_conv_args(), True)),
        ("gate_mse", lambda ids: ops.gate_mse(x, x.flip(0), counts, ids, 2)),
        ("gate_mse_backward", lambda ids: ops.gate_mse_backward(torch.ones(2, device=device), x, x.flip(0), counts, ids, 2)),
        ("normalized_gradient_step_",
         lambda ids: ops.normalized_gradient_step_([logits.clone()], [torch.ones_like(logits)], ids, 0.1)),
    ]


@pytest.mark.parametrize("bad", [-1, -2, 2, 7])
def test_out_of_range_task_ids_are_refused_by_every_op(bad):
    """-T <= t < 0 too: CUDA's index ops would wrap such ids to row T + t; every op refuses them
    (in Python with a ValueError; on the CPU in C++ as well, with or without the Python check)."""
    ids = torch.tensor([0, bad, 1])
    for name, call in _ops_with_ids("cpu"):
        with pytest.raises(ValueError, match=r"must lie in \[0, 2\)"):
            call(ids)
        # The trainer's path: ids checked once by the caller, so the wrappers skip their check.
        with checks.ids_checked(), pytest.raises(RuntimeError, match=r"must lie in \[0, 2\)"):
            call(ids)
    for name, call in _direct_calls("cpu"):
        with pytest.raises(RuntimeError, match=rf"{name.replace('_backward', '')}.*must lie in \[0, 2\)"):
            call(ids)


class _DeviceIds(torch.Tensor):
    """Task ids on a mocked device: the tensor says it is on another device ("meta": its guard
    needs no driver), keeps its values in a CPU tensor, and records every read of its values by
    the host (``item()``/``int()``, a copy to the CPU, ``tolist()``): each is a device sync on a
    GPU."""

    @staticmethod
    def __new__(cls, values: torch.Tensor, reads: list):
        t = torch.Tensor._make_wrapper_subclass(cls, values.shape, dtype=values.dtype, device=torch.device("meta"))
        t.values, t.reads = values, reads
        return t

    def tolist(self):
        self.reads.append("tolist")
        return self.values.tolist()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reads = next(a.reads for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, _DeviceIds))
        plain_args, plain_kwargs = pytree.tree_map_only(_DeviceIds, lambda a: a.values, (args, kwargs))
        out = func(*plain_args, **plain_kwargs)
        aten = torch.ops.aten
        to_host = (func is aten._local_scalar_dense.default
                   or (func is aten._to_copy.default and plain_kwargs.get("device") == torch.device("cpu"))
                   or (func is aten.copy_.default and not isinstance(args[0], _DeviceIds)))
        if to_host:
            reads.append(func.__name__)
            return out
        return pytree.tree_map_only(torch.Tensor, lambda o: cls(o, reads), out)


@pytest.mark.parametrize("values, error", [([0, 1, 1, 0, 1], None), ([0, -1, 1, 2, 0], r"\[-1, 2\]")])
def test_id_check_reads_the_device_once(values, error):
    """The wrappers' id check outside ``ids_checked()`` costs one device sync per op call, not
    one for the min and another for the max; its message names the argument, the range and the
    values found."""
    reads = []
    ids = _DeviceIds(torch.tensor(values), reads)
    if error is None:
        checks.ids_in_range("task_ids", ids, 2, "one row of logits per task")
    else:
        with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 2\) \(one row of logits per task\); "
                                             r"got values in " + error):
            checks.ids_in_range("task_ids", ids, 2, "one row of logits per task")
    assert len(reads) == 1, reads
    with checks.ids_checked():
        checks.ids_in_range("task_ids", ids, 2, "one row of logits per task")
    assert len(reads) == 1, reads


# ---------------------------------------------------------------- sizes past the old CUDA limits


@pytest.mark.parametrize("device", DEVICES)
def test_gate_mse_batch_larger_than_65535(device):
    """CUDA used to refuse N > 65,535 (the batch sat on grid.y); the CPU accepted it."""
    n, tasks = 70_003, 5
    masked = torch.randn(n, 2, 3, device=device, requires_grad=True)
    original = torch.randn(n, 2, 3, device=device)
    counts = torch.rand(n, device=device) > 0.2
    ids = torch.randint(0, tasks, (n,), device=device)
    out = gate_mse(masked, original, counts, ids, tasks)
    ref_m = masked.detach().double().requires_grad_(True)
    ref = gate_mse_reference(ref_m, original.double(), counts, ids, tasks)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-7)
    grad = torch.randn(tasks, device=device)
    out.backward(grad)
    ref.backward(grad.double())
    torch.testing.assert_close(masked.grad.double(), ref_m.grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["task_gate", "masked_conv2d"])
def test_channels_last_batch_larger_than_65535(device, op):
    """CUDA's channels_last backward used to put the batch on grid.y (masked_conv2d refused
    N > 65,535); it loops over (sample, chunk) items now, like the CPU over samples."""
    n, tasks = 66_000, 3
    x = torch.randn(n, 2, 2, 3, device=device).to(memory_format=torch.channels_last)
    logits = torch.randn(tasks, 2, device=device)
    ids = torch.randint(0, tasks, (n,), device=device)
    w = torch.randn(2, 2, 1, 1, device=device)
    if op == "task_gate":
        fn, ref_fn = (lambda a, m: task_gate(a, m, ids)), (lambda a, m: task_gate_reference(a, m, ids))
    else:
        fn = lambda a, m: masked_conv2d(a, w, None, m, ids)  # noqa: E731
        ref_fn = lambda a, m: masked_conv2d_reference(a, w.double(), None, m, ids)  # noqa: E731
    xs, ls = x.detach().requires_grad_(True), logits.clone().requires_grad_(True)
    y = fn(xs, ls)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    rx, rl = x.double().requires_grad_(True), logits.double().requires_grad_(True)
    ref = ref_fn(rx, rl)
    ref.backward(grad_y.double())
    torch.testing.assert_close(y.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xs.grad.double(), rx.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ls.grad.double(), rl.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_mask_overlap_many_layers(device):
    """More gate points than one CUDA launch carries (kGroupLayers = 192): the same values,
    bit for bit, as the reference per layer, and the mean in the same order."""
    gen = torch.Generator().manual_seed(3)
    sizes = torch.randint(1, 70, (400,), generator=gen).tolist()
    a = (torch.rand(37, sum(sizes), generator=gen) > 0.5).to(device)
    b = (torch.rand(29, sum(sizes), generator=gen) > 0.3).to(device)
    per_layer = mask_overlap(a, b, sizes, "iou", per_layer=True)
    starts = [sum(sizes[:layer]) for layer in range(len(sizes) + 1)]
    for layer in (0, 1, 191, 192, 193, 383, 384, 399):  # around the groups' edges
        cols = slice(starts[layer], starts[layer + 1])
        ref = mask_overlap_reference(a[:, cols], b[:, cols], [sizes[layer]], "iou")
        torch.testing.assert_close(per_layer[layer].double(), ref, rtol=1e-6, atol=1e-7, msg=f"layer {layer}")
    mean = mask_overlap(a, b, sizes, "iou")
    expected = per_layer[0].clone()
    for layer in per_layer[1:]:
        expected += layer  # float32, in layer order, as the kernels sum
    assert torch.equal(mean, expected / len(sizes))
