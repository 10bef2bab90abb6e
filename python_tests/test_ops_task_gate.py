import pytest
import torch

from conftest import DEVICES, assert_same_sums, deterministic_algorithms
from nad_ext.ops import task_gate, task_gate_reference


def _inputs(device, dtype=torch.float64, shape=(6, 5, 4, 3), tasks=3):
    x = torch.randn(shape, device=device, dtype=dtype)
    logits_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    logits = torch.randn(tasks, shape[1], device=device, dtype=logits_dtype)
    ids = torch.randint(0, tasks, (shape[0],), device=device)
    return x, logits, ids


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(6, 5, 4, 3), (7, 3), (2, 4, 9), (3, 2, 1, 1)])
def test_forward_matches_reference(device, shape):
    x, logits, ids = _inputs(device, shape=shape)
    torch.testing.assert_close(task_gate(x, logits, ids), task_gate_reference(x, logits, ids))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    x, logits, ids = _inputs(device)
    x.requires_grad_(True)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, m: task_gate(a, m, ids), (x, logits))


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_match_reference(device):
    x, logits, ids = _inputs(device, dtype=torch.float32, shape=(16, 8, 5, 5), tasks=4)
    grad_y = torch.randn_like(x)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    ls = [logits.clone().requires_grad_(True) for _ in range(2)]
    task_gate(xs[0], ls[0], ids).backward(grad_y)
    task_gate_reference(xs[1], ls[1], ids).backward(grad_y)
    torch.testing.assert_close(xs[0].grad, xs[1].grad)
    torch.testing.assert_close(ls[0].grad, ls[1].grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_tasks_without_samples_get_zero_gradient(device):
    x, logits, _ = _inputs(device, tasks=4)
    ids = torch.zeros(x.shape[0], dtype=torch.int64, device=device)
    logits.requires_grad_(True)
    task_gate(x, logits, ids).sum().backward()
    assert torch.all(logits.grad[1:] == 0)
    assert torch.any(logits.grad[0] != 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_forward_and_backward(device, dtype):
    x, logits, ids = _inputs(device, dtype=dtype, shape=(8, 6, 7, 7))
    logits.requires_grad_(True)
    y = task_gate(x, logits, ids)
    assert y.dtype == dtype
    ref = task_gate_reference(x.double(), logits.double(), ids)
    tol = {torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float32: 1e-6}[dtype]
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)
    y.float().sum().backward()
    assert logits.grad.dtype == torch.float32
    ref_logits = logits.detach().double().requires_grad_(True)
    task_gate_reference(x.double(), ref_logits, ids).sum().backward()
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_and_non_contiguous(device):
    x, logits, ids = _inputs(device, dtype=torch.float32, shape=(4, 6, 5, 5))
    xc = x.to(memory_format=torch.channels_last).requires_grad_(True)
    logits.requires_grad_(True)
    y = task_gate(xc, logits, ids)
    torch.testing.assert_close(y, task_gate_reference(x, logits, ids))
    y.backward(torch.ones_like(y))
    ref_x = x.clone().requires_grad_(True)
    ref_l = logits.detach().clone().requires_grad_(True)
    task_gate_reference(ref_x, ref_l, ids).backward(torch.ones_like(x))
    torch.testing.assert_close(xc.grad, ref_x.grad)
    torch.testing.assert_close(logits.grad, ref_l.grad, rtol=1e-4, atol=1e-5)
    xt = x.transpose(2, 3)  # neither contiguous nor channels_last
    torch.testing.assert_close(task_gate(xt, logits, ids), task_gate_reference(xt, logits, ids))


def test_infinite_logits_give_binary_gates():
    x, _, ids = _inputs("cpu", dtype=torch.float32)
    logits = torch.where(torch.rand(3, 5) > 0.5, float("inf"), float("-inf"))
    y = task_gate(x, logits, ids)
    expected = x * (logits[ids] > 0).float()[:, :, None, None]
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x, l, i: (x[0, 0, 0], l, i), "x must have at least 2"),
        (lambda x, l, i: (x, l[:, :3], i), "logits must have shape"),
        (lambda x, l, i: (x, l[0], i), "logits must have 2"),
        (lambda x, l, i: (x, l, i + 5), r"task_ids must lie in \[0, 3\)"),
        (lambda x, l, i: (x, l, -i - 1), r"task_ids must lie in \[0, 3\)"),
        (lambda x, l, i: (x, l, i[:2]), "task_ids must have shape"),
        (lambda x, l, i: (x, l, i.int()), "task_ids must have dtype int64"),
        (lambda x, l, i: (x.int(), l, i), "x must have dtype"),
        (lambda x, l, i: (x, l.half(), i), "logits must have dtype"),
        (lambda x, l, i: (x.float(), l, i), "logits may be float64 only"),
        (lambda x, l, i: (x, l.to("meta"), i), "must be on one device"),
    ],
)
def test_bad_input_is_named(change, message):
    x, logits, ids = _inputs("cpu")
    with pytest.raises(ValueError, match=message):
        task_gate(*change(x, logits, ids))


