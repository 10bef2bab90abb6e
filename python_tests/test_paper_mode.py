"""Paper mode is the authors' method: the four paper presets against the authors' model files.

The authors' code (github.com/hujiecpp/NAD) inserts ``Mask`` modules (``sigmoid(m) * x``) into
hand-edited copies of VGG16, ResNet50, DenseNet121 and DARTS, records each mask's output with a
forward hook, and in ``findpath.py`` takes ``CE(F_t(x), y) + sum_l MSE(mask_l(x_K), orig_l(x_K))``
over the samples K the original network gets right, divided by the number of masks, plus
``beta * mean(sigmoid(m)^2)`` per mask, then ``m - lr * F.normalize(grad)``.

The ``authors_*`` forwards below follow their files line by line (models/imagenet/vgg16.py,
resnet50.py, densenet121.py, darts.py), on the modules of small random-weight networks of the
same families, and keep what their hooks keep: a reference to each mask's output, which a later
in-place ReLU may overwrite (their DARTS ``stem1`` begins with ``nn.ReLU(inplace=True)``, so the
first mask's recorded output becomes relu of it). :func:`authors_step` is their loss and update.
The tests compare nad-ext's objective, gate point by gate point, forward and gradient, and one
whole training step, eager and fused, with them; the samples mix correct and wrong predictions.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck

from nad_ext import models
from nad_ext.gates import GatedModel
from nad_ext.models.darts import DARTS_V2, NetworkImageNet
from nad_ext.models.densenet import DenseNet
from nad_ext.training import NADConfig, train_step
from nad_ext.training.objective import nad_loss

# ----------------------------------------------------------------------------------------------
# Small networks of the four families, random weights, non-trivial BatchNorm statistics


def _randomise_batchnorm(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
                m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
                m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                m.bias.copy_(0.6 * torch.rand(c, generator=gen) - 0.3)
    return model.eval()


# The authors' VGG16 configuration, models/imagenet/vgg16.py (cfgs['D']), widths divided by 8.
AUTHORS_VGG16_CFG = [64, "msk", 64, "M", "msk", 128, "msk", 128, "M", "msk", 256, "msk", 256, "msk", 256, "M",
                     "msk", 512, "msk", 512, "msk", 512, "M", "msk", 512, "msk", 512, "msk", 512, "M"]
SMALL = 8


def small_vgg16(num_classes: int) -> nn.Module:
    """torchvision's VGG16 (the preset's modules and names), 1/8 of its widths."""
    cfg = [v if v == "M" else v // SMALL for v in AUTHORS_VGG16_CFG if v != "msk"]
    model = torchvision.models.vgg.VGG(torchvision.models.vgg.make_layers(cfg), num_classes=num_classes)
    c = 512 // SMALL
    model.classifier = nn.Sequential(nn.Linear(c * 7 * 7, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, 32),
                                     nn.ReLU(True), nn.Dropout(), nn.Linear(32, num_classes))
    return model


def small_resnet50(num_classes: int) -> nn.Module:
    """torchvision's ResNet of Bottlenecks (the preset's modules), fewer and narrower blocks."""
    return torchvision.models.resnet.ResNet(Bottleneck, [2, 1, 1, 1], num_classes=num_classes, width_per_group=16)


def small_densenet121(num_classes: int) -> nn.Module:
    """The densenet121 preset's class (four dense blocks, three transitions), smaller."""
    return DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16, bn_size=2,
                    num_classes=num_classes)


def small_darts(num_classes: int) -> nn.Module:
    """The darts preset's class and genotype, 8 channels and 5 cells."""
    return NetworkImageNet(8, num_classes, 5, DARTS_V2)


# ----------------------------------------------------------------------------------------------
# The authors' forwards. ``gates[k]`` multiplies their k-th mask's input: sigmoid(m) of the
# task's logits for the masked network, ones for the original one (their finding_masks=False
# loads ones into every mask). Returns (logits, the recorded mask outputs).


class _Masks:
    def __init__(self, gates):
        self.gates, self.recorded = gates, []

    def __call__(self, x):  # Mask.forward: sigmoid(self.mask) * x; the hook keeps the output
        out = self.gates[len(self.recorded)].view(1, -1, *[1] * (x.dim() - 2)) * x
        self.recorded.append(out)
        return out


def authors_vgg16(model, x, gates):
    """models/imagenet/vgg16.py: make_layers over cfgs['D'] (conv, ReLU(inplace=True); 'M';
    'msk'), then avgpool, self.mask, flatten, classifier."""
    mask, convs = _Masks(gates), iter(m for m in model.features if isinstance(m, nn.Conv2d))
    for v in AUTHORS_VGG16_CFG:
        if v == "M":
            x = F.max_pool2d(x, kernel_size=2, stride=2)
        elif v == "msk":
            x = mask(x)
        else:
            x = F.relu(next(convs)(x), inplace=True)
    x = mask(model.avgpool(x))
    return model.classifier(torch.flatten(x, 1)), mask.recorded


