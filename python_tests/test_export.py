import pytest
import torch
from torch import nn

from nad_ext.gates.export import export_gated, export_task
from nad_ext.gates import GatedModel


def gated_cnn():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5),
    )
    return GatedModel(net, ["1", "3"], num_tasks=3, example_input=torch.randn(1, 3, 8, 8))


def test_export_gated_matches_eager_for_any_batch_and_tasks(tmp_path):
    gated = gated_cnn()
    export_gated(gated, torch.randn(2, 3, 8, 8), tmp_path / "gated.pt")
    loaded = torch.jit.load(str(tmp_path / "gated.pt"))
    assert "nad::task_gate" in str(loaded.inlined_graph)  # the gates stay native calls
    x, task_ids = torch.randn(5, 3, 8, 8), torch.tensor([0, 2, 1, 1, 0])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, task_ids), gated(x, task_ids)[0])


def test_export_task_is_that_tasks_binary_sub_architecture(tmp_path):
    gated = gated_cnn()
    traced = export_task(gated, 2, torch.randn(2, 3, 8, 8), tmp_path / "task2.pt")
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        expected = gated(x, torch.full((4,), 2), binary=True)[0]
        torch.testing.assert_close(traced(x), expected)
        torch.testing.assert_close(torch.jit.load(str(tmp_path / "task2.pt"))(x), expected)


def test_export_task_refuses_a_task_the_model_does_not_have():
    with pytest.raises(ValueError, match=r"task must lie in \[0, 3\), got 3"):
        export_task(gated_cnn(), 3, torch.randn(1, 3, 8, 8))


def test_export_a_vit_with_token_and_head_gates(tmp_path):
    import torchvision

    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(32, 8, 2, 2, 16, 24, num_classes=5).eval()
    gated = GatedModel(vit, ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1.self_attention:heads"],
                       num_tasks=2, example_input=torch.randn(1, 3, 32, 32))
    export_gated(gated, torch.randn(2, 3, 32, 32), tmp_path / "vit.pt")
    loaded = torch.jit.load(str(tmp_path / "vit.pt"))
    x, task_ids = torch.randn(3, 3, 32, 32), torch.tensor([1, 0, 1])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, task_ids), gated(x, task_ids)[0])
