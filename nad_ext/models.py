"""Model registry: the paper's networks with their gate-point presets, and the built-in zoo.

A :class:`ModelSpec` is data: how to build the (untrained) network, which modules are its gate
points, the paper's sparsity weight beta and the input size. :func:`load_model` builds a
registry model and loads a weights file (torch state dict or safetensors). The zoo holds one
small network per connection type (plain, residual, dense, NAS) for 64x64 generated images;
:func:`load_zoo` trains them on first use and caches the weights as safetensors, with a
checksum per tensor (:mod:`nad_ext.storage`).
"""
from __future__ import annotations

import json
import pickle
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock
from tqdm.auto import tqdm

from nad_ext import darts
from nad_ext import progress as nad_progress
from nad_ext.data import ImageSet, eval_transform, train_transform
from nad_ext.storage import CorruptFileError, load_safetensors, save_safetensors


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: ``build(num_classes)`` gives an untrained model, ``gate_points(model)``
    its gate-point module names in forward order, ``beta`` the sparsity weight."""

    name: str
    connection: str  # "plain" | "residual" | "dense" | "nas"
    build: Callable[[int], nn.Module]
    gate_points: Callable[[nn.Module], list[str]]
    beta: float
    input_size: int


# ----------------------------------------------------------------------------------------------
# Gate-point presets (METHOD.md)

# VGG16: after each conv+ReLU; for the last conv of blocks 1-4 after the max-pool instead;
# conv5_3 not gated; the 13th point after the adaptive average pool. 4,224 channels.
VGG16_GATE_POINTS = ["features.1", "features.4", "features.6", "features.9", "features.11",
                     "features.13", "features.16", "features.18", "features.20", "features.23",
                     "features.25", "features.27", "avgpool"]


def _resnet_points(model: nn.Module) -> list[str]:
    """After the stem max-pool, then the output of every residual block."""
    layers = [name for name in ("layer1", "layer2", "layer3", "layer4") if hasattr(model, name)]
    return ["maxpool"] + [f"{layer}.{i}" for layer in layers for i in range(len(getattr(model, layer)))]


def _densenet_points(model: nn.Module) -> list[str]:
    """METHOD.md's "after the stem, after each dense block, inside each transition (its output),
    and after the final features", read as: the stem (pool0), every dense block but the last,
    every transition's output, and the final features (the last dense block + norm5; the last
    dense block itself is not gated separately since norm5 follows it directly).
    DenseNet121: pool0, denseblock1, transition1, denseblock2, transition2, denseblock3,
    transition3, norm5 (8 points)."""
    names = [name for name, _ in model.features.named_children()]
    blocks = [n for n in names if n.startswith("denseblock")]
    keep = [n for n in names if n == "pool0" or n.startswith("transition") or n in blocks[:-1]]
    return [f"features.{n}" for n in keep] + ["features.norm5"]


def _darts_points(model: nn.Module) -> list[str]:
    """After each of the two stems and after each cell's concatenated output."""
    return ["stem0", "stem1"] + [f"cells.{i}" for i in range(len(model.cells))]


def _plain_points(model: nn.Module) -> list[str]:
    """VGG-style: after every conv's ReLU, except that a ReLU directly followed by a max-pool is
    gated after the pool (same channels); the last conv's ReLU is left to the average pool."""
    mods = list(model.features.named_children())
    points = []
    for k, (name, module) in enumerate(mods):
        nxt = mods[k + 1][1] if k + 1 < len(mods) else None
        if isinstance(module, nn.ReLU) and not isinstance(nxt, nn.MaxPool2d) and k + 1 < len(mods):
            points.append(f"features.{name}")
        elif isinstance(module, nn.MaxPool2d) and k + 1 < len(mods):
            points.append(f"features.{name}")
    return points + ["avgpool"]


# ----------------------------------------------------------------------------------------------
# The zoo: small networks for 64x64 images


