import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

CUDA = torch.cuda.is_available()

# Devices the operator tests run on: CUDA ones are skipped, visibly, where there is no GPU.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")),
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


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
