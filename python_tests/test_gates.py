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


def test_a_gate_point_can_record_relu_of_its_output_for_the_objective():
    """``"name:relu"`` (any network): the gate and the forward pass are those of ``"name"``; what
    the gate point records (for the objective's MSE, and the maps) is relu of the gated output,
    in masked and original passes, eager and fused."""
    from nad_ext.gates import parse_gate_point

    assert parse_gate_point("a.b:relu") == ("a.b", None, "channels", "relu")
    assert parse_gate_point("a.b:2:relu") == ("a.b", 2, "channels", "relu")
    assert parse_gate_point("attn:heads:relu") == ("attn", None, "heads", "relu")
    assert parse_gate_point("a.b:heads") == ("a.b", None, "heads", "output")
    assert GatePoint("a", 3, 2, record="relu").spec == "a:2:relu"
    with pytest.raises(ValueError, match="'heads' or 'relu'"):
        parse_gate_point("a.b:sqrt")
    with pytest.raises(ValueError, match="record must be one of output, relu"):
        GatedModel(small_cnn(), [GatePoint("0", 4, record="abs")], 1, torch.zeros(1, 3, 8, 8))
    x = torch.randn(6, 3, 8, 8)
    ids = torch.tensor([0, 1, 2, 2, 1, 0])
    for fuse in (False, True):
        plain = GatedModel(small_cnn(), ["0", "3"], 3, x[:1], fuse=fuse)
        relu = GatedModel(small_cnn(), ["0:relu", "3"], 3, x[:1], fuse=fuse)
        assert [p.record for p in relu.gate_points] == ["relu", "output"]
        out_p, acts_p = plain(x, ids, record=True)
        out_r, acts_r = relu(x, ids, record=True)
        assert (acts_p[0] < 0).any()  # a convolution's output: the records differ
        torch.testing.assert_close(out_r, out_p)
        torch.testing.assert_close(acts_r[0], torch.relu(acts_p[0]))
        torch.testing.assert_close(acts_r[1], acts_p[1])
        (_, orig_p), (_, orig_r) = plain.original(x), relu.original(x)
        torch.testing.assert_close(orig_r[0], torch.relu(orig_p[0]))


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


@pytest.mark.parametrize("options", [dict(dtype=torch.bfloat16, channels_last=True), dict(channels_last=True)])
def test_a_low_precision_or_channels_last_gated_model_leaves_the_callers_network_as_it_was(options):
    # The network is gated again (a second run of paths on attacked images) and run as it was
    # (the attack itself): converting it in place broke both.
    model = small_cnn()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    gated = GatedModel(model, ["1", "3"], 2, x[:1], **options)
    assert gated.model is not model
    assert all(p.dtype == torch.float32 and p.is_contiguous() for p in model.parameters())
    torch.testing.assert_close(model(x), expected)
    again = GatedModel(model, ["1", "3"], 2, x[:1], **options)
    out, _ = again.original(x)
    assert out.dtype == options.get("dtype", torch.float32)
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.05)


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


# ----------------------------------------------------------------------------------------------
# Channels on other axes: tokens, NHWC maps, attention heads


def tiny_vit(image_size=32):
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(image_size, 8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=24,
                                                num_classes=5).eval()


def tiny_swin():
    torch.manual_seed(0)
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer([4, 4], 16, [2, 2], [2, 4], [4, 4], num_classes=5).eval()


def tiny_convnext():
    torch.manual_seed(0)
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 2)], num_classes=5).eval()


def test_channel_axes_are_found_for_tokens_nhwc_and_nchw_maps():
    x = torch.zeros(1, 3, 32, 32)
    vit = GatedModel(tiny_vit(), ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1.mlp.1",
                                  "conv_proj", "encoder.layers.encoder_layer_1.self_attention:heads"], 2, x)
    assert vit.gate_points == [GatePoint("encoder.layers.encoder_layer_0", 16, 2),
                               GatePoint("encoder.layers.encoder_layer_1.mlp.1", 24, 2),
                               GatePoint("conv_proj", 16, 1),
                               GatePoint("encoder.layers.encoder_layer_1.self_attention", 2, 2, "heads")]
    assert vit.example_shapes[0] == (1, 17, 16)
    swin = GatedModel(tiny_swin(), ["features.1.0", "features.0", "features.3.1.mlp.1", "features.1.1.attn:heads"],
                      2, x)
    assert [(p.channels, p.channel_axis, p.units) for p in swin.gate_points] == [
        (16, 3, "channels"), (16, 3, "channels"), (128, 3, "channels"), (2, 3, "heads")]
    # ConvNeXt: NHWC inside a block (its MLP), NCHW at the block's end (after a Permute).
    convnext = GatedModel(tiny_convnext(), ["features.1.0.block.4", "features.1.0", "features.3.1"], 2, x)
    assert [(p.channels, p.channel_axis) for p in convnext.gate_points] == [(64, 3), (16, 1), (32, 1)]