def test_cpp_checks_protect_direct_dispatcher_calls():
    x, logits, ids = _inputs("cpu")
    with pytest.raises(RuntimeError, match="task_ids must lie in"):
        torch.ops.nad.task_gate(x, logits, ids + 10)
    with pytest.raises(RuntimeError, match="channels"):
        torch.ops.nad.task_gate(x, logits[:, :2], ids)


def test_torch_compile_traces_the_op():
    class Gated(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.logits = torch.nn.Parameter(torch.randn(2, 4))

        def forward(self, x, ids):
            return task_gate(torch.relu(self.conv(x)), self.logits, ids).sum(dim=(1, 2, 3))

    model = Gated()
    x = torch.randn(4, 3, 8, 8)
    ids = torch.tensor([0, 1, 1, 0])
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x, ids)
    torch.testing.assert_close(out, model(x, ids))
    out.sum().backward()
    grad = model.logits.grad.clone()
    model.logits.grad = None
    model(x, ids).sum().backward()
    torch.testing.assert_close(grad, model.logits.grad)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4, 3, 5, 5)
        y = torch.ops.nad.task_gate(x, torch.empty(2, 3), torch.zeros(4, dtype=torch.int64))
        gx, gl = torch.ops.nad.task_gate_backward(y, x, torch.empty(2, 3), torch.zeros(4, dtype=torch.int64))
    assert y.shape == (4, 3, 5, 5) and gx.shape == x.shape and gl.shape == (2, 3)


class _RecordBackward:
    """Records each nad::task_gate_backward call (a dispatch mode): its x_grad flag and whether
    deterministic algorithms were on when it ran."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        calls = self.calls = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func is torch.ops.nad.task_gate_backward.default:
                    calls.append((args[4] if len(args) > 4 else kwargs.get("x_grad", True),
                                  torch.are_deterministic_algorithms_enabled()))
                return func(*args, **kwargs)

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "default"])
def test_grad_x_is_not_computed_when_x_needs_none(device, deterministic):
    """The first gate point's input needs no gradient: backward computes the logits gradient
    only (masked_conv2d's x_grad flag, through autograd). The logits gradients of the calls are
    sums over samples and space: bit-identical on the CPU and under deterministic algorithms; on
    CUDA's default path (float atomics) within float32 rounding (conftest.assert_same_sums)."""
    x, logits, ids = _inputs(device, dtype=torch.float32, shape=(6, 5, 9, 9))
    grad_y = torch.randn_like(x)
    with deterministic_algorithms(deterministic):
        gx, gl = torch.ops.nad.task_gate_backward(grad_y, x, logits, ids, False)
        assert gx.numel() == 0
        full_gx, full_gl = torch.ops.nad.task_gate_backward(grad_y, x, logits, ids)
        assert_same_sums(gl, full_gl, "logits gradient with and without grad_x")
        assert full_gx.shape == x.shape
        for needs_x in (False, True):
            xs = x.clone().requires_grad_(needs_x)
            ls = logits.clone().requires_grad_(True)
            y = task_gate(xs, ls, ids)
            with _RecordBackward() as record:
                y.backward(grad_y)
            assert record.calls == [(needs_x, deterministic)]
            assert_same_sums(ls.grad, full_gl, f"logits gradient through autograd, needs_x={needs_x}")
            assert (xs.grad is not None) == needs_x
