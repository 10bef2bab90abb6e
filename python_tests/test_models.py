import pytest
import torch
from safetensors.torch import save_file

from nad_ext import data, models
from nad_ext.models import darts
from nad_ext.gates import GatedModel, parse_gate_point
from nad_ext.ops._layout import channels_inner


def _gate_channels(spec, model, size, device="cpu"):
    """Runs a forward with hooks on the gate points; returns their output channel counts."""
    modules = dict(model.named_modules())
    points = [parse_gate_point(p)[0] for p in spec.gate_points(model)]
    assert all(p in modules for p in points), [p for p in points if p not in modules]
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen[name] = output.shape[1]
        return hook

    hooks = [modules[p].register_forward_hook(record(p)) for p in points]
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, size, size, device=device))
    for h in hooks:
        h.remove()
    assert list(seen) == points, "gate points must be listed in forward order"
    return [seen[p] for p in points]


@pytest.mark.parametrize("name, count, total", [
    ("vgg16", 13, 4224), ("resnet50", 17, 15168), ("densenet121", 8, 3776), ("darts", 16, 6624),
])
def test_paper_presets(name, count, total):
    spec = models.get_spec(name)
    with torch.device("meta"):  # shapes only: no time spent initialising 100M+ parameters
        model = spec.build(5)
    channels = _gate_channels(spec, model, 64, device="meta")
    assert (len(channels), sum(channels)) == (count, total)
    assert spec.input_size == 224


def test_paper_preset_names_and_betas():
    vgg, dense, nas = models.get_spec("vgg16"), models.get_spec("densenet121"), models.get_spec("darts")
    with torch.device("meta"):
        vgg_model, dense_model, nas_model = vgg.build(2), dense.build(2), nas.build(2)
    assert vgg.gate_points(vgg_model)[:3] == ["features.1", "features.4", "features.6"]
    # ":relu": the objective compares relu(gated output) there, as the authors' model does
    # (docs/METHOD.md; python_tests/test_paper_mode.py checks it against their model files).
    assert dense.gate_points(dense_model) == [
        "features.pool0", "features.denseblock1", "features.transition1", "features.denseblock2",
        "features.transition2", "features.denseblock3", "features.transition3", "features.norm5:relu"]
    assert nas.gate_points(nas_model)[:3] == ["stem0:relu", "stem1", "cells.0"]
    assert not any(p.endswith(":relu") for p in vgg.gate_points(vgg_model) + nas.gate_points(nas_model)[1:])
    assert {n: models.get_spec(n).beta for n in ("vgg16", "resnet50", "densenet121", "darts")} == {
        "vgg16": 4.5, "resnet50": 0.02, "densenet121": 0.02, "darts": 0.45}


@pytest.mark.parametrize("name", models.ZOO)
def test_zoo_models_build_and_run(name):
    spec = models.get_spec(name)
    model = spec.build(7).eval()
    assert spec.input_size == 64
    assert sum(p.numel() for p in model.parameters()) < 400_000
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    gated = GatedModel(model, spec.gate_points(model), 1, torch.zeros(1, 3, 64, 64))
    channels = gated.layer_sizes
    assert len(channels) >= 3 and all(8 <= c <= 256 for c in channels)
    assert {models.get_spec(n).connection for n in models.ZOO} == {"plain", "residual", "dense", "nas", "transformer"}


def test_zoo_vit_gates_tokens_mlp_units_and_heads():
    spec = models.get_spec("zoo_vit")
    model = spec.build(10).eval()
    x = torch.zeros(1, 3, 64, 64)
    blocks = GatedModel(model, spec.points(model), 1, x).gate_points
    assert [(p.channels, p.channel_axis) for p in blocks] == [(64, 2)] * 3
    assert [p.channels for p in GatedModel(model, spec.points(model, "mlp"), 1, x).gate_points] == [128] * 3
    heads = GatedModel(model, spec.points(model, "heads"), 1, x).gate_points
    assert [(p.channels, p.units) for p in heads] == [(4, "heads")] * 3
    with pytest.raises(ValueError, match="'zoo_plain' has no 'heads' gate-point preset"):
        models.get_spec("zoo_plain").points(model, "heads")


