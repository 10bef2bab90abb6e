"""Real data for the tests and the study (issue 27): scikit-learn's digits (1,797 8x8 grayscale
scans of handwritten digits, 10 classes, shipped inside the scikit-learn wheel: nothing is
downloaded) as :class:`nad_ext.data.ImageSet` splits, and a small plain CNN trained on them in a
few seconds on the CPU.

- :func:`digit_sets`: RGB uint8 images upscaled to ``size`` x ``size`` (bilinear), split per class
  with a fixed seed (``val_share`` of each class to validation).
- :class:`DigitsCNN`: three conv-BN-ReLU blocks (16, 32, 64 channels), global average pool, linear;
  its gate points are the blocks' ReLUs (:data:`GATE_POINTS`).
- :func:`train_digits_cnn`: trains it, seeded, on the images as the analyses see them
  (:func:`nad_ext.data.load_batch`'s evaluation transform: the ImageNet normalisation), with
  small random shifts (optionally NAD's training crops too); returns the model (eval mode,
  frozen) and its validation accuracy.
- :func:`digits_cnn`: both at once, memoised in the process (nothing is written to disk).

Used by python_tests/test_real_data.py and benchmarks/eval_real_data.py (which imports this file
from python_tests/).
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn

from nad_ext.data import TRAIN_SCALE, ImageSet, load_batch, train_transform

GATE_POINTS = ["block1.2", "block2.2", "block3.2"]  # the ReLUs of the three blocks
IMAGE_SIZE = 32


def digit_sets(size: int = IMAGE_SIZE, val_share: float = 0.2, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """(train, val): the digits as RGB uint8 (N, 3, size, size), classes "0" to "9"; per class a
    seeded ``val_share`` of the images goes to val."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    train_idx, val_idx = [], []
    for c in range(10):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_val = round(val_share * len(idx))
        val_idx += idx[:n_val].tolist()
        train_idx += idx[n_val:].tolist()
    train_idx, val_idx = sorted(train_idx), sorted(val_idx)
    classes = [str(c) for c in range(10)]
    name = f"sklearn-digits-{size}px-seed{seed}"
    train = ImageSet(classes, labels[train_idx].tolist(), f"{name}-train", images=x[train_idx])
    val = ImageSet(classes, labels[val_idx].tolist(), f"{name}-val", images=x[val_idx])
    return train, val


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class DigitsCNN(nn.Module):
    """Three conv-BN-ReLU blocks (max-pooled between them), global average pool, linear."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        self.block1 = _block(3, widths[0])
        self.pool1 = nn.MaxPool2d(2)
        self.block2 = _block(widths[0], widths[1])
        self.pool2 = nn.MaxPool2d(2)
        self.block3 = _block(widths[1], widths[2])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)

    def forward(self, x):
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        return self.fc(self.pool(self.block3(x)).flatten(1))


def _shift(x: torch.Tensor, gen: torch.Generator, pixels: int) -> torch.Tensor:
    """Each image moved by up to ``pixels`` in each direction (edge padding), seeded."""
    if pixels == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (pixels,) * 4, mode="replicate")
    dy = torch.randint(0, 2 * pixels + 1, (n,), generator=gen).tolist()
    dx = torch.randint(0, 2 * pixels + 1, (n,), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i]: dy[i] + h, dx[i]: dx[i] + w] for i in range(n)])


@torch.no_grad()
def accuracy(model: nn.Module, images: ImageSet, size: int = IMAGE_SIZE, batch_size: int = 256) -> float:
    """Top-1 accuracy on ``images`` through the evaluation transform."""
    model.eval()
    hits = 0
    for lo in range(0, len(images), batch_size):
        x, y = load_batch(images, list(range(lo, min(lo + batch_size, len(images)))), size)
        hits += int((model(x).argmax(1) == y).sum())
    return hits / len(images)


def train_digits_cnn(train: ImageSet, val: ImageSet, *, epochs: int = 10, seed: int = 0, size: int = IMAGE_SIZE,
                     batch_size: int = 64, lr: float = 3e-3, shift: int = 3, crops: bool = False,
                     crop_scale: tuple[float, float] = TRAIN_SCALE,
                     model: nn.Module | None = None) -> tuple[nn.Module, float]:
    """Trains ``model`` (default :class:`DigitsCNN`) on ``train`` with Adam and a one-cycle
    schedule, seeded (weights, order, shifts and crops), on the evaluation transform's images moved
    by up to ``shift`` pixels; with ``crops`` every other batch is NAD's own training crops instead
    (:func:`nad_ext.data.train_transform` at ``crop_scale``). Returns the model frozen in eval
    mode, and its accuracy on val. (At the defaults, 10 epochs: 98.1% on val in 12-18 s on one
    loaded core; with ``crops``: 93-94%, and 58-65% on NAD's crops against 50% without.)"""
    torch.manual_seed(seed)
    model = model if model is not None else DigitsCNN(len(train.classes))
    x_all, y_all = load_batch(train, list(range(len(train))), size)  # the evaluation transform
    gen = torch.Generator().manual_seed(seed)
    crop_gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * -(-len(train) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=gen)
        for lo in range(0, len(order), batch_size):
            idx = order[lo: lo + batch_size]
            if crops and lo // batch_size % 2:  # every other batch: NAD's own training crops
                x = torch.stack([train_transform(train.load(i), size, crop_gen, crop_scale) for i in idx.tolist()])
            else:
                x = _shift(x_all[idx], gen, shift)
            loss = F.cross_entropy(model(x), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, accuracy(model, val, size)


@contextlib.contextmanager
def threads(n: int | None):
    """torch.set_num_threads(n) inside the block (None: unchanged), the previous count after it.
    On a loaded 2-core machine one thread is several times faster for these small tensors than
    two (measured: a training step of the CNN 0.07 s against 0.7 s)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.lru_cache(maxsize=None)
def digits_cnn(seed: int = 0, epochs: int = 10) -> tuple[ImageSet, ImageSet, nn.Module, float]:
    """(train, val, model, validation accuracy), made once per process and seed."""
    train, val = digit_sets(seed=seed)
    with threads(1):
        model, acc = train_digits_cnn(train, val, epochs=epochs, seed=seed)
    return train, val, model, acc
