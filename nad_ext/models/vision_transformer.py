"""Vision transformers (torchvision's modules and names): ViT-B/16, not in the paper (no tuned
beta: calibrate it), and the zoo's small ViT (``zoo_vit``). Gate points: every encoder block's
output; ``"mlp"``: every block's MLP hidden units; ``"heads"``: every self-attention's heads."""
from __future__ import annotations

import torchvision
from torch import nn
from torchvision.models.vision_transformer import ConvStemConfig

from nad_ext.models.registry import ModelSpec, register


def vit_blocks(model: nn.Module) -> list[str]:
    """ViT: the output of every encoder block, (N, 1 + patches, hidden) tokens."""
    return [f"encoder.layers.{name}" for name in model.encoder.layers._modules]


def vit_mlp(model: nn.Module) -> list[str]:
    """ViT: the MLP hidden units of every encoder block (3,072 in ViT-B), (N, L, mlp_dim)."""
    return [f"{block}.mlp.1" for block in vit_blocks(model)]


def vit_heads(model: nn.Module) -> list[str]:
    """ViT: a gate per head of every encoder block's self-attention."""
    return [f"{block}.self_attention:heads" for block in vit_blocks(model)]


VIT_UNITS = {"mlp": vit_mlp, "heads": vit_heads}


def small_vit(num_classes: int) -> nn.Module:
    """A small ViT with torchvision's modules and names: 64x64 images, a convolutional stem
    to 8x8 patches (3 stride-2 convs: a ViT learns from a few thousand images with one), 3
    encoder blocks (a fourth costs the demo 25% more time on the CPU), hidden size 64, 4 heads,
    MLP 128."""
    stem = [ConvStemConfig(c, 3, 2) for c in (16, 32, 64)]
    return torchvision.models.VisionTransformer(64, 8, num_layers=3, num_heads=4, hidden_dim=64, mlp_dim=128,
                                                num_classes=num_classes, conv_stem_configs=stem)


register(ModelSpec("vit_b_16", "transformer", lambda n: torchvision.models.vit_b_16(weights=None, num_classes=n),
                   vit_blocks, None, 224, VIT_UNITS))
register(ModelSpec("zoo_vit", "transformer", small_vit, vit_blocks, None, 64, VIT_UNITS))
