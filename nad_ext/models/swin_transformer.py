"""Swin transformers (torchvision's): Swin-T, not in the paper (no tuned beta: calibrate it).
Gate points: every Swin block's output, NHWC maps; ``"mlp"``: every block's MLP hidden units
(the GELU's NHWC output); ``"heads"``: every window attention's heads."""
from __future__ import annotations

import torchvision
from torch import nn
from torchvision.models.swin_transformer import SwinTransformerBlock

from nad_ext.models.registry import ModelSpec, register, stage_blocks


def swin_blocks(model: nn.Module) -> list[str]:
    """Swin: the output of every Swin block, NHWC maps (N, H, W, C)."""
    return stage_blocks(model, SwinTransformerBlock)


SWIN_UNITS = {"mlp": lambda m: [f"{b}.mlp.1" for b in swin_blocks(m)],
              "heads": lambda m: [f"{b}.attn:heads" for b in swin_blocks(m)]}

register(ModelSpec("swin_t", "transformer", lambda n: torchvision.models.swin_t(weights=None, num_classes=n),
                   swin_blocks, None, 224, SWIN_UNITS))
