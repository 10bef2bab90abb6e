import os
import subprocess
import sys

import pytest
import torch

from conftest import DEVICES
from nad_ext.ops import mask_overlap, mask_overlap_reference

METRICS = ["iou", "iomin", "intersection"]
ODD_SIZES = [1, 63, 64, 65, 130, 1, 7]


def _masks(rows, layer_sizes, device="cpu", generator=None):
    """Random masks with a random density per row, plus an all-empty and an all-full row."""
    k = sum(layer_sizes)
    density = torch.rand(rows, 1, generator=generator)
    m = torch.rand(rows, k, generator=generator) < density
    if rows >= 3:
        m[0] = False
        m[1] = True
    return m.to(device)


def _check(a, b, sizes, metric, per_layer):
    out = mask_overlap(a, b, sizes, metric, per_layer)
    ref = mask_overlap_reference(a.cpu(), b.cpu(), sizes, metric, per_layer)
    assert out.dtype == torch.float32 and out.device == a.device
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize(
    "sizes, ta, tb",
    [(ODD_SIZES, 9, 5), ([64, 64, 128], 4, 11), ([1], 3, 3), ([200, 3], 1, 6), ([5, 70], 7, 1)],
)
def test_matches_reference(device, metric, per_layer, sizes, ta, tb):
    _check(_masks(ta, sizes, device), _masks(tb, sizes, device), sizes, metric, per_layer)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", METRICS)
def test_large_crosses_tiles(device, metric):
    # More rows than one tile on both sides, with partial tiles at the edges (CPU 64 x 256,
    # CUDA 64 x 64), and a layer of more than 31 words.
    sizes = [3, 64, 2100, 65]
    a, b = _masks(150, sizes, device), _masks(600, sizes, device)
    _check(a, b, sizes, metric, per_layer=False)
    _check(a[:70], b[:300], sizes, metric, per_layer=True)


