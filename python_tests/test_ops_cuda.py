"""CUDA-only checks of the kernels (skipped, visibly, without a GPU; scripts/gpu_check.sh runs
them with `-k cuda`): the backward kernel of every layout and map size at the sizes of real
networks, launches past the limits the kernels used to have, mask_overlap under CUDA-graph
capture, and task ids asserted on the device. Sizes fit an 80 GB GPU; the largest case is
skipped where memory is short. The float32 cases' tolerances against float64 references are
float32's: conftest turns TF32 off for every test (the convolutions here would otherwise run in
TF32, ~5e-4 relative)."""
import os
import subprocess
import sys

import pytest
import torch

from nad_ext.ops import (
    gate_mse,
    gate_mse_reference,
    mask_overlap,
    masked_conv2d,
    masked_conv2d_reference,
    normalized_gradient_step_,
    task_gate,
    task_gate_reference,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def _free_gib():
    return torch.cuda.mem_get_info()[0] / 2**30


def _gate_case(n, c, h, w, channels_last, dtype, tasks=16, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, c, h, w, device="cuda", dtype=dtype, generator=gen)
    grad_y = torch.randn(n, c, h, w, device="cuda", dtype=dtype, generator=gen)
    if channels_last:
        x, grad_y = x.to(memory_format=torch.channels_last), grad_y.to(memory_format=torch.channels_last)
    logits = torch.randn(tasks, c, device="cuda", generator=gen)
    ids = torch.randint(0, tasks, (n,), device="cuda", generator=gen)
    return x, logits, ids, grad_y


def _logits_grad_reference(x, logits, ids, grad_y):
    """float64 sums over each task's samples and space, without float64 copies of x."""
    per_sample = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64, device=x.device)
    for i in range(0, x.shape[0], 16):
        per_sample[i:i + 16] = (grad_y[i:i + 16].double() * x[i:i + 16].double()).flatten(2).sum(-1)
    sums = torch.zeros(logits.shape, dtype=torch.float64, device=x.device).index_add_(0, ids, per_sample)
    gate = torch.sigmoid(logits.double())
    return sums * gate * (1 - gate)


# (N, C, H, W, channels_last): ResNet50's layer1 on the fast path (bf16, channels_last), the
# same map contiguous (a block per row), VGG16's last maps (14 x 14: a warp per row), 7 x 7 and
# 2 x 2 maps, and a fully connected gate point (S = 1: 32 rows per warp).
GATE_SIZES = [
    (64, 256, 56, 56, True),
    (64, 256, 56, 56, False),
    (64, 512, 14, 14, False),
    (64, 2048, 7, 7, True),
    (64, 2048, 7, 7, False),
    (64, 512, 2, 2, False),
    (256, 4096, 1, 1, False),
]


@pytest.mark.parametrize("size", GATE_SIZES, ids=lambda s: "x".join(map(str, s[:4])) + ("_cl" if s[4] else ""))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("x_grad", [True, False])
def test_cuda_task_gate_backward_kernels(size, dtype, x_grad):
    x, logits, ids, grad_y = _gate_case(*size, dtype)
    xs = x.detach().requires_grad_(x_grad)
    ls = logits.clone().requires_grad_(True)
    y = task_gate(xs, ls, ids)
    assert y.is_contiguous(memory_format=torch.channels_last if size[4] else torch.contiguous_format)
    y.backward(grad_y)
    assert _rel_err(ls.grad, _logits_grad_reference(x, logits, ids, grad_y)) < 1e-4
    if x_grad:
        expected = (grad_y.float() * torch.sigmoid(logits)[ids][:, :, None, None]).to(dtype)
        torch.testing.assert_close(xs.grad, expected)
    else:
        assert xs.grad is None


@pytest.mark.parametrize("size", [GATE_SIZES[0], GATE_SIZES[3], GATE_SIZES[5], (256, 64, 1, 1, False)],
                         ids=["56x56_cl", "7x7_cl", "2x2", "1x1"])
