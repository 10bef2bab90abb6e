"""The fast path: BatchNorm folding, fused gated convolutions, and the fused training step
against the eager path (float32: same results up to rounding; bfloat16: within its tolerance).

float32 is IEEE float32 here (conftest turns TF32 off for every test); the fold's check under
TF32 is shown on the CPU with cuDNN's TF32 rounding simulated (``simulated_tf32``)."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import DEVICES
from nad_ext.gates import fused as fused_module
from nad_ext import models
from nad_ext.gates.fused import GatedConv2d, fold_batchnorm, ieee_float32
from nad_ext.gates import GatedModel, parse_gate_point
from nad_ext.training import NADConfig, Network, disentangle
from test_trainer import colour_images, fit_small_cnn


def randomise_batchnorm(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine terms, so that folding has something to fold."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=gen))
                m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                m.bias.copy_(0.6 * torch.rand(c, generator=gen) - 0.3)
    return model.eval()


def zoo(name: str) -> tuple[nn.Module, list[str]]:
    torch.manual_seed(0)
    spec = models.get_spec(name)
    model = randomise_batchnorm(spec.build(10))
    return model, spec.gate_points(model)


def module_names(points):
    """The modules of gate-point specs (``features.norm5:relu`` -> ``features.norm5``)."""
    return [parse_gate_point(p)[0] for p in points]


def vgg_like() -> nn.Sequential:
    """VGG's pattern: conv+ReLU gate points, block ends gated after the max-pool, biased convs."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )


def compare(eager: GatedModel, fused: GatedModel, x, ids, rtol):
    """Outputs, recorded gate-point activations and logits gradients of a masked pass."""
    def rel(a, b):
        a, b = a.detach().double(), b.detach().double()
        return float((a - b).norm() / b.norm().clamp(min=1e-30))

    out_e, acts_e = eager(x, ids, record=True)
    out_f, acts_f = fused(x, ids, record=True)
    assert rel(out_f, out_e) < rtol
    for a, b in zip(acts_f, acts_e, strict=True):
        assert a.shape == b.shape and rel(a, b) < rtol
    (out_e.float() ** 2).sum().backward()
    (out_f.float() ** 2).sum().backward()
    for a, b in zip(fused.logits, eager.logits, strict=True):
        assert rel(a.grad, b.grad) < 10 * rtol
    bin_e, _ = eager(x, ids, binary=True)
    bin_f, _ = fused(x, ids, binary=True)
    assert rel(bin_f, bin_e) < rtol


@pytest.mark.parametrize("name", ["zoo_plain", "zoo_residual", "zoo_dense", "zoo_nas"])
def test_folded_network_computes_the_same_function(name):
    model, points = zoo(name)
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    count = lambda: sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # noqa: E731
    before = count()
    folded = fold_batchnorm(model, x[:1], watch=module_names(points))
    assert folded > 0 and count() == before - folded
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


def tf32_round(t: torch.Tensor) -> torch.Tensor:
    """``t`` (float32) rounded to TF32: 10 explicit mantissa bits, to nearest (relative ~5e-4)."""
    bits = t.contiguous().view(torch.int32)
    return ((bits + 0x1000) & -0x2000).view(torch.float32)


@pytest.fixture
def simulated_tf32(monkeypatch):
    """F.conv2d (so every nn.Conv2d) computes as cuDNN does on an Ampere or later GPU while TF32
    is on for convolutions (``torch.backends.cudnn.conv.fp32_precision == "tf32"``, set by either
    API): float32 inputs and weights rounded to TF32, products summed in float32."""
    conv2d = F.conv2d

    def conv(x, weight, *args, **kwargs):
        if x.dtype == torch.float32 and torch.backends.cudnn.conv.fp32_precision == "tf32":
            x, weight = tf32_round(x), tf32_round(weight)
        return conv2d(x, weight, *args, **kwargs)

    monkeypatch.setattr(F, "conv2d", conv)