class _GateOpInputs:
    """Records the activations handed to nad::task_gate and nad::gate_mse (a dispatch mode)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        seen = self.seen = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func in (torch.ops.nad.task_gate.default, torch.ops.nad.gate_mse.default):
                    seen.append((func.__name__, args[0], args[1] if "gate_mse" in func.__name__ else None))
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def _one_step(gated, x, num_tasks):
    """One NAD step on ``x``; returns the loss terms (the gates must move). Every activation
    reaches the gate ops in a layout they read in place (tokens and NHWC maps as
    channels-innermost views, not copies)."""
    from nad_ext.training import NADConfig, train_step

    before = [m.detach().clone() for m in gated.logits]
    with torch.no_grad():
        labels = gated.original(x, record=False)[0].argmax(1)  # every sample "correct"
    ids = torch.arange(len(x)) % num_tasks
    with _GateOpInputs() as ops:
        terms = train_step(gated, x, labels, ids, torch.arange(num_tasks), NADConfig(beta=1.0))
    assert all(not torch.equal(a, m.detach()) for a, m in zip(before, gated.logits))
    assert len(ops.seen) == 2 * len(gated.gate_points)
    for name, a, b in ops.seen:
        pair = (a,) if b is None else (a, b)  # gate_mse reads a pair in place when both are in one layout
        assert all(t.is_contiguous() for t in pair) or all(channels_inner(t) for t in pair), \
            (name, a.shape, [t.stride() for t in pair])
    return terms


@pytest.mark.slow
def test_vit_b_16_preset_builds_probes_and_steps():
    """ViT-B/16 at 224 (its one input size) on random weights: 12 blocks of (N, 197, 768)
    tokens, the 3,072 MLP units and 12 heads per block; one step with heads (a batch of 2)."""
    spec = models.get_spec("vit_b_16")
    assert (spec.input_size, spec.beta, spec.mean, spec.std) == (224, None, data.IMAGENET_MEAN, data.IMAGENET_STD)
    model = models.load_model("vit_b_16", num_classes=10)
    x = torch.zeros(1, 3, 224, 224)
    blocks = GatedModel(model, spec.points(model), 1, x)
    assert [(p.name, p.channels, p.channel_axis) for p in blocks.gate_points[:1]] == [
        ("encoder.layers.encoder_layer_0", 768, 2)]
    assert len(blocks.gate_points) == 12 and blocks.example_shapes[0] == (1, 197, 768)
    mlp = spec.points(model, "mlp")
    assert len(mlp) == 12 and mlp[0] == "encoder.layers.encoder_layer_0.mlp.1"
    blocks.remove_gates()
    gated = GatedModel(model, spec.points(model, "heads") + mlp[-1:], 2, x)
    assert [p.channels for p in gated.gate_points] == [12] * 12 + [3072]
    _one_step(gated, torch.randn(2, 3, 224, 224), 2)


@pytest.mark.parametrize("name, blocks, widths, axis", [
    ("swin_t", 12, [96] * 2 + [192] * 2 + [384] * 6 + [768] * 2, 3),
    ("convnext_tiny", 18, [96] * 3 + [192] * 3 + [384] * 9 + [768] * 3, 1),
])
def test_swin_and_convnext_presets_build_probe_and_step(name, blocks, widths, axis):
    """Random-weight torchvision models on a small input (both take any size): every block's
    output, the MLP units (NHWC), Swin's heads; one NAD step."""
    spec = models.get_spec(name)
    assert spec.input_size == 224 and spec.beta is None
    model = models.load_model(name, num_classes=5)
    x = torch.zeros(1, 3, 64, 64)
    gated = GatedModel(model, spec.points(model), 2, x)
    assert [p.channels for p in gated.gate_points] == widths
    assert {p.channel_axis for p in gated.gate_points} == {axis}
    mlp = GatedModel(model, spec.points(model, "mlp")[:2], 1, x).gate_points
    assert [(p.channels, p.channel_axis) for p in mlp] == [(4 * widths[0], 3)] * 2
    if name == "swin_t":
        heads = GatedModel(model, spec.points(model, "heads"), 1, x).gate_points
        assert [p.channels for p in heads] == [3] * 2 + [6] * 2 + [12] * 6 + [24] * 2
    else:
        with pytest.raises(ValueError, match="no 'heads' gate-point preset"):
            spec.points(model, "heads")
    _one_step(gated, torch.randn(2, 3, 64, 64), 2)


