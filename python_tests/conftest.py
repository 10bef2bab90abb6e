import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from nad_ext.gates.fused import ieee_float32

CUDA = torch.cuda.is_available()

# Devices the operator tests run on: CUDA ones are skipped, visibly, where there is no GPU.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")),
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_tf32():
    """Every test computes float32 in IEEE float32: cuDNN would otherwise run float32
    convolutions in TF32 (its default on Ampere and later GPUs; relative rounding ~5e-4 per
    product, ~1e-3 through a network), and the CUDA tests that compare float32 with a float64
    reference or with the eager path use float32 tolerances. A test that wants TF32 turns it on
    itself (test_fused.py does, to show that the BatchNorm fold's check does not depend on it);
    the settings are restored after each test."""
    with ieee_float32():
        yield


@contextlib.contextmanager
def deterministic_algorithms(mode: bool):
    """torch.use_deterministic_algorithms(mode) inside the block, the previous setting after it."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(mode)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def assert_same_sums(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    """Two results of the ops' reductions (sums over samples and space) from the same inputs:
    bit-identical where the order of the additions is fixed (the CPU; CUDA under
    torch.use_deterministic_algorithms(True)); on CUDA's default path, whose float atomics add in
    an order that varies from run to run, equal within float32 rounding of such sums."""
    if a.device.type == "cpu" or torch.are_deterministic_algorithms_enabled():
        assert torch.equal(a, b), f"{what}: not bit-identical"
    else:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=what)


def assert_fake_matches_real(op, *args, what: str) -> None:
    """Runs ``op`` on the real tensors and on fakes of them (same strides) and asserts that
    every output has the real one's shape, dtype and strides (torch.compile traces the fake's)."""
    real = op(*args)
    mode = FakeTensorMode()
    fakes = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    with mode:
        fake = op(*fakes)
    reals = real if isinstance(real, (tuple, list)) else (real,)
    fakes = fake if isinstance(fake, (tuple, list)) else (fake,)
    assert len(reals) == len(fakes), what
    for i, (r, f) in enumerate(zip(reals, fakes)):
        assert r.shape == f.shape, f"{what}[{i}]: shape {tuple(r.shape)} real, {tuple(f.shape)} fake"
        assert r.dtype == f.dtype, f"{what}[{i}]: dtype {r.dtype} real, {f.dtype} fake"
        assert r.stride() == f.stride(), f"{what}[{i}]: strides {r.stride()} real, {f.stride()} fake"