def test_coincident_sizes_are_told_apart_by_a_larger_input():
    # 8 channels on an 8 x 8 map: the second probe (12 x 12) shows which axes are spatial.
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 2))
    gated = GatedModel(model, ["1"], 1, torch.zeros(1, 3, 8, 8))
    assert gated.gate_points == [GatePoint("1", 8, 1)]


class SquareTokens(nn.Module):
    """32 x 32 images -> 16 patch tokens of width 16, with a fixed-size position embedding."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 8, stride=8)
        self.pos = nn.Parameter(torch.zeros(1, 16, 16))
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.proj(tokens).mean(1))


def test_channel_axis_can_be_given_and_an_ambiguous_one_is_refused():
    x = torch.zeros(1, 3, 32, 32)
    model = nn.Sequential(nn.Identity(), nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    # The input itself: no layer before it, but the larger probe shows that axis 1 is fixed.
    assert GatedModel(model, ["0"], 1, x).gate_points[0].channel_axis == 1
    # 16 tokens of 16 channels in a network of one input size: no second opinion, ambiguous.
    with pytest.raises(ValueError, match=r"channel axis of gate point 'proj'.*axes \[1, 2\].*channel_axis="):
        GatedModel(SquareTokens(), ["proj"], 1, x)
    assert GatedModel(SquareTokens(), ["proj:2"], 1, x).gate_points[0] == GatePoint("proj", 16, 2)
    vit = tiny_vit()
    assert GatedModel(vit, ["encoder.dropout:2"], 1, x).gate_points[0] == GatePoint("encoder.dropout", 16, 2)
    assert GatedModel(vit, ["encoder.dropout"], 1, x, channel_axis={"encoder.dropout": -1}).gate_points[0] \
        == GatePoint("encoder.dropout", 16, 2)
    assert GatedModel(vit, ["encoder.dropout"], 1, x, channel_axis=1).gate_points[0] == \
        GatePoint("encoder.dropout", 17, 1)
    with pytest.raises(ValueError, match="channel_axis 3 of gate point 'encoder.dropout' is out of range"):
        GatedModel(vit, ["encoder.dropout:3"], 1, x)
    with pytest.raises(ValueError, match="after ':' must be a channel axis"):
        GatedModel(vit, ["encoder.dropout:last"], 1, x)


def test_heads_are_refused_on_a_module_that_is_not_attention():
    with pytest.raises(ValueError, match=r"'encoder.layers.encoder_layer_0.mlp': units 'heads' needs an attention"):
        GatedModel(tiny_vit(), ["encoder.layers.encoder_layer_0.mlp:heads"], 1, torch.zeros(1, 3, 32, 32))
    # Gating the attention module's output by channel: it returns a tuple; the error says how.
    with pytest.raises(ValueError, match=r"must output a tensor.*'encoder.layers.encoder_layer_0.self_attention:heads'"):
        GatedModel(tiny_vit(), ["encoder.layers.encoder_layer_0.self_attention"], 1, torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_token_and_nhwc_gates_match_a_hand_written_reference(dtype):
    """Tokens (N, L, C) and NHWC maps: the gate multiplies the last axis; gradients reach the
    logits as in a plain PyTorch formula."""
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    ids = torch.tensor([0, 1, 2, 1])
    for make, name in ((tiny_vit, "encoder.layers.encoder_layer_0"), (tiny_swin, "features.1.0")):
        model = make().to(torch.float64)
        gated = GatedModel(model, [name], 3, x[:1], dtype=None if dtype == torch.float64 else dtype)
        logits = gated.logits[0]
        _, acts = gated(x, ids, record=True)
        _, originals = gated.original(x)
        gate = torch.sigmoid(logits)[ids]
        expected = originals[0] * gate.view(4, *([1] * (originals[0].dim() - 2)), -1).to(originals[0].dtype)
        tol = {} if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(acts[0], expected, **tol)
        (g,) = torch.autograd.grad(acts[0].float().square().sum(), logits)
        (ref,) = torch.autograd.grad((originals[0].float() * torch.sigmoid(logits)[ids].view(
            4, *([1] * (originals[0].dim() - 2)), -1)).square().sum(), logits)
        torch.testing.assert_close(g, ref, **({} if dtype == torch.float64 else dict(rtol=3e-2, atol=3e-2)))


def test_head_gates_in_a_gated_vit():
    x = torch.randn(3, 3, 32, 32)
    name = "encoder.layers.encoder_layer_1.self_attention"
    gated = GatedModel(tiny_vit(), [f"{name}:heads"], 2, x[:1])
    with torch.no_grad():
        gated.logits[0].copy_(torch.tensor([[5.0, -5.0], [-5.0, 5.0]]))
    ids = torch.tensor([0, 1, 1])
    out, acts = gated(x, ids, binary=True, record=True)
    assert acts[0].shape == (3, 17, 2, 8)
    assert acts[0][0, :, 1].abs().max() == 0 and acts[0][0, :, 0].abs().max() > 0
    assert acts[0][1, :, 0].abs().max() == 0 and acts[0][1, :, 1].abs().max() > 0
    # All heads open: the original network.
    with torch.no_grad():
        gated.logits[0].fill_(5.0)
    torch.testing.assert_close(gated(x, ids, binary=True)[0], gated.original(x, record=False)[0])
    model = gated.remove_gates()
    assert "forward" not in vars(model.get_submodule(name))


def test_fused_path_leaves_token_and_nhwc_points_unfused():
    x = torch.zeros(1, 3, 32, 32)
    gated = GatedModel(tiny_convnext(), ["features.1.0.block.4", "features.1.0"], 2, x, fuse=True)
    assert gated.fused_points == []
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 2))
    assert GatedModel(cnn, ["1", "3"], 2, x, fuse=True).fused_points == [0, 1]
    # A point forced onto another axis is never fused into the convolution's channels.
    assert GatedModel(cnn, ["1:2", "3"], 2, x, fuse=True).fused_points == [1]


def test_auto_gate_points_on_transformers_and_convnext():
    x = torch.zeros(1, 3, 32, 32)
    assert propose_gate_points(tiny_vit(), x) == ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"]
    assert propose_gate_points(tiny_swin(), x) == ["features.1.0", "features.1.1", "features.3.0", "features.3.1"]
    assert propose_gate_points(tiny_convnext(), x) == ["features.1.0", "features.1.1", "features.3.0", "features.3.1"]


def test_auto_heads_are_every_attention_module():
    from nad_ext.gates import resolve_gate_points

    x = torch.zeros(1, 3, 32, 32)
    assert resolve_gate_points(tiny_vit(), "auto", x, "heads") == [
        "encoder.layers.encoder_layer_0.self_attention:heads", "encoder.layers.encoder_layer_1.self_attention:heads"]
    with pytest.raises(ValueError, match="has no attention module"):
        resolve_gate_points(small_cnn(), "auto", torch.zeros(1, 3, 8, 8), "heads")
    with pytest.raises(ValueError, match="'auto' gate points gate channels or heads, not 'mlp'"):
        resolve_gate_points(tiny_vit(), "auto", x, "mlp")


# Every layout a gate point can have, as the (N, ...) tensor and its channel axis: tokens, NHWC
# maps, ViT head outputs (N, L, heads, d) as the attention leaves them (a transposed view), Swin
# head outputs (N, H, W, heads, d) cropped from a padded map (a non-contiguous view).
def _layouts(dtype):
    torch.manual_seed(0)
    return {
        "tokens": (torch.randn(3, 5, 4, dtype=dtype), 2),
        "nhwc": (torch.randn(3, 2, 3, 4, dtype=dtype), 3),
        "vit_heads": (torch.randn(3, 4, 5, 2, dtype=dtype).transpose(1, 2), 2),
        "swin_heads": (torch.randn(3, 4, 4, 4, 2, dtype=dtype)[:, :3, :3], 3),
        "swin_heads_dense": (torch.randn(3, 3, 3, 4, 2, dtype=dtype), 3),
        "nchw": (torch.randn(3, 4, 2, 3, dtype=dtype), 1),
    }


def _gate_reference(x, logits, ids, axis):
    shape = [x.shape[0]] + [1] * (x.dim() - 1)
    shape[axis] = x.shape[axis]
    return x * torch.sigmoid(logits)[ids].reshape(shape).to(x.dtype)


@pytest.mark.parametrize("layout", ["tokens", "nhwc", "vit_heads", "swin_heads", "swin_heads_dense", "nchw"])
def test_gate_tensor_on_every_layout_against_the_reference(layout):
    from nad_ext.gates import gate_tensor

    x, axis = _layouts(torch.float64)[layout]
    ids = torch.tensor([1, 0, 1])
    logits = torch.randn(2, x.shape[axis], dtype=torch.float64)
    heads = layout.endswith("heads")
    y = gate_tensor(x, logits, ids, axis, heads)
    assert y.shape == x.shape
    torch.testing.assert_close(y, _gate_reference(x, logits, ids, axis))
    torch.autograd.gradcheck(lambda a, m: gate_tensor(a, m, ids, axis, heads),
                             (x.clone().requires_grad_(), logits.clone().requires_grad_()))
    # bfloat16 activations, float32 logits: within bf16's precision of the float32 reference.
    xb = x.to(torch.bfloat16).requires_grad_()
    mb = logits.float().requires_grad_()
    yb = gate_tensor(xb, mb, ids, axis, heads)
    assert yb.dtype == torch.bfloat16
    ref = _gate_reference(xb.detach().float(), mb.detach(), ids, axis)
    torch.testing.assert_close(yb.float(), ref, rtol=1e-2, atol=1e-2)
    (g,) = torch.autograd.grad(yb.float().sum(), mb)
    m32 = logits.float().requires_grad_()
    (g_ref,) = torch.autograd.grad(_gate_reference(xb.detach().float(), m32, ids, axis).sum(), m32)
    torch.testing.assert_close(g, g_ref, rtol=2e-2, atol=2e-2)


def one_point_network():
    """conv -> ReLU (the gate point) -> pool -> linear: the gate's logits gradient by hand is
    sum over the sample of d loss / d gated output * ungated output * d gate / d logit."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(5, 4))


