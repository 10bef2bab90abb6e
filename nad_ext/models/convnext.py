"""ConvNeXt (torchvision's): ConvNeXt-T, not in the paper (no tuned beta: calibrate it). Gate
points: every CNBlock's output, (N, C, H, W) maps; ``"mlp"``: every block's MLP hidden units
(its GELU, which runs NHWC between two Permutes)."""
from __future__ import annotations

import torchvision
from torch import nn
from torchvision.models.convnext import CNBlock

from nad_ext.models.registry import ModelSpec, register, stage_blocks


def convnext_blocks(model: nn.Module) -> list[str]:
    """ConvNeXt: the output of every CNBlock, (N, C, H, W) maps."""
    return stage_blocks(model, CNBlock)


CONVNEXT_UNITS = {"mlp": lambda m: [f"{b}.block.4" for b in convnext_blocks(m)]}  # block.4: the GELU

register(ModelSpec("convnext_tiny", "convnext", lambda n: torchvision.models.convnext_tiny(weights=None, num_classes=n),
                   convnext_blocks, None, 224, CONVNEXT_UNITS))
