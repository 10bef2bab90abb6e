"""Reproducibility of the ops' reductions (the logits gradients of task_gate and masked_conv2d,
gate_mse's per-task sums, the normalised step's norms).

The CPU kernels always sum in a fixed order: bit-identical results across runs and thread
counts. On CUDA the default sums use float atomics (fast, last bits vary from run to run);
under torch.use_deterministic_algorithms(True) they take a two-pass path (per-block partial
sums, then a fixed-order sum), which must be bit-identical across runs and equal the default
path within rounding. The [cuda] cases run in scripts/gpu_check.sh."""
import pytest
import torch

from conftest import DEVICES
from conftest import deterministic_algorithms as deterministic
from nad_ext.ops import gate_mse, masked_conv2d, normalized_gradient_step_, task_gate


# (N, C, H, W, channels_last): every backward kernel of the gate passes, with few tasks so that
# many blocks add into each (task, channel): the contiguous row kernels for S >= 256 (a block per
# row), S = 49 (a warp), S = 4 and S = 1 (groups of lanes), and the channels_last tiled kernel
# with several chunks of space and a partial tile of channels.
CASES = [
    (16, 6, 20, 20, False),
    (32, 40, 7, 7, False),
    (64, 24, 2, 2, False),
    (256, 48, 1, 1, False),
    (12, 40, 30, 30, True),
]


def _case(device, n, c, h, w, channels_last, dtype=torch.float32):
    gen = torch.Generator().manual_seed(n * 1000 + c)
    x = torch.randn(n, c, h, w, generator=gen, dtype=dtype).to(device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    logits = torch.randn(3, c, generator=gen).to(device)
    ids = torch.randint(0, 3, (n,), generator=gen).to(device)
    grad_y = torch.randn(x.shape, generator=gen, dtype=dtype).to(device)
    if channels_last:
        grad_y = grad_y.to(memory_format=torch.channels_last)
    return x, logits, ids, grad_y


def _gradients(device, case, op, dtype=torch.float32):
    x, logits, ids, grad_y = _case(device, *case, dtype=dtype)
    xs = x.detach().requires_grad_(True)
    ls = logits.clone().requires_grad_(True)
    if op == "task_gate":
        y = task_gate(xs, ls, ids)
    else:  # a 1x1 convolution keeps the map size, so grad_y fits
        w = torch.eye(x.shape[1], device=device, dtype=dtype)[:, :, None, None].contiguous()
        y = masked_conv2d(xs, w, None, ls, ids, relu=True)
    y.backward(grad_y)
    return xs.grad, ls.grad


def _mse(device, case, dtype=torch.float32):
    x, _, ids, grad_y = _case(device, *case, dtype=dtype)
    counts = torch.arange(x.shape[0], device=device) % 4 != 1
    return gate_mse(x, grad_y, counts, ids, 3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:4])) + ("_cl" if c[4] else ""))
@pytest.mark.parametrize("op", ["task_gate", "masked_conv2d"])
def test_gate_gradients_deterministic_mode(device, case, op):
    with deterministic(True):
        first = _gradients(device, case, op)
        second = _gradients(device, case, op)
    for a, b in zip(first, second):
        assert torch.equal(a, b), "deterministic mode gave different bits on two runs"
    with deterministic(False):
        default = _gradients(device, case, op)
    # grad_x is elementwise for task_gate (same bits); masked_conv2d's goes through the
    # convolution's backward, whose algorithm deterministic mode may change.
    tol = 0 if op == "task_gate" or device == "cpu" else 1e-3
    torch.testing.assert_close(first[0], default[0], rtol=tol, atol=tol)
    torch.testing.assert_close(first[1], default[1], rtol=1e-5, atol=1e-5)
    if device == "cpu":  # one fixed order on the CPU, flag or not
        assert torch.equal(first[1], default[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES[:2] + CASES[4:], ids=["rows", "small", "channels_last"])
def test_gate_mse_deterministic_mode(device, case):
    with deterministic(True):
        first, second = _mse(device, case), _mse(device, case)
    assert torch.equal(first, second)
    with deterministic(False):
        default = _mse(device, case)
    torch.testing.assert_close(first, default, rtol=1e-6, atol=1e-7)
    if device == "cpu":
        assert torch.equal(first, default)


@pytest.mark.parametrize("device", DEVICES)
def test_normalized_step_deterministic(device):
    def run():
        logits = [torch.linspace(-1, 1, 6 * c, device=device).reshape(6, c) for c in (3, 700, 4096)]
        grads = [torch.sin(torch.arange(m.numel(), device=device, dtype=torch.float32) * 0.37).reshape(m.shape) * 10
                 for m in logits]
        normalized_gradient_step_(logits, grads, torch.tensor([5, 0, 2, 0], device=device), 0.3)
        return logits

    with deterministic(True):
        first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_cpu_results_do_not_depend_on_the_thread_count():
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, max(2, threads)):
            torch.set_num_threads(count)
            results.append([
                *_gradients("cpu", CASES[0], "task_gate"),
                *_gradients("cpu", CASES[4], "masked_conv2d"),
                _mse("cpu", CASES[1]),
            ])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_deterministic_mode_at_resnet_size(dtype):
    """ResNet50 layer1 at N = 64 (C = 256, 56 x 56, channels_last, the fast path's layout),
    3 tasks: deterministic mode is bit-identical across runs and matches the CPU's fixed-order
    float64 sums within float32 rounding."""
    case = (64, 256, 56, 56, True)
    with deterministic(True):
        first = _gradients("cuda", case, "task_gate", dtype)
        second = _gradients("cuda", case, "task_gate", dtype)
        mse = [_mse("cuda", case, dtype) for _ in range(2)]
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert torch.equal(mse[0], mse[1])
    x, logits, ids, grad_y = _case("cpu", *case, dtype=dtype)
    sums = torch.zeros(3, 256, dtype=torch.float64).index_add_(
        0, ids, (grad_y.double() * x.double()).sum(dim=(2, 3)))
    gate = torch.sigmoid(logits.double())
    torch.testing.assert_close(first[1].double().cpu(), sums * gate * (1 - gate), rtol=1e-4, atol=1e-4)