def test_straight_through_gates_are_binary_forward_with_the_soft_gradient():
    """What is trained is what is kept: the masked pass equals the binary one, the logits get
    d sigmoid(m) / dm times the upstream gradient (the straight-through estimator)."""
    model = one_point_network()
    x = torch.randn(6, 3, 8, 8)
    ids = torch.tensor([0, 1, 2, 2, 1, 0])
    gated = GatedModel(model, ["1"], num_tasks=3, example_input=x[:1], straight_through=True)
    m = gated.logits[0]
    out, acts = gated(x, ids, record=True)
    torch.testing.assert_close(out, gated(x, ids, binary=True)[0])
    hard = (m.detach() > 0).float()[ids][:, :, None, None]
    h = model[1](model[0](x))
    torch.testing.assert_close(acts[0], h * hard)
    weights = torch.randn(6, 4)
    (grad,) = torch.autograd.grad((out * weights).sum(), [m])
    # d loss / d gated output: linear weights spread over the pooled positions
    upstream = (weights @ model[4].weight)[:, :, None, None] / (8 * 8)
    s = torch.sigmoid(m.detach())
    per_sample = (upstream * h).sum(dim=(2, 3)) * (s * (1 - s))[ids]
    expected = torch.zeros_like(m).index_add_(0, ids, per_sample)
    torch.testing.assert_close(grad, expected)
    with torch.no_grad():  # no gradient wanted: the plain binary pass
        torch.testing.assert_close(gated(x, ids)[0], out.detach())