@pytest.mark.parametrize("x_grad", [True, False])
def test_cuda_masked_conv2d_backward_kernels(size, x_grad):
    n, c, h, w, channels_last = size
    x, logits, ids, _ = _gate_case(n, 16, h, w, channels_last, torch.bfloat16)
    weight = torch.randn(c, 16, 3, 3, device="cuda", dtype=torch.bfloat16) / 12
    xs = x.detach().requires_grad_(x_grad)
    ls = torch.randn(16, c, device="cuda").requires_grad_(True)
    y = masked_conv2d(xs, weight, None, ls, ids, padding=1)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    rx = x.double().requires_grad_(x_grad)
    rl = ls.detach().double().requires_grad_(True)
    masked_conv2d_reference(rx, weight.double(), None, rl, ids, padding=1).backward(grad_y.double())
    assert _rel_err(ls.grad, rl.grad) < 2e-2
    if x_grad:
        assert _rel_err(xs.grad, rx.grad) < 2e-2


def test_cuda_channels_last_past_the_old_grid_limits():
    """task_gate: N * C = 143 M (n, c) pairs, past the 65,535 x 8 x 256 threads the
    channels_last kernel used to launch (rows beyond them were skipped, grad_x left
    uninitialised), and N = 70,000 samples, past grid.y. masked_conv2d: a map of 17.6 M positions,
    past grid.z = 65,535 chunks of 256."""
    n, c, tasks = 70_000, 2048, 5
    if _free_gib() < 12:
        pytest.skip("needs 12 GiB of free GPU memory")
    x = torch.ones(n, c, 1, 2, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    ids = torch.arange(n, device="cuda") % tasks
    logits = torch.randn(tasks, c, device="cuda", requires_grad=True)
    xs = x.requires_grad_(True)
    y = task_gate(xs, logits, ids)
    y.backward(torch.ones_like(y))
    gate = torch.sigmoid(logits.detach())
    counts = torch.bincount(ids, minlength=tasks).double()[:, None]
    torch.testing.assert_close(logits.grad.double(), 2 * counts * gate.double() * (1 - gate.double()),
                               rtol=1e-5, atol=1e-5)
    expected = gate.to(torch.bfloat16)[ids]  # every element written, the last rows included
    assert torch.equal(xs.grad[:, :, 0, 0], expected) and torch.equal(xs.grad[:, :, 0, 1], expected)
    del x, xs, y, expected

    hw = 4200  # 17.6 M positions: 68,907 chunks
    # Multiples of 1/4 and an identity convolution: exact whatever the convolution algorithm.
    x = (torch.randint(-8, 9, (1, 2, hw, hw), device="cuda") / 4).to(memory_format=torch.channels_last)
    weight = torch.eye(2, device="cuda")[:, :, None, None].contiguous()
    ls = torch.randn(1, 2, device="cuda", requires_grad=True)
    one = torch.zeros(1, dtype=torch.int64, device="cuda")
    y = masked_conv2d(x, weight, None, ls, one)
    y.backward(torch.ones_like(y))
    act = torch.relu(x).double().sum(dim=(0, 2, 3))
    g = torch.sigmoid(ls.detach().double())[0]
    # float32 sums of about 9 M over 68,907 items: rounding of the order of 1e-5.
    torch.testing.assert_close(ls.grad[0].double(), act * g * (1 - g), rtol=1e-3, atol=1e-3)


def test_cuda_rows_past_two_to_the_32():
    """2^32 + 2^20 (n, c) rows of one element (a fully connected gate point): the row index
    used to be cast to unsigned for the grid."""
    n, c = 2**22 + 2**10, 1024
    if _free_gib() < 48:
        pytest.skip("needs 48 GiB of free GPU memory")
    x = torch.ones(n, c, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    ids = torch.arange(n, device="cuda") % 3
    logits = torch.zeros(3, c, device="cuda", requires_grad=True)  # gate 0.5 everywhere
    y = task_gate(x, logits, ids)
    y.backward(torch.ones_like(y))
    assert torch.all(x.grad == 0.5)
    counts = torch.bincount(ids, minlength=3).float()[:, None].expand(3, c)
    torch.testing.assert_close(logits.grad, counts * 0.25, rtol=1e-6, atol=0)


def test_cuda_gate_mse_at_resnet_size():
    x, _, ids, original = _gate_case(64, 256, 56, 56, True, torch.bfloat16)
    counts = torch.rand(64, device="cuda") > 0.25
    masked = x.detach().requires_grad_(True)
    out = gate_mse(masked, original, counts, ids, 16)
    ref = gate_mse_reference(x.double(), original.double(), counts, ids, 16)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert masked.grad.is_contiguous(memory_format=torch.channels_last)


def test_cuda_mask_overlap_in_a_cuda_graph():
    """The layer offsets travel as kernel arguments: no host-to-device copy, so the op can be
    captured and replayed (VGG16's 13 gate points; and 400, which takes three groups)."""
    for sizes in ([64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512],
                  torch.randint(1, 70, (400,), generator=torch.Generator().manual_seed(0)).tolist()):
        a = torch.rand(300, sum(sizes), device="cuda") > 0.5
        b = torch.rand(200, sum(sizes), device="cuda") > 0.5
        eager = mask_overlap(a, b, sizes, "iou")
        eager_layers = mask_overlap(a, b, sizes, "iomin", per_layer=True)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            mask_overlap(a, b, sizes, "iou")  # warm-up outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = mask_overlap(a, b, sizes, "iou")
            out_layers = mask_overlap(a, b, sizes, "iomin", per_layer=True)
        graph.replay()
        assert torch.equal(out, eager) and torch.equal(out_layers, eager_layers)
        a.copy_(torch.rand_like(a, dtype=torch.float32) > 0.3)  # new inputs, same graph
        graph.replay()
        assert torch.equal(out, mask_overlap(a, b, sizes, "iou"))
        assert torch.equal(out.cpu(), mask_overlap(a.cpu(), b.cpu(), sizes, "iou"))


def test_cuda_normalized_step_matches_the_cpu():
    """The squared norms are summed in double on both backends."""
    gen = torch.Generator().manual_seed(1)
    logits = [torch.randn(8, c, generator=gen) for c in (1, 64, 4096, 25088)]
    grads = [torch.randn(m.shape, generator=gen) * torch.logspace(-6, 6, m.shape[1]) for m in logits]
    tasks = torch.tensor([0, 3, 7, 3])
    on_cuda = [m.cuda() for m in logits]
    normalized_gradient_step_(logits, grads, tasks, 0.25)
    normalized_gradient_step_(on_cuda, [g.cuda() for g in grads], tasks.cuda(), 0.25)
    for m, c in zip(logits, on_cuda):
        torch.testing.assert_close(c.cpu(), m, rtol=1e-6, atol=1e-7)


_NEGATIVE_ID = """
import torch, nad_ext.ops as ops
from nad_ext.ops import checks
logits = [torch.zeros(4, 3, device="cuda")]
with checks.ids_checked():  # the trainer's path: no Python check
    ops.normalized_gradient_step_(logits, [torch.ones(4, 3, device="cuda")],
                                  torch.tensor([{task}], device="cuda"), 1.0)
torch.cuda.synchronize()
print("updated rows:", (logits[0] != 0).any(1).nonzero().flatten().tolist())
"""


@pytest.mark.parametrize("task", [-1, 4])
def test_cuda_normalized_step_asserts_task_ids_on_the_device(task):
    """tasks = -1 used to update row T - 1 on CUDA (index_fill_ wraps negative indices) while
    the CPU raised. A device-side assert ends the CUDA context, hence the subprocess."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _NEGATIVE_ID.format(task=task)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, f"no error; stdout: {proc.stdout}"
    assert "assert" in (proc.stderr + proc.stdout).lower(), proc.stderr[-2000:]


def test_cuda_large_batch_gate_and_overlap_match_the_cpu():
    """The CUDA ops against the CPU ones on one input past the old grid.y limit."""
    n = 70_001
    x = torch.randn(n, 3, 2, 2)
    logits = torch.randn(4, 3)
    ids = torch.randint(0, 4, (n,))
    cpu = task_gate(x, logits, ids)
    gpu = task_gate(x.cuda(), logits.cuda(), ids.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gpu.cpu(), task_gate_reference(x, logits, ids), rtol=1e-6, atol=1e-6)