def enable_tf32(api: str) -> None:
    if api == "legacy":  # what bench_step.py used to do
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.backends.cudnn.conv.fp32_precision = "tf32"


def relative_error(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def test_tests_run_in_ieee_float32():
    assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"


@pytest.mark.parametrize("api", ["legacy", "new"])
@pytest.mark.parametrize("name", ["zoo_plain", "zoo_residual", "zoo_dense", "zoo_nas"])
def test_folding_check_does_not_depend_on_tf32(simulated_tf32, name, api):
    """Under TF32 these networks' watched outputs move by 3-5e-4 relative, past the check's 1e-4
    (on a GPU every Conv+BN network would stay unfolded); the check compares in IEEE float32, so
    every pair still folds, and the TF32 settings are left as they were."""
    model, points = zoo(name)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        enable_tf32(api)
        assert relative_error(model(x), expected) > 1e-5  # the simulation is in effect
    count = lambda: sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # noqa: E731
    before = count()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folded = fold_batchnorm(model, x[:1], watch=module_names(points))
    assert folded > 0 and count() == before - folded
    if api == "legacy":
        assert torch.backends.cudnn.allow_tf32
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    with torch.no_grad(), ieee_float32():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


def test_tf32_keeps_the_fused_convolutions(simulated_tf32):
    model, points = zoo("zoo_plain")
    enable_tf32("new")
    fused = GatedModel(model, points, 4, torch.randn(1, 3, 64, 64), fuse=True)
    assert fused.fused_points == [0, 1, 2, 3, 4]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.model.modules())


@pytest.mark.parametrize("wrong", ["eps", "running_var"])
def test_folding_check_still_refuses_a_wrong_fold_under_tf32(simulated_tf32, monkeypatch, wrong):
    """A fold with epsilon 1e-3 instead of BatchNorm's 1e-5, or a running variance 0.2% off,
    moves the outputs by 1-2e-3: as much as TF32 does, so a tolerance widened to TF32's would take
    it for rounding. The check in IEEE float32 keeps its 1e-4 and refuses it."""
    real_fold = fused_module._fold

    def wrong_fold(conv, bn):
        bn = copy.deepcopy(bn)
        if wrong == "eps":
            bn.eps = 1e-3
        else:
            bn.running_var.mul_(1.002)
        return real_fold(conv, bn)

    monkeypatch.setattr(fused_module, "_fold", wrong_fold)
    model, points = zoo("zoo_residual")
    enable_tf32("new")
    with pytest.warns(UserWarning, match="left unfolded"):
        assert fold_batchnorm(model, torch.randn(1, 3, 32, 32), watch=module_names(points)) == 0
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_folding_refuses_a_convolution_whose_output_is_used_twice():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # folding would change the second use

    model = randomise_batchnorm(Shared())
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    with pytest.warns(UserWarning, match="left unfolded"):
        assert fold_batchnorm(model, x[:1]) == 0
    assert isinstance(model.bn, nn.BatchNorm2d)
    torch.testing.assert_close(model(x), expected)


def test_vgg_pattern_is_fused_at_every_convolution_and_the_callers_model_is_untouched():
    model = vgg_like()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    points = ["1", "4", "8"]  # a ReLU, a max-pool after a ReLU, two pools after a strided conv's ReLU
    x = torch.randn(6, 3, 16, 16)
    fused = GatedModel(model, points, 3, x[:1], fuse=True)
    assert fused.fused_points == [0, 1, 2]
    assert sum(isinstance(m, GatedConv2d) for m in fused.model.modules()) == 3
    assert all(isinstance(m, (nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear))
               for m in model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])
    eager = GatedModel(model, points, 3, x[:1])
    compare(eager, fused, x, torch.tensor([0, 1, 2, 2, 1, 0]), rtol=1e-5)