def authors_resnet50(model, x, gates):
    """models/imagenet/resnet50.py: ResNet._forward (mask after the stem's max-pool) and
    Bottleneck.forward (mask after the residual add and the in-place ReLU)."""
    mask = _Masks(gates)
    x = mask(model.maxpool(F.relu(model.bn1(model.conv1(x)), inplace=True)))
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            identity = x
            out = F.relu(block.bn1(block.conv1(x)), inplace=True)
            out = F.relu(block.bn2(block.conv2(out)), inplace=True)
            out = block.bn3(block.conv3(out))
            if block.downsample is not None:
                identity = block.downsample(x)
            out += identity
            out = F.relu(out, inplace=True)
            x = mask(out)
    return model.fc(torch.flatten(model.avgpool(x), 1)), mask.recorded


def authors_densenet121(model, x, gates):
    """models/imagenet/densenet121.py: features = conv0, norm0, relu0, pool0, mask0; each dense
    block, then (but after the last) mask<i> and the transition (norm, relu, conv, pool, mask);
    norm5, relu5 (in place), mask5, pool5; then flatten and the classifier."""
    f, mask = model.features, _Masks(gates)
    x = mask(f.pool0(F.relu(f.norm0(f.conv0(x)), inplace=True)))
    blocks = [name for name, _ in f.named_children() if name.startswith("denseblock")]
    for i, name in enumerate(blocks):
        x = getattr(f, name)(x)  # _DenseBlock.forward: the same in both
        if i != len(blocks) - 1:
            x = mask(x)
            t = getattr(f, f"transition{i + 1}")
            x = mask(t.pool(t.conv(F.relu(t.norm(x), inplace=True))))
    x = mask(F.relu(f.norm5(x), inplace=True))
    x = F.adaptive_avg_pool2d(x, (1, 1))
    return model.classifier(torch.flatten(x, 1)), mask.recorded


def authors_darts(model, x, gates):
    """models/imagenet/darts.py: NetworkImageNet.forward: stem0, mask0, stem1 (whose first
    module, nn.ReLU(inplace=True), overwrites mask0's output), mask1, then s0, s1 = s1,
    cell(s0, s1) with each cell's output masked (Cell.forward: mask(cat(states)))."""
    mask = _Masks(gates)
    s0 = mask(model.stem0(x))
    s1 = model.stem1[2](model.stem1[1](F.relu(s0, inplace=True)))  # stem1 = ReLU(inplace=True), conv, BN
    s1 = mask(s1)
    for cell in model.cells:
        s0, s1 = s1, mask(cell(s0, s1))
    out = model.global_pooling(s1)
    return model.classifier(out.view(out.size(0), -1)), mask.recorded


FAMILIES = {
    "vgg16": (small_vgg16, authors_vgg16, 32),
    "resnet50": (small_resnet50, authors_resnet50, 32),
    "densenet121": (small_densenet121, authors_densenet121, 32),
    "darts": (small_darts, authors_darts, 32),
}
# The gate points whose recorded tensor is relu of the gated output (the authors' objective).
RELU_POINTS = {"vgg16": [], "resnet50": [], "densenet121": ["features.norm5"], "darts": ["stem0"]}


def authors_terms(model, forward, x, labels, logits_t, beta):
    """findpath.py's loss for one task on its batch (x, labels), over the samples the original
    network gets right: ``(m, per-mask MSEs, loss)`` with their graph (``m``: the task's logits
    per mask, leaves), or None where they skip the batch (no correct sample)."""
    with torch.no_grad():
        orig_class, orig_activs = forward(model, x, [torch.ones_like(m) for m in logits_t])
    m = [t.detach().clone().requires_grad_() for t in logits_t]
    mask_class, mask_activs = forward(model, x, [torch.sigmoid(t) for t in m])
    index = (torch.argmax(orig_class, 1) == labels).nonzero()
    if len(index) == 0:
        return None
    mses = [F.mse_loss(a[index, ...], o[index, ...].detach()) for a, o in zip(mask_activs, orig_activs)]
    loss_activ = (F.cross_entropy(mask_class, labels) + sum(mses)) / (1.0 * len(mask_activs))
    loss_mask = sum(torch.mean(torch.sigmoid(t) ** 2) for t in m) / (1.0 * len(mask_activs))
    return m, mses, loss_activ + beta * loss_mask


def authors_step(model, forward, x, labels, logits_t, beta, lr):
    """findpath.py's update for one task on its batch: ``m - lr * F.normalize(grad)`` per mask
    (their masks are (1, C, 1, 1): F.normalize's dim 1 is the channels)."""
    m, _, loss = authors_terms(model, forward, x, labels, logits_t, beta)
    grads = torch.autograd.grad(loss, m)
    return [t.detach() - lr * F.normalize(g.view(1, -1, 1, 1)).view(-1) for t, g in zip(m, grads)]


# ----------------------------------------------------------------------------------------------