def test_get_spec_unknown_name():
    with pytest.raises(ValueError, match="unknown model 'vgg17'.*zoo_plain"):
        models.get_spec("vgg17")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_load_model_round_trip(tmp_path, suffix):
    source = models.get_spec("zoo_residual").build(4)
    for p in source.parameters():
        p.data.normal_()
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    loaded = models.load_model("zoo_residual", path, num_classes=4)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(x), source.eval()(x))


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        models.load_model("zoo_plain", tmp_path / "missing.pt")
    path = tmp_path / "plain.pt"
    torch.save(models.get_spec("zoo_plain").build(10).state_dict(), path)
    with pytest.raises(ValueError, match=r"(?s)plain.pt.*'zoo_residual'.*missing keys: conv1.weight"):
        models.load_model("zoo_residual", path, num_classes=10)
    with pytest.raises(ValueError, match=r"(?s)shape mismatches: classifier.weight \(file \(10, 64\), "
                                         r"model \(3, 64\)\).*classifier"):
        models.load_model("zoo_plain", path, num_classes=3)


def test_genotype_parser():
    parsed = darts.parse_genotype(str(darts.DARTS_V2))
    assert parsed == darts.DARTS_V2
    text = ("Genotype(normal=[('sep_conv_5x5', 1), ('avg_pool_3x3', 0)], normal_concat=range(2, 3), "
            "reduce=[('conv_7x1_1x7', 0), ('max_pool_3x3', 1)], reduce_concat=[2])")
    genotype = darts.parse_genotype(text)
    assert genotype.normal_concat == [2] and genotype.reduce[0] == ("conv_7x1_1x7", 0)
    net = darts.NetworkSmall(8, 3, 3, text).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    for bad in ["Genotype(normal=__import__('os').system('echo'), normal_concat=[2], reduce=[], reduce_concat=[2])",
                "Genotype(normal=[], normal_concat=[2])", "print(1)"]:
        with pytest.raises(ValueError):
            darts.parse_genotype(bad)


def test_train_zoo_model_and_cache(tmp_path, monkeypatch):
    train = data.generated_shapes("train", num_classes=3, images_per_class=8)
    val = data.generated_shapes("val", num_classes=3, images_per_class=4)
    zoo = models.load_zoo(tmp_path, train, val, names=["zoo_dense"], progress=False, epochs=1)
    model, accuracy = zoo["zoo_dense"]
    assert 0.0 <= accuracy <= 1.0 and not model.training
    assert (tmp_path / "zoo_dense.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["zoo_dense.safetensors"]  # no temp files left

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the cache is valid")

    monkeypatch.setattr(models.zoo, "train_zoo_model", no_training)
    again, accuracy_again = models.load_zoo(tmp_path, train, val, names=["zoo_dense"], progress=False,
                                            epochs=1)["zoo_dense"]
    assert accuracy_again == accuracy
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    # Another data set, or a corrupt file, is retrained.
    other = data.generated_shapes("train", num_classes=3, images_per_class=8, seed=1)
    with pytest.raises(AssertionError, match="retrained"):
        models.load_zoo(tmp_path, other, val, names=["zoo_dense"], progress=False, epochs=1)
    # Flipped bytes fail a tensor's checksum: named, then retrained.
    cache = tmp_path / "zoo_dense.safetensors"
    raw = bytearray(cache.read_bytes())
    raw[-40:-35] = bytes(b ^ 0x5A for b in raw[-40:-35])
    cache.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match=r"zoo cache .* tensor '.*' fails its CRC-32 check .*: training zoo_dense again"):
        with pytest.raises(AssertionError, match="retrained"):
            models.load_zoo(tmp_path, train, val, names=["zoo_dense"], progress=False, epochs=1)
    cache.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="corrupted or not a safetensors file"):
        with pytest.raises(AssertionError, match="retrained"):
            models.load_zoo(tmp_path, train, val, names=["zoo_dense"], progress=False, epochs=1)