@pytest.mark.parametrize("device", DEVICES)
def test_random_shapes(device):
    # Shapes around the CPU kernel's blocks (4 rows of a x 8 rows of b, tiles of 128 x 128,
    # byte counters reduced every 31 words): row counts that are and are not multiples of the
    # block, single rows, many small layers, and layers of 32, 62 (two full passes) and 63 words.
    g = torch.Generator().manual_seed(7)
    shapes = [(1, 1), (1, 13), (13, 1), (3, 7), (4, 8), (5, 9), (8, 4), (31, 33), (129, 17)]
    for case, (ta, tb) in enumerate(shapes):
        n_layers = int(torch.randint(1, 40, (1,), generator=g))
        sizes = torch.randint(1, 200, (n_layers,), generator=g).tolist()
        if case % 3 == 0:
            sizes.insert(n_layers // 2, [1985, 3968, 4000][case // 3])
        a = _masks(ta, sizes, device, generator=g)
        b = _masks(tb, sizes, device, generator=g)
        for metric in METRICS:
            for per_layer in (False, True):
                _check(a, b, sizes, metric, per_layer)


def test_thread_count_does_not_change_results():
    # The CPU kernel cuts the output into more, smaller tiles when there are more threads.
    sizes = [3, 64, 2100, 65]
    a, b = _masks(37, sizes), _masks(150, sizes)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = {(m, p): mask_overlap(a, b, sizes, m, p) for m in METRICS for p in (False, True)}
    finally:
        torch.set_num_threads(threads)
    for (metric, per_layer), expected in one.items():
        assert torch.equal(mask_overlap(a, b, sizes, metric, per_layer), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_over_zero_is_one(device):
    sizes = [3, 2]
    a = torch.tensor([[0, 0, 0, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.bool, device=device)
    b = torch.tensor([[0, 0, 0, 0, 0], [1, 1, 0, 0, 1]], dtype=torch.bool, device=device)
    iou = mask_overlap(a, b, sizes, "iou", per_layer=True).cpu()
    iomin = mask_overlap(a, b, sizes, "iomin", per_layer=True).cpu()
    # layer 0: a rows are empty; b[0] empty (0/0 -> 1), b[1] has 2 channels (iou 0, iomin 0/0 -> 1)
    assert iou[0].tolist() == [[1.0, 0.0], [1.0, 0.0]]
    assert iomin[0].tolist() == [[1.0, 1.0], [1.0, 1.0]]
    # layer 1: a[0] = {0}, a[1] = {}; b[0] = {}, b[1] = {1}
    assert iou[1].tolist() == [[0.0, 0.0], [1.0, 0.0]]
    assert iomin[1].tolist() == [[1.0, 0.0], [1.0, 1.0]]
    torch.testing.assert_close(mask_overlap(a, b, sizes, "iou").cpu(), iou.mean(0))


@pytest.mark.parametrize("device", DEVICES)
def test_self_similarity_and_empty_batches(device):
    sizes = [10, 70]
    a = _masks(6, sizes, device)
    assert torch.all(mask_overlap(a, a, sizes).diagonal() == 1)
    assert mask_overlap(a[:0], a, sizes).shape == (0, 6)
    assert mask_overlap(a, a[:0], sizes, per_layer=True).shape == (2, 6, 0)


def test_non_contiguous_inputs():
    sizes = [5, 66]
    a, b = _masks(8, sizes), _masks(12, sizes)
    at = a.T.contiguous().T  # same values, column-major
    expected = mask_overlap(a, b[::2].clone(), sizes)
    torch.testing.assert_close(mask_overlap(at, b[::2], sizes), expected)


def test_portable_popcount_fallback(tmp_path):
    """The portable (no POPCNT) path, forced by the environment, gives identical results."""
    code = (
        "import torch\n"
        "from nad_ext.ops import mask_overlap\n"
        "torch.manual_seed(1)\n"
        "sizes = [1, 63, 64, 65, 130, 2100]\n"
        "a = torch.rand(70, sum(sizes)) < torch.rand(70, 1)\n"
        "b = torch.rand(300, sum(sizes)) < torch.rand(300, 1)\n"
        "metrics = ('iou', 'iomin', 'intersection')\n"
        "out = {(m, p): mask_overlap(a, b, sizes, m, p) for m in metrics for p in (False, True)}\n"
        "torch.save(out, __import__('sys').argv[1])\n"
    )
    results, tmp_dir = [], str(tmp_path)
    for force in ("1", "0"):
        path = os.path.join(tmp_dir, f"overlap_{force}.pt")
        env = dict(os.environ, NAD_EXT_PORTABLE_POPCOUNT=force)
        subprocess.run([sys.executable, "-c", code, path], env=env, check=True)
        results.append(torch.load(path))
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key


def _good():
    sizes = [3, 4]
    return _masks(4, sizes), _masks(5, sizes), sizes


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda a, b, s: (a.float(), b, s, "iou"), ValueError, "a must have dtype bool"),
        (lambda a, b, s: (a, b.to(torch.uint8), s, "iou"), ValueError, "b must have dtype bool"),
        (lambda a, b, s: (a[0], b, s, "iou"), ValueError, "a must have 2 dimension"),
        (lambda a, b, s: (a, b[None], s, "iou"), ValueError, "b must have 2 dimension"),
        (lambda a, b, s: (a, b, [3, 5], "iou"), ValueError, r"a must have K = sum\(layer_sizes\) = 8"),
        (lambda a, b, s: (a, b[:, :6], s, "iou"), ValueError, r"b must have K = sum\(layer_sizes\) = 7"),
        (lambda a, b, s: (a, b, [7, 0], "iou"), ValueError, "layer_sizes must be positive; got 0 at index 1"),
        (lambda a, b, s: (a, b, [8, -1], "iou"), ValueError, "layer_sizes must be positive; got -1"),
        (lambda a, b, s: (a, b, [], "iou"), ValueError, "layer_sizes must name at least one layer"),
        (lambda a, b, s: (a, b, [3.0, 4], "iou"), TypeError, "layer_sizes must hold ints"),
        (lambda a, b, s: (a, b, s, "jaccard"), ValueError, "metric must be one of 'iou', 'iomin', 'intersection'"),
        (lambda a, b, s: (a, b.to("meta"), s, "iou"), ValueError, "must be on one device"),
    ],
)
def test_bad_input_is_named(change, error, message):
    with pytest.raises(error, match=message):
        mask_overlap(*change(*_good()))


@pytest.mark.parametrize(
    "args, message",
    [
        (lambda a, b, s: (a.float(), b, s, "iou"), "a must be bool"),
        (lambda a, b, s: (a, b[0], s, "iou"), r"b must have shape \(Tb, K\)"),
        (lambda a, b, s: (a, b, [3, 5], "iou"), r"K = sum\(layer_sizes\) = 8"),
        (lambda a, b, s: (a, b, [7, 0], "iou"), "layer_sizes must be positive"),
        (lambda a, b, s: (a, b, [], "iou"), "layer_sizes must name at least one layer"),
        (lambda a, b, s: (a, b, s, "dice"), 'metric must be one of "iou", "iomin", "intersection"'),
        # a CPU and a meta tensor dispatch to the fake (Meta) kernel, which checks this too
        (lambda a, b, s: (a, b.to("meta"), s, "iou"), "a and b must be on one device"),
    ],
)
def test_cpp_checks_protect_direct_dispatcher_calls(args, message):
    a, b, s, metric = args(*_good())
    with pytest.raises(RuntimeError, match=message):
        torch.ops.nad.mask_overlap(a, b, s, metric, False)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a, b = torch.empty(7, 12, dtype=torch.bool), torch.empty(3, 12, dtype=torch.bool)
        mean = torch.ops.nad.mask_overlap(a, b, [5, 7], "iou", False)
        layers = torch.ops.nad.mask_overlap(a, b, [5, 7], "iomin", True)
    assert mean.shape == (7, 3) and mean.dtype == torch.float32
    assert layers.shape == (2, 7, 3) and layers.dtype == torch.float32
