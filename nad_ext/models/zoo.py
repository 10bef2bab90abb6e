"""The built-in zoo: one small network per connection type (plain, residual, dense, NAS, and a
vision transformer) for the 64x64 generated images, trained on first use and cached as
safetensors with a checksum per tensor (``<cache>/<name>.safetensors``, format ``nad-ext.zoo/1``)."""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from nad_ext._utils import progress as nad_progress
from nad_ext._utils.storage import load_safetensors
from nad_ext.data import ImageSet, eval_transform, train_transform
from nad_ext.models.registry import get_spec
from nad_ext.models.weights import check_compatible, freeze, save_weights

ZOO_EPOCHS = {"zoo_plain": 8, "zoo_residual": 8, "zoo_dense": 8, "zoo_nas": 8, "zoo_vit": 6}
ZOO = list(ZOO_EPOCHS)  # the zoo's networks, in the demo's order


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
    return freeze(model), accuracy


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
        check_compatible(model, state, name, path)
        model.load_state_dict(state)
        return freeze(model), float(meta["val_accuracy"])
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
            save_weights(model, path, meta)
            cached = (model, accuracy)
            if progress:
                tqdm.write(f"{name}: val accuracy {accuracy:.3f} ({meta['train_seconds']} s), cached in {path}")
        result[name] = cached
    return result