class PlainNet(nn.Module):
    """A small VGG-style network: blocks of conv+BN+ReLU separated by max-pools."""

    def __init__(self, num_classes: int, widths=((16,), (24,), (32, 32), (64, 64))):
        super().__init__()
        layers, c_in = [], 3
        for b, block in enumerate(widths):
            for c_out in block:
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
                c_in = c_out
            if b + 1 < len(widths):
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class SmallResNet(nn.Module):
    """A small ResNet of BasicBlocks with torchvision's module names (conv1 ... layer3, fc);
    the stem (3x3 stride-2 conv, max-pool) reduces by 4 like torchvision's."""

    def __init__(self, num_classes: int, widths=(16, 32, 64), blocks=(2, 2, 2)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(2)
        c_in = widths[0]
        for i, (width, count) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            layer = []
            for k in range(count):
                down = None
                if k == 0 and (stride != 1 or c_in != width):
                    down = nn.Sequential(nn.Conv2d(c_in, width, 1, stride, bias=False), nn.BatchNorm2d(width))
                layer.append(BasicBlock(c_in, width, stride if k == 0 else 1, down))
                c_in = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class DenseNet(torchvision.models.DenseNet):
    """torchvision's DenseNet (same modules and weights) whose final ReLU is out-of-place, so
    that a gate on ``features.norm5`` is not overwritten in place by the classifier's ReLU."""

    def forward(self, x):
        out = nn.functional.adaptive_avg_pool2d(nn.functional.relu(self.features(x)), 1)
        return self.classifier(torch.flatten(out, 1))


def _densenet121(num_classes: int) -> nn.Module:
    """DenseNet121 with torchvision's configuration and parameter names."""
    return DenseNet(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64, num_classes=num_classes)


def _small_densenet(num_classes: int) -> nn.Module:
    """A small DenseNet: growth 8, blocks (3, 3, 3), a 3x3 stride-2 stem conv and a 2x2 max-pool."""
    model = DenseNet(growth_rate=8, block_config=(3, 3, 3), num_init_features=16, bn_size=4,
                     num_classes=num_classes)
    model.features.conv0 = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
    nn.init.kaiming_normal_(model.features.conv0.weight)
    model.features.pool0 = nn.MaxPool2d(2)
    return model


# ----------------------------------------------------------------------------------------------
# Registry

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec("vgg16", "plain", lambda n: torchvision.models.vgg16(weights=None, num_classes=n),
                  lambda model: list(VGG16_GATE_POINTS), 4.5, 224),
        ModelSpec("resnet50", "residual", lambda n: torchvision.models.resnet50(weights=None, num_classes=n),
                  _resnet_points, 0.02, 224),
        ModelSpec("densenet121", "dense", _densenet121,
                  _densenet_points, 0.02, 224),
        ModelSpec("darts", "nas", lambda n: darts.NetworkImageNet(48, n, 14, darts.DARTS_V2),
                  _darts_points, 0.45, 224),
        # The zoo. Betas start from the paper's value for the corresponding ImageNet network.
        ModelSpec("zoo_plain", "plain", PlainNet, _plain_points, 4.5, 64),
        ModelSpec("zoo_residual", "residual", SmallResNet, _resnet_points, 0.02, 64),
        ModelSpec("zoo_dense", "dense", _small_densenet, _densenet_points, 0.02, 64),
        ModelSpec("zoo_nas", "nas", lambda n: darts.NetworkSmall(12, n, 5, darts.DARTS_V2),
                  _darts_points, 0.45, 64),
    ]
}
ZOO = [name for name in MODELS if name.startswith("zoo_")]
ZOO_EPOCHS = {"zoo_plain": 8, "zoo_residual": 8, "zoo_dense": 8, "zoo_nas": 8}