def _setup(name, dtype):
    build, forward, size = FAMILIES[name]
    torch.manual_seed(0)
    model = _randomise_batchnorm(build(5)).to(dtype)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(10, 3, size, size, generator=gen).to(dtype)
    with torch.no_grad():
        predicted = model(x).argmax(1)
    # Task 0: samples 0-4, task 1: samples 5-9; in each, the samples marked False are given a
    # label the network does not predict (a mix of correct and wrong samples in every task).
    right = torch.tensor([True, False, True, False, False, True, True, False, True, True])
    labels = torch.where(right, predicted, (predicted + 1) % 5)
    task_ids = torch.tensor([0] * 5 + [1] * 5)
    return model, forward, x, labels, task_ids, right


@pytest.mark.parametrize("fuse", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_objective_at_every_gate_point_is_the_authors(name, fuse):
    """nad_loss on what nad-ext records at each of the preset's gate points equals the MSE the
    authors take on what their model records there (after the ReLU where theirs is), per task,
    forward and gradient; so do the whole loss and its gradient."""
    dtype = torch.float64
    model, forward, x, labels, task_ids, right = _setup(name, dtype)
    spec = models.get_spec(name)
    gated = GatedModel(model, spec.gate_points(model), 2, x[:1], fuse=fuse)
    assert [p.name for p in gated.gate_points if p.record == "relu"] == RELU_POINTS[name]
    if fuse and name == "vgg16":
        assert gated.fused_points  # the fast path's masked_conv2d is what runs
    with torch.no_grad():
        out, original = gated.original(x)
        correct = out.argmax(1) == labels
    assert torch.equal(correct, right)
    masked_out, masked = gated(x, task_ids, record=True)
    logits = list(gated.logits)
    axes = [p.channel_axis for p in gated.gate_points]
    terms = nad_loss(masked_out, labels, masked, original, correct, task_ids, logits, spec.beta, axes)
    grads = torch.autograd.grad(terms.total, logits, retain_graph=True)
    point_mse = [nad_loss(masked_out, labels, [a], [o], correct, task_ids, [m], spec.beta).mse
                 for a, o, m in zip(masked, original, logits)]
    point_grads = [torch.autograd.grad(mse.sum(), logits, retain_graph=True, materialize_grads=True)
                   for mse in point_mse]
    # The network runs in float64; nad_loss adds its terms in float32 (and the fused path folds
    # BatchNorm into the convolutions).
    tol = dict(rtol=2e-6, atol=1e-8) if not fuse else dict(rtol=1e-5, atol=1e-7)
    for t in range(2):
        sel = task_ids == t
        m_ref, ref_mses, ref_loss = authors_terms(model, forward, x[sel], labels[sel],
                                                  [m[t].detach().double() for m in logits], spec.beta)
        for l, point in enumerate(gated.gate_points):
            torch.testing.assert_close(point_mse[l][t].double(), ref_mses[l].detach(), **tol,
                                       msg=f"{name}: MSE at gate point {point.name!r}, task {t}")
            # the gradient of that point's MSE term alone, with respect to every gate point
            ref_grads = torch.autograd.grad(ref_mses[l], m_ref, retain_graph=True, materialize_grads=True)
            for k, (g, gr) in enumerate(zip(point_grads[l], ref_grads)):
                torch.testing.assert_close(g[t].double(), gr, **tol,
                                           msg=f"{name}: gradient of the MSE at {point.name!r} w.r.t. gate point {k}")
        torch.testing.assert_close(terms.loss[t].double(), ref_loss.detach(), **tol)
        for l, (g, gr) in enumerate(zip(grads, torch.autograd.grad(ref_loss, m_ref))):
            torch.testing.assert_close(g[t].double(), gr, **tol, msg=f"{name}: loss gradient at gate point {l}")


@pytest.mark.parametrize("fuse", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_one_training_step_is_the_authors(name, fuse):
    """train_step (the trainer's choice of the correct samples, the loss, the normalised update)
    on a batch of two tasks moves every gate as findpath.py moves it, task by task."""
    model, forward, x, labels, task_ids, _ = _setup(name, torch.float32)
    reference = copy.deepcopy(model).double()
    spec = models.get_spec(name)
    gated = GatedModel(model, spec.gate_points(model), 2, x[:1], fuse=fuse)
    before = [m.detach().clone() for m in gated.logits]
    train_step(gated, x, labels, task_ids, torch.tensor([0, 1]), NADConfig(beta=spec.beta))
    for t in range(2):
        sel = task_ids == t
        updated = authors_step(reference, forward, x[sel].double(), labels[sel],
                                        [m[t].double() for m in before], spec.beta, 0.1)
        for l, (m, u) in enumerate(zip(gated.logits, updated)):
            torch.testing.assert_close(m[t].detach().double(), u, rtol=1e-5, atol=1e-5,
                                       msg=f"{name}: gate point {gated.gate_points[l].name}, task {t}")
