"""nad_ext.gates.export: torch.export programs of gated models, and their AOTInductor packages
(.pt2) for C++ (cpp_tests/ runs one with AOTIModelPackageLoader)."""
import time

import pytest
import torch
from torch import nn

from nad_ext.gates import GatedModel
from nad_ext.gates.export import export_gated, export_program, export_task, package

CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _no_tf32():
    """Replaces conftest's IEEE-float32 block here: torch.export reads cuDNN's legacy TF32 flag,
    which PyTorch refuses to read while conv and RNN precisions differ (that block sets conv's
    only). The CPU tests do not depend on TF32; the CUDA one compares at TF32 tolerances."""
    yield


def gated_cnn(device="cpu"):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5),
    ).to(device)
    return GatedModel(net, ["1", "3"], num_tasks=3, example_input=torch.randn(1, 3, 8, 8, device=device))


def gate_calls(program) -> int:
    return sum(node.target is torch.ops.nad.task_gate.default for node in program.graph.nodes)


def test_export_program_matches_eager_for_any_batch_and_tasks():
    gated = gated_cnn()
    program = export_program(gated, torch.randn(2, 3, 8, 8))
    assert gate_calls(program) == 2  # the gates stay native calls, one per gate point
    x, task_ids = torch.randn(5, 3, 8, 8), torch.tensor([0, 2, 1, 1, 0])
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x, task_ids), gated(x, task_ids)[0])
        torch.testing.assert_close(program.module()(x[:1], task_ids[:1]), gated(x[:1], task_ids[:1])[0])


def test_export_task_program_is_that_tasks_binary_sub_architecture():
    gated = gated_cnn()
    program = export_program(gated, torch.randn(2, 3, 8, 8), task=2)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), gated(x, torch.full((4,), 2), binary=True)[0])


def test_export_task_refuses_a_task_the_model_does_not_have(tmp_path):
    with pytest.raises(ValueError, match=r"task must lie in \[0, 3\), got 3"):
        export_task(gated_cnn(), 3, torch.randn(1, 3, 8, 8), tmp_path / "task3.pt2")
    with pytest.raises(ValueError, match=r"must be named \*.pt2"):
        package(export_program(gated_cnn(), torch.randn(1, 3, 8, 8)), tmp_path / "model.pt")


def test_export_a_vit_with_token_and_head_gates():
    import torchvision

    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(32, 8, 2, 2, 16, 24, num_classes=5).eval()
    gated = GatedModel(vit, ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1.self_attention:heads"],
                       num_tasks=2, example_input=torch.randn(1, 3, 32, 32))
    program = export_program(gated, torch.randn(2, 3, 32, 32))
    assert gate_calls(program) == 2
    x, task_ids = torch.randn(3, 3, 32, 32), torch.tensor([1, 0, 1])
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x, task_ids), gated(x, task_ids)[0])


def test_export_gated_writes_a_package_that_runs(tmp_path):
    """The AOTInductor package on the CPU (compiles C++: ~25 s on the 2-core CI machine)."""
    gated = gated_cnn()
    start = time.perf_counter()
    path = export_gated(gated, torch.randn(2, 3, 8, 8), tmp_path / "gated.pt2")
    print(f"export_gated: {time.perf_counter() - start:.1f} s")
    assert path.endswith("gated.pt2")
    loaded = torch._inductor.aoti_load_package(path)
    x, task_ids = torch.randn(5, 3, 8, 8), torch.tensor([0, 2, 1, 1, 0])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, task_ids), gated(x, task_ids)[0])


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_export_gated_cuda_package(tmp_path):
    gated = gated_cnn("cuda")
    path = export_gated(gated, torch.randn(2, 3, 8, 8, device="cuda"), tmp_path / "gated_cuda.pt2")
    loaded = torch._inductor.aoti_load_package(path)
    x, task_ids = torch.randn(5, 3, 8, 8, device="cuda"), torch.tensor([0, 2, 1, 1, 0], device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, task_ids), gated(x, task_ids)[0], rtol=1e-3, atol=1e-3)