def get_spec(name: str) -> ModelSpec:
    """The registry entry ``name``; ValueError listing the known names otherwise."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    return MODELS[name]


# ----------------------------------------------------------------------------------------------
# Weights files


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: a safetensors file, or a torch.save'd state dict (also
    inside a checkpoint dict under "state_dict" or "model"), loaded without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    invalid = f"weights file {path} is not a valid state dict"
    kind = "safetensors file" if path.suffix == ".safetensors" else "file written by torch.save"
    # PyTorch's message for a refused pickle advises weights_only=False, i.e. running the file's
    # code: it is not passed on (``from None``); weights files are only ever read as tensors.
    try:
        if path.suffix == ".safetensors":
            state = load_safetensors(path, "weights file")[0]  # checked against its checksums, if any
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except CorruptFileError as err:  # a safetensors file whose checksums do not match: say which tensor
        raise ValueError(f"{invalid}: {err}") from None
    except Exception as err:
        if isinstance(err, pickle.UnpicklingError) and "Unsupported global" in str(err):
            raise ValueError(f"{invalid}: it holds Python objects, not only tensors (a whole pickled model?); "
                             "save model.state_dict() instead") from None
        raise ValueError(f"{invalid}: the file is damaged or not a {kind}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{invalid}: it holds something other than a dict of tensors")
    # DataParallel checkpoints prefix every key with "module."; DARTS's carry an auxiliary head.
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.startswith("auxiliary_head.")}


def _check_compatible(model: nn.Module, state: dict[str, torch.Tensor], name: str, path: Path) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if not (missing or unexpected or mismatched):
        return
    lines = [f"weights file {path} does not fit model {name!r}:"]
    show = lambda keys: ", ".join(keys[:5]) + (f" ... ({len(keys)} in all)" if len(keys) > 5 else "")  # noqa: E731
    if missing:
        lines.append(f"  missing keys: {show(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys: {show(unexpected)}")
    if mismatched:
        shapes = [f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})" for k in mismatched]
        lines.append(f"  shape mismatches: {show(shapes)}")
        head = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1:]
        if head and f"{head[0]}.weight" in mismatched:
            lines.append(f"  (the classifier {head[0]} has {state[head[0] + '.weight'].shape[0]} outputs in "
                         f"the file, {expected[head[0] + '.weight'].shape[0]} in the model: pass num_classes)")
    raise ValueError("\n".join(lines))


def load_model(name: str, weights: str | Path | None = None, num_classes: int = 1000) -> nn.Module:
    """Builds registry model ``name``, loads ``weights`` if given, and returns it frozen: in
    eval mode, ``requires_grad`` False on every parameter.

    ``weights``: a state dict saved with ``torch.save`` (.pt/.pth, or a checkpoint dict with a
    "state_dict"/"model" entry) or a .safetensors file. A missing file raises FileNotFoundError;
    a file for another architecture (or another ``num_classes``) raises ValueError listing the
    missing, unexpected and mismatched keys.
    """
    spec = get_spec(name)
    model = spec.build(num_classes)
    if weights is not None:
        state = read_state_dict(weights)
        _check_compatible(model, state, name, Path(weights))
        model.load_state_dict(state)
    return _freeze(model)


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------------------------
# Zoo training and cache


def evaluate(model: nn.Module, images: ImageSet, size: int, batch_size: int = 250) -> float:
    """Top-1 accuracy of ``model`` on ``images`` with the evaluation transform."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            idx = list(range(start, min(start + batch_size, len(images))))
            x = torch.stack([eval_transform(images.load(i), size) for i in idx])
            y = torch.tensor([images.labels[i] for i in idx])
            correct += (model(x).argmax(1) == y).sum().item()
    return correct / max(len(images), 1)