def test_temperature_scales_the_soft_gates_and_leaves_the_binary_ones():
    model = one_point_network()
    x = torch.randn(4, 3, 8, 8)
    ids = torch.tensor([0, 1, 1, 0])
    gated = GatedModel(model, ["1"], num_tasks=2, example_input=x[:1])
    soft1, binary1 = gated(x, ids)[0], gated(x, ids, binary=True)[0]
    gated.set_temperature(0.25)
    h = model[1](model[0](x))
    expected = model[4](model[3](model[2](h * torch.sigmoid(gated.logits[0].detach() / 0.25)[ids][:, :, None, None])))
    torch.testing.assert_close(gated(x, ids)[0], expected)
    torch.testing.assert_close(gated(x, ids, binary=True)[0], binary1)
    torch.testing.assert_close(gated.scaled_logits()[0], gated.logits[0] / 0.25)
    tempered = gated(x, ids)[0]
    gated.set_temperature(1)
    torch.testing.assert_close(gated(x, ids)[0], soft1)
    # Every pass reads the buffer once a temperature was set (1 too), as a replayed CUDA graph
    # captured at temperature 1 would: an in-place change is seen.
    gated.temperature.fill_(0.25)
    torch.testing.assert_close(gated(x, ids)[0], tempered)
    for bad in (0, -1.0, float("nan"), True, "1"):
        with pytest.raises(ValueError, match="temperature must be a positive number"):
            gated.set_temperature(bad)


def test_straight_through_gate_points_are_not_fused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2))
    x = torch.randn(1, 3, 8, 8)
    assert GatedModel(model, ["1"], 2, x, fuse=True).fused_points == [0]
    assert GatedModel(model, ["1"], 2, x, fuse=True, straight_through=True).fused_points == []
