import pytest
import torch
import torchvision
from torch import nn

from nad_ext.gates import GatedModel, GatePoint, propose_gate_points
from nad_ext.ops import task_gate_reference


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5),
    )


def reference_masked(model, x, gates):
    """Masked network by hand: multiply the outputs of modules 1 and 3 by per-sample gates."""
    h = model[1](model[0](x)) * gates[0][:, :, None, None]
    h = model[3](model[2](h)) * gates[1][:, :, None, None]
    return model[6](model[5](model[4](h)))


def test_gates_compound_like_a_hand_written_masked_network():
    model = small_cnn()
    x = torch.randn(6, 3, 8, 8)
    gated = GatedModel(model, ["1", "3"], num_tasks=3, example_input=x[:1])
    assert gated.gate_points == [GatePoint("1", 4), GatePoint("3", 6)]
    ids = torch.tensor([0, 1, 2, 2, 1, 0])
    out, acts = gated(x, ids, record=True)
    gates = [torch.sigmoid(m.detach())[ids] for m in gated.logits]
    torch.testing.assert_close(out, reference_masked(model, x, gates))
    torch.testing.assert_close(acts[0], task_gate_reference(model[1](model[0](x)), gated.logits[0].detach(), ids))
    binary, _ = gated(x, ids, binary=True)
    torch.testing.assert_close(binary, reference_masked(model, x, [(m.detach() > 0).float()[ids] for m in gated.logits]))


def test_original_network_is_untouched_and_frozen():
    model = small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    gated = GatedModel(model, ["1", "3"], 2, x[:1])
    out, acts = gated.original(x)
    torch.testing.assert_close(out, expected)
    assert len(acts) == 2 and acts[1].shape == (2, 6, 8, 8)
    assert all(not p.requires_grad for p in model.parameters())
    masked, _ = gated(x, torch.tensor([0, 1]))
    masked.sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(m.grad is not None for m in gated.logits)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_initial_gates_do_not_depend_on_the_number_of_tasks():
    x = torch.randn(1, 3, 8, 8)
    a = GatedModel(small_cnn(), ["1", "3"], 2, x, seed=5)
    b = GatedModel(small_cnn(), ["1", "3"], 7, x, seed=5)
    for ma, mb in zip(a.logits, b.logits):
        torch.testing.assert_close(ma.detach(), mb.detach()[:2])
    c = GatedModel(small_cnn(), ["1", "3"], 2, x, seed=6)
    assert not torch.equal(a.logits[0].detach(), c.logits[0].detach())


def test_unknown_and_shared_gate_points_are_refused():
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"gate point 'relu9' is not a module"):
        GatedModel(small_cnn(), ["relu9"], 2, x)
    with pytest.raises(ValueError, match="gate_points is empty"):
        GatedModel(small_cnn(), [], 2, x)
    with pytest.raises(ValueError, match="did you mean"):
        GatedModel(torchvision.models.resnet18(), ["layer1.O"], 2, torch.randn(1, 3, 32, 32))
    # torchvision's BasicBlock calls its `relu` twice: it cannot be a gate point by name.
    with pytest.raises(ValueError, match="runs 2 times per forward"):
        GatedModel(torchvision.models.resnet18(), ["layer1.0.relu"], 2, torch.randn(1, 3, 32, 32))


def test_auto_gate_points_on_torchvision_networks():
    x = torch.randn(1, 3, 64, 64)
    vgg = propose_gate_points(torchvision.models.vgg11(), x)
    assert vgg == [f"features.{i}" for i in (1, 4, 7, 9, 12, 14, 17, 19)]
    resnet = propose_gate_points(torchvision.models.resnet18(), x)
    assert resnet == ["relu"] + [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    dense = propose_gate_points(torchvision.models.densenet121(), x)
    assert "features.denseblock1" in dense and "features.transition1.relu" in dense
    assert dense.index("features.denseblock1") < dense.index("features.transition1.relu")
