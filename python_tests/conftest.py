import pytest
import torch

CUDA = torch.cuda.is_available()

# Devices the operator tests run on: CUDA ones are skipped, visibly, where there is no GPU.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")),
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
