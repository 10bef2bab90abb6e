"""The paper's transforms (METHOD.md): RandomResizedCrop + flip + ImageNet normalisation for
training, Resize + CenterCrop for evaluation. Every random draw of the training transform comes
from an explicit ``torch.Generator`` (:func:`train_crop_params`), so that runs are reproducible
whatever the global RNG does and every input pipeline crops the same regions."""
from __future__ import annotations

import math

import torch
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalise(image: torch.Tensor) -> torch.Tensor:
    """uint8-valued (3, H, W) -> float32 ``(x / 255 - mean) / std`` with the ImageNet statistics."""
    mean = torch.tensor(IMAGENET_MEAN).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(-1, 1, 1)
    return (image.float() / 255.0 - mean) / std


def random_resized_crop_params(height: int, width: int, scale: tuple[float, float],
                               ratio: tuple[float, float], generator: torch.Generator) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` with every draw taken from ``generator``.

    Returns (top, left, height, width) of the crop; 10 tries, then the central-crop fallback.
    """
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0].item(), log_ratio[1].item(),
                                                   generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, (1,), generator=generator).item())
            j = int(torch.randint(0, width - w + 1, (1,), generator=generator).item())
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


TRAIN_SCALE = (0.08, 1.25)


def train_crop_params(height: int, width: int, generator: torch.Generator,
                      scale: tuple[float, float] = TRAIN_SCALE) -> tuple[int, int, int, int, bool]:
    """The random draws of :func:`train_transform` for an image of ``height`` x ``width``:
    (top, left, height, width) of the RandomResizedCrop box, then whether to flip. Every input
    pipeline takes its draws from here, in this order, so that all of them crop the same regions."""
    top, left, h, w = random_resized_crop_params(height, width, scale, (3.0 / 4.0, 4.0 / 3.0), generator)
    return top, left, h, w, torch.rand(1, generator=generator).item() < 0.5


def train_transform(image: torch.Tensor, size: int, generator: torch.Generator,
                    scale: tuple[float, float] = TRAIN_SCALE) -> torch.Tensor:
    """The paper's training augmentation: RandomResizedCrop(size, scale, ratio=(3/4, 4/3)), random
    horizontal flip (p=0.5), ImageNet normalisation. All randomness comes from ``generator``.

    ``image``: uint8 (3, H, W); returns float32 (3, size, size).
    """
    top, left, h, w, flip = train_crop_params(image.shape[-2], image.shape[-1], generator, scale)
    out = TF.resized_crop(image, top, left, h, w, [size, size], antialias=True)
    if flip:
        out = TF.horizontal_flip(out)
    return normalise(out)


def eval_transform(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize(round(size * 256 / 224)) + CenterCrop(size) + ImageNet normalisation (float32)."""
    out = TF.resize(image, [round(size * 256 / 224)], antialias=True)
    return normalise(TF.center_crop(out, [size, size]))

