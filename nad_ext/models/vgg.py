"""Plain (VGG-style) networks: torchvision's VGG16 with the paper's gate points, and the zoo's
small plain network (``zoo_plain``)."""
from __future__ import annotations

import torch
import torchvision
from torch import nn

from nad_ext.models.registry import ModelSpec, register

# VGG16 (METHOD.md): after each conv+ReLU; for the last conv of blocks 1-4 after the max-pool
# instead; conv5_3 not gated; the 13th point after the adaptive average pool. 4,224 channels.
VGG16_GATE_POINTS = ["features.1", "features.4", "features.6", "features.9", "features.11",
                     "features.13", "features.16", "features.18", "features.20", "features.23",
                     "features.25", "features.27", "avgpool"]


def plain_points(model: nn.Module) -> list[str]:
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


class PlainNet(nn.Module):
    """A small VGG-style network for 64x64 images: blocks of conv+BN+ReLU separated by max-pools."""

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


register(ModelSpec("vgg16", "plain", lambda n: torchvision.models.vgg16(weights=None, num_classes=n),
                   lambda model: list(VGG16_GATE_POINTS), 4.5, 224))
# The zoo's betas start from the paper's value for the corresponding ImageNet network.
register(ModelSpec("zoo_plain", "plain", PlainNet, plain_points, 4.5, 64))
