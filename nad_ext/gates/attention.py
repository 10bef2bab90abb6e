"""Attention heads as gate units: one gate per head on the attention output, before the output
projection (``units="heads"``).

``nn.MultiheadAttention`` and torchvision's Swin ``ShiftedWindowAttention`` (and ``...V2``) pass
their output projection's *weights* to a functional call instead of calling the projection
module, so no hook can reach the concatenated head outputs. :func:`install_head_gate`
therefore gives the module instance an equivalent forward of its own that hands the per-head
outputs to a callback before projecting them; the handle's ``remove()`` restores the module's
forward. With an identity callback the replacement computes the module's function (checked
against the module's own forward in python_tests/test_attention.py).

The callback receives the heads of every sample as one tensor ``(N, *positions, heads,
head_dim)``: ``(N, L, H, D)`` for ``nn.MultiheadAttention`` (token order, batch first
whatever the module's ``batch_first``), ``(N, H_img, W_img, H, D)`` for Swin (windows reversed,
shift undone and padding cropped, so positions are the feature map's). The head axis is
``dim - 2``; the callback returns a tensor of the same shape.
"""
from __future__ import annotations

import math
import types
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

HeadGate = Callable[[torch.Tensor], torch.Tensor]

try:  # torchvision is a dependency, but keep this module importable without its Swin
    from torchvision.models.swin_transformer import ShiftedWindowAttention as _SwinAttention
except ImportError:  # pragma: no cover
    _SwinAttention = None

SUPPORTED = "nn.MultiheadAttention or torchvision's Swin ShiftedWindowAttention / ShiftedWindowAttentionV2"


def is_attention(module: nn.Module) -> bool:
    """Whether :func:`install_head_gate` knows how to gate ``module``'s heads."""
    return isinstance(module, nn.MultiheadAttention) or (_SwinAttention is not None
                                                          and isinstance(module, _SwinAttention))


class _Handle:
    def __init__(self, module: nn.Module):
        self.module = module

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)


def install_head_gate(module: nn.Module, gate: HeadGate) -> _Handle:
    """Makes ``module`` (see :data:`SUPPORTED`) hand its per-head outputs to ``gate`` before
    the output projection; returns a handle whose ``remove()`` undoes it."""
    if "forward" in module.__dict__:
        raise ValueError(f"{type(module).__name__} already has a replaced forward (gated twice?)")
    if isinstance(module, nn.MultiheadAttention):
        if module.bias_k is not None or module.add_zero_attn:
            raise NotImplementedError("head gates on nn.MultiheadAttention with add_bias_kv or add_zero_attn "
                                      "are not implemented")
        forward = _mha_forward
    elif _SwinAttention is not None and isinstance(module, _SwinAttention):
        forward = _swin_forward
    else:
        raise ValueError(f"heads can only be gated on {SUPPORTED}; got {type(module).__name__}")
    # An instance attribute: nn.Module.__call__ finds it before the class's forward, and hooks
    # on the module still run around it.
    module.forward = types.MethodType(lambda self, *args, **kwargs: forward(self, gate, *args, **kwargs), module)
    return _Handle(module)


