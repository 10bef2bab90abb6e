"""Dense networks: DenseNet121 (torchvision's, with an out-of-place final ReLU) with the
paper's gate points, and the zoo's small DenseNet (``zoo_dense``)."""
from __future__ import annotations

import torch
import torchvision
from torch import nn

from nad_ext.models.registry import ModelSpec, register


def densenet_points(model: nn.Module) -> list[str]:
    """METHOD.md's "after the stem, after each dense block, inside each transition (its output),
    and after the final features", as the authors' densenet121.py places them: the stem (pool0),
    every dense block but the last, every transition's output, and the final features (the
    last dense block + norm5 + the final ReLU; the last dense block itself is not gated
    separately). DenseNet121: pool0, denseblock1, transition1, denseblock2, transition2,
    denseblock3, transition3, norm5 (8 points).

    The authors gate the final features after the final ReLU (their ``relu5``, then ``mask5``);
    torchvision applies that ReLU in ``forward``, after ``features``, so the gate sits on
    ``norm5`` and records relu of its output (``:relu``, ``GatePoint.record``): the same forward
    (relu(s * x) = s * relu(x) for a gate s > 0) and the same MSE term as theirs."""
    names = [name for name, _ in model.features.named_children()]
    blocks = [n for n in names if n.startswith("denseblock")]
    keep = [n for n in names if n == "pool0" or n.startswith("transition") or n in blocks[:-1]]
    return [f"features.{n}" for n in keep] + ["features.norm5:relu"]


class DenseNet(torchvision.models.DenseNet):
    """torchvision's DenseNet (same modules and weights) whose final ReLU is out-of-place, so
    that a gate on ``features.norm5`` is not overwritten in place by the classifier's ReLU."""

    def forward(self, x):
        out = nn.functional.adaptive_avg_pool2d(nn.functional.relu(self.features(x)), 1)
        return self.classifier(torch.flatten(out, 1))


def densenet121(num_classes: int) -> nn.Module:
    """DenseNet121 with torchvision's configuration and parameter names."""
    return DenseNet(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64, num_classes=num_classes)


def small_densenet(num_classes: int) -> nn.Module:
    """A small DenseNet: growth 8, blocks (3, 3, 3), a 3x3 stride-2 stem conv and a 2x2 max-pool."""
    model = DenseNet(growth_rate=8, block_config=(3, 3, 3), num_init_features=16, bn_size=4,
                     num_classes=num_classes)
    model.features.conv0 = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
    nn.init.kaiming_normal_(model.features.conv0.weight)
    model.features.pool0 = nn.MaxPool2d(2)
    return model


register(ModelSpec("densenet121", "dense", densenet121, densenet_points, 0.02, 224))
register(ModelSpec("zoo_dense", "dense", small_densenet, densenet_points, 0.02, 64))