def train_zoo_model(name: str, train: ImageSet, val: ImageSet, epochs: int, seed: int = 0,
                    progress: bool = True) -> tuple[nn.Module, float]:
    """Trains zoo model ``name`` from scratch on ``train``; returns it frozen (eval mode) with its
    validation accuracy on ``val``.

    Adam with a one-cycle learning rate, batch 64, light augmentation (the training transform
    with crops of 35-100% of the image, and flips); initialisation from ``torch.manual_seed(seed)``,
    the augmentation and batch order from a generator seeded with ``seed``.
    """
    spec = get_spec(name)
    torch.manual_seed(seed)
    model = spec.build(len(train.classes)).to(memory_format=torch.channels_last)  # faster on CPU
    generator = torch.Generator().manual_seed(seed)
    batch_size = 64
    steps = epochs * -(-len(train) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=5e-3, total_steps=max(steps, 1),
                                                   pct_start=0.25)
    loss_fn = nn.CrossEntropyLoss()
    bar = nad_progress.bar(steps, f"training {name}", unit="step", enabled=progress)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            x = torch.stack([train_transform(train.load(i), spec.input_size, generator, scale=(0.35, 1.0))
                             for i in idx]).contiguous(memory_format=torch.channels_last)
            y = torch.tensor([train.labels[i] for i in idx])
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model = model.to(memory_format=torch.contiguous_format)
    accuracy = evaluate(model, val, spec.input_size)
    return _freeze(model), accuracy


def _save_atomic(model: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    save_safetensors({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, path, metadata)


def _load_cached(name: str, path: Path, num_classes: int, want: dict[str, str]) -> tuple[nn.Module, float] | None:
    """The cached model if ``path`` is a readable cache file made with the settings ``want``;
    a damaged file (its tensors checked against their checksums) is reported, then retrained."""
    if not path.is_file():
        return None
    try:
        state, meta, verified = load_safetensors(path, "zoo cache")
        if any(meta.get(k) != v for k, v in want.items()):
            return None
        if not verified:
            warnings.warn(f"zoo cache {path} has no checksums (written by an earlier nad-ext): loaded without "
                          "verifying its tensors", stacklevel=3)
        model = get_spec(name).build(num_classes)
        _check_compatible(model, state, name, path)
        model.load_state_dict(state)
        return _freeze(model), float(meta["val_accuracy"])
    except Exception as err:  # noqa: BLE001 - damaged or foreign file: retrain
        warnings.warn(f"{err}: training {name} again", stacklevel=3)
        return None


def load_zoo(cache_dir: str | Path, train: ImageSet, val: ImageSet, names: list[str] | None = None,
             progress: bool = True, epochs: dict[str, int] | int | None = None,
             seed: int = 0) -> dict[str, tuple[nn.Module, float]]:
    """The zoo models trained on ``train``, each with its validation accuracy on ``val``.

    A model is trained on first use and cached as ``cache_dir/<name>.safetensors`` (weights,
    plus metadata: accuracy, data set names, epochs, seed, torch version); later calls load the
    cache. A cache file that is unreadable, or made for other data / epochs / seed, is retrained.
    ``epochs``: one count for all models, a dict per model, or None for :data:`ZOO_EPOCHS`.
    """
    names = list(ZOO) if names is None else list(names)
    for name in names:
        if get_spec(name) and name not in ZOO:
            raise ValueError(f"{name!r} is not a zoo model; the zoo: {', '.join(ZOO)}")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    result = {}
    for name in names:
        n_epochs = epochs if isinstance(epochs, int) else (epochs or ZOO_EPOCHS).get(name, ZOO_EPOCHS[name])
        want = {"format": "nad-ext.zoo/1", "model": name, "dataset": train.name, "val_dataset": val.name,
                "classes": json.dumps(train.classes), "epochs": str(n_epochs), "seed": str(seed)}
        path = cache_dir / f"{name}.safetensors"
        cached = _load_cached(name, path, len(train.classes), want)
        if cached is None:
            start = time.perf_counter()
            model, accuracy = train_zoo_model(name, train, val, n_epochs, seed, progress)
            meta = dict(want, val_accuracy=repr(accuracy), torch=torch.__version__,
                        train_seconds=f"{time.perf_counter() - start:.1f}")
            _save_atomic(model, path, meta)
            cached = (model, accuracy)
            if progress:
                tqdm.write(f"{name}: val accuracy {accuracy:.3f} ({meta['train_seconds']} s), cached in {path}")
        result[name] = cached
    return result
