"""Residual networks: torchvision's ResNet50 with the paper's gate points, and the zoo's small
ResNet (``zoo_residual``)."""
from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from nad_ext.models.registry import ModelSpec, register


def resnet_points(model: nn.Module) -> list[str]:
    """After the stem max-pool, then the output of every residual block."""
    layers = [name for name in ("layer1", "layer2", "layer3", "layer4") if hasattr(model, name)]
    return ["maxpool"] + [f"{layer}.{i}" for layer in layers for i in range(len(getattr(model, layer)))]


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


register(ModelSpec("resnet50", "residual", lambda n: torchvision.models.resnet50(weights=None, num_classes=n),
                   resnet_points, 0.02, 224))
register(ModelSpec("zoo_residual", "residual", SmallResNet, resnet_points, 0.02, 64))