# ----------------------------------------------------------------------------------------------
# nn.MultiheadAttention


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True = not allowed) as an additive float mask; float masks as they are."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def _mha_forward(mha: nn.MultiheadAttention, gate: HeadGate, query, key, value, key_padding_mask=None,
                 need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False):
    if query.dim() != 3:
        raise ValueError(f"head gates need batched attention inputs (3 dimensions); got query of shape "
                         f"{tuple(query.shape)}")
    same = query is key and key is value
    if not mha.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    n, length, embed = query.shape
    source, heads, head_dim = key.shape[1], mha.num_heads, mha.head_dim
    bias = mha.in_proj_bias
    if mha._qkv_same_embed_dim and same:
        q, k, v = F.linear(query, mha.in_proj_weight, bias).chunk(3, dim=-1)
    else:
        weights = mha.in_proj_weight.chunk(3) if mha._qkv_same_embed_dim else (
            mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = bias.chunk(3) if bias is not None else (None, None, None)
        q, k, v = (F.linear(t, w, b) for t, w, b in zip((query, key, value), weights, biases))
    q = q.reshape(n, length, heads, head_dim).transpose(1, 2)
    k = k.reshape(n, source, heads, head_dim).transpose(1, 2)
    v = v.reshape(n, source, heads, head_dim).transpose(1, 2)

    if is_causal and attn_mask is None:
        raise RuntimeError("is_causal needs attn_mask too (as nn.MultiheadAttention)")
    causal = is_causal and key_padding_mask is None and not need_weights
    mask = None
    if not causal:
        attn = _float_mask(attn_mask, q.dtype)
        if attn is not None:
            attn = attn.view(n, heads, length, source) if attn.dim() == 3 else attn.view(1, 1, length, source)
        padding = _float_mask(key_padding_mask, q.dtype)
        if padding is not None:
            padding = padding.view(n, 1, 1, source)
        mask = attn if padding is None else (padding if attn is None else attn + padding)
    dropout = mha.dropout if mha.training else 0.0
    if need_weights:
        scores = (q * head_dim ** -0.5) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        attention = scores.softmax(dim=-1)
        out = F.dropout(attention, dropout) @ v if dropout > 0 else attention @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
    out = gate(out.transpose(1, 2))  # (N, L, heads, head_dim)
    out = F.linear(out.reshape(n, length, embed), mha.out_proj.weight, mha.out_proj.bias)
    if not mha.batch_first:
        out = out.transpose(0, 1)
    if not need_weights:
        return out, None
    return out, attention.mean(dim=1) if average_attn_weights else attention


# ----------------------------------------------------------------------------------------------
# Swin (torchvision): window attention with shifted windows, V1 and V2


def _windows(x: torch.Tensor, window: list[int]) -> torch.Tensor:
    """(B, H, W, ...) with H, W multiples of the window -> (B * windows, wh * ww, ...)."""
    b, h, w = x.shape[:3]
    rest = x.shape[3:]
    x = x.reshape(b, h // window[0], window[0], w // window[1], window[1], *rest)
    x = x.transpose(2, 3)
    return x.reshape(b * (h // window[0]) * (w // window[1]), window[0] * window[1], *rest)


def _unwindows(x: torch.Tensor, window: list[int], b: int, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`_windows`."""
    rest = x.shape[2:]
    x = x.reshape(b, h // window[0], w // window[1], window[0], window[1], *rest).transpose(2, 3)
    return x.reshape(b, h, w, *rest)


def _shift_mask(h: int, w: int, window: list[int], shift: list[int], device, dtype) -> torch.Tensor:
    """(windows, T, T) additive mask: -100 between tokens that came from different regions of
    the cyclically shifted map (the value torchvision uses)."""
    def regions(size, win, s):
        i = torch.arange(size, device=device)
        return (i >= size - win).long() + (i >= size - s).long()

    label = regions(h, window[0], shift[0])[:, None] * 3 + regions(w, window[1], shift[1])[None, :]
    label = _windows(label[None, :, :, None], window)[..., 0]  # (windows, T)
    differ = label[:, None, :] != label[:, :, None]
    return torch.zeros(differ.shape, dtype=dtype, device=device).masked_fill_(differ, -100.0)


def _swin_forward(attn: nn.Module, gate: HeadGate, x: torch.Tensor) -> torch.Tensor:
    b, h, w, c = x.shape
    window, shift = list(attn.window_size), list(attn.shift_size)
    heads = attn.num_heads
    pad_h, pad_w = (-h) % window[0], (-w) % window[1]
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    ph, pw = h + pad_h, w + pad_w
    shift = [0 if win >= size else s for win, size, s in zip(window, (ph, pw), shift)]
    shifted = sum(shift) > 0
    if shifted:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    tokens = _windows(x, window)  # (B * nW, T, C)
    nw, t = tokens.shape[0] // b, tokens.shape[1]

    logit_scale = getattr(attn, "logit_scale", None)  # V2: cosine attention
    qkv_bias = attn.qkv.bias
    if logit_scale is not None and qkv_bias is not None:
        length = qkv_bias.numel() // 3
        qkv_bias = torch.cat([qkv_bias[:length], torch.zeros_like(qkv_bias[length:2 * length]),
                              qkv_bias[2 * length:]])
    qkv = F.linear(tokens, attn.qkv.weight, qkv_bias).reshape(b * nw, t, 3, heads, c // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    if logit_scale is not None:
        scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        scores = scores * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        scores = (q * (c // heads) ** -0.5) @ k.transpose(-2, -1)
    scores = scores + attn.get_relative_position_bias()
    if shifted:
        mask = _shift_mask(ph, pw, window, shift, x.device, scores.dtype)
        scores = (scores.view(b, nw, heads, t, t) + mask[None, :, None]).view(b * nw, heads, t, t)
    scores = F.dropout(scores.softmax(dim=-1), p=attn.attention_dropout, training=attn.training)
    out = (scores @ v).transpose(1, 2)  # (B * nW, T, heads, head_dim)
    out = _unwindows(out, window, b, ph, pw)
    if shifted:
        out = torch.roll(out, shifts=(shift[0], shift[1]), dims=(1, 2))
    out = gate(out[:, :h, :w])  # (B, H, W, heads, head_dim)
    # The projection is per position, so it commutes with the window reversal above.
    out = F.linear(out.reshape(b, h, w, c), attn.proj.weight, attn.proj.bias)
    return F.dropout(out, p=attn.dropout, training=attn.training)