def test_chains_broken_by_another_gate_point_or_a_shared_module_are_not_fused():
    relu = nn.ReLU()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), relu, nn.MaxPool2d(2), nn.Conv2d(4, 4, 1), relu,
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    x = torch.randn(2, 3, 12, 12)
    # "2" would fuse through "1", but "1" is a gate point itself; "5"'s chain has the shared ReLU.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gated = GatedModel(model, ["2", "5"], 2, x[:1], fuse=True)
    assert gated.fused_points == []
    eager = GatedModel(model, ["2", "5"], 2, x[:1])
    compare(eager, gated, x, torch.tensor([0, 1]), rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["zoo_plain", "zoo_residual", "zoo_dense"])
def test_fused_gated_model_matches_the_eager_one(device, name):
    model, points = zoo(name)
    model = model.to(device)
    x = torch.randn(8, 3, 64, 64, device=device)
    ids = torch.arange(8) % 4
    eager = GatedModel(model, points, 4, x[:1])
    fused = GatedModel(model, points, 4, x[:1], fuse=True)
    if name == "zoo_plain":
        assert fused.fused_points == [0, 1, 2, 3, 4]  # every conv gate point; avgpool is not in a Sequential
    compare(eager, fused, x, ids, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_channels_last_matches_within_its_precision(device):
    model, points = zoo("zoo_plain")
    model = model.to(device)
    x = torch.randn(8, 3, 64, 64, device=device)
    eager = GatedModel(model, points, 4, x[:1])
    fast = GatedModel(model, points, 4, x[:1], fuse=True, dtype=torch.bfloat16, channels_last=True)
    out, acts = fast(x, torch.arange(8) % 4, record=True)
    assert out.dtype == torch.bfloat16 and all(m.dtype == torch.float32 for m in fast.logits)
    assert acts[0].is_contiguous(memory_format=torch.channels_last)
    compare(eager, fast, x, torch.arange(8) % 4, rtol=2e-2)


@pytest.mark.parametrize("name", ["zoo_plain", "zoo_residual", "zoo_dense", "zoo_nas"])
def test_the_cpu_fast_path_matches_the_network_as_written(name):
    # fold: BatchNorm folded on a copy, the network channels_last, the gates by hooks as without it
    model, points = zoo(name)
    x = torch.randn(8, 3, 64, 64)
    eager = GatedModel(model, points, 4, x[:1])
    fast = GatedModel(model, points, 4, x[:1], fold=True, channels_last=True)
    def norms(m):
        return sum(isinstance(x, nn.BatchNorm2d) for x in m.modules())

    # Those reading a convolution are folded (DenseNet's pre-activation ones read a concatenation).
    assert norms(fast.model) < norms(model) and not fast.fused_points
    assert norms(zoo(name)[0]) == norms(model)  # the caller's network as it was
    compare(eager, fast, x, torch.arange(8) % 4, rtol=1e-5)


TRAIN = dict(beta=1.0, epochs=2, image_size=16, batch_size=16, tasks_per_step=3, device="cpu")


@pytest.fixture(scope="module")
def eager_run():
    """A small fitted network, its data, and the gates the float32 eager path learns on them."""
    images = colour_images()
    model = fit_small_cnn(images)
    bank = disentangle(Network(model, ["1", "4"], "small"), images, config=NADConfig(fuse="off", **TRAIN),
                       progress=False)
    return images, model, bank


@pytest.mark.parametrize("fuse", ["on", "fold"])
def test_fused_training_gives_the_eager_paths_gates(eager_run, fuse):
    images, model, eager = eager_run
    fused = disentangle(Network(model, ["1", "4"], "small"), images, config=NADConfig(fuse=fuse, **TRAIN),
                        progress=False)
    for a, b in zip(fused.logits, eager.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_bfloat16_training_stays_close_to_float32(eager_run):
    images, model, f32 = eager_run
    bf16 = disentangle(Network(model, ["1", "4"], "small"), images, progress=False,
                       config=NADConfig(fuse="on", precision="bfloat16", **TRAIN))
    for a, b in zip(bf16.logits, f32.logits, strict=True):
        assert (a - b).abs().max() < 0.1  # 6 normalised steps of length 0.1: drift well under one step
        assert ((a > 0) == (b > 0)).float().mean() > 0.9


def test_execution_settings_resolve_per_device_and_bad_ones_are_named():
    from nad_ext.training.config import Execution

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # (fuse, fold, dtype, channels_last, graph)
    assert NADConfig().execution(cpu) == Execution(False, True, torch.float32, True, False)
    assert NADConfig(fuse="off").execution(cpu) == Execution(False, False, torch.float32, False, False)
    assert NADConfig(fuse="on").execution(cpu) == Execution(True, False, torch.float32, False, False)
    assert NADConfig(precision="bfloat16").execution(cpu) == Execution(False, True, torch.bfloat16, True, False)
    assert NADConfig().execution(cuda) == Execution(True, False, torch.bfloat16, True, True)
    assert NADConfig(precision="float32", cuda_graph="off").execution(cuda) == Execution(True, False, torch.float32,
                                                                                         False, False)
    assert NADConfig(fuse="off").execution(cuda) == Execution(False, False, torch.float32, False, False)
    assert NADConfig().execution(cpu).describe() == "BatchNorm folded, channels_last, float32"
    assert NADConfig().execution(cuda).describe() == "fused, channels_last, bfloat16, CUDA graphs"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        NADConfig(cuda_graph="on").execution(torch.device("cpu"))
    with pytest.raises(ValueError, match="cuda_graph must be"):
        NADConfig(cuda_graph=True).validate()
    with pytest.raises(ValueError, match="fuse must be one of 'auto', 'on', 'fold', 'off'"):
        NADConfig(fuse="yes").validate()
    with pytest.raises(ValueError, match="precision must be"):
        NADConfig(precision="fp8").validate()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("selective", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replays_compute_the_eager_steps(dtype, selective):
    from nad_ext.training.negatives import task_class_matrix
    from nad_ext.training.step_graph import GraphedSteps
    from nad_ext.training import build_gated_model, train_step

    model, points = zoo("zoo_plain")
    # selective: task t owns class t; samples labelled with another class are its negatives
    config = NADConfig(beta=4.5, negatives=1.0, negative_weight=2.0) if selective else NADConfig(beta=4.5)
    classes = task_class_matrix([(t,) for t in range(4)], 10, "cuda") if selective else None
    runs = []
    for graphed in (False, True):
        gated = build_gated_model(model, points, 4, 64, model_id="zoo_plain", device="cuda", fuse=True, dtype=dtype)
        step = (GraphedSteps(gated, lambda g, *b: train_step(g, *b, config, classes)) if graphed
                else lambda *b: train_step(gated, *b, config, classes))
        gen = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(3):  # new data every step: the replays must read the new inputs
            x = torch.randn(32, 3, 64, 64, generator=gen).cuda()
            with torch.no_grad():
                labels = gated.original(x, record=False)[0].argmax(1)
            labels[:4] = (labels[:4] + 1) % 10  # some samples do not count
            ids = torch.arange(4).repeat_interleave(8)
            if selective:  # the rest of each task's samples are its negatives
                labels[4::2] = ids[4::2].cuda()
            losses.append(step(x, labels, ids, torch.arange(4)).loss.clone())
        if graphed:
            assert len(step.graphs) == 1 and not step.failed
        runs.append((losses, [m.detach().clone() for m in gated.logits]))
    (eager_losses, eager_logits), (graph_losses, graph_logits) = runs
    # Same kernels; only float atomics may add in another order (and bf16 round differently).
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for a, b in zip(graph_losses + graph_logits, eager_losses + eager_logits):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_fused_training_gives_the_eager_paths_gates_with_the_selective_objective(eager_run):
    images, model, _ = eager_run
    selective = dict(negatives=0.5, negative_weight=2.0)
    eager, fused = (disentangle(Network(model, ["1", "4"], "small"), images, progress=False,
                                config=NADConfig(fuse=fuse, **selective, **TRAIN)) for fuse in ("off", "on"))
    for a, b in zip(fused.logits, eager.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
