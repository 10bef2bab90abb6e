"""Head gates: the replaced attention forwards compute the modules' own function, and a gate
scales exactly its head's slice of the concatenated head outputs before the projection."""
import pytest
import torch
from torch import nn
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

from nad_ext.gates.attention import install_head_gate, is_attention


def _randomised(module):
    torch.manual_seed(0)
    for p in module.parameters():
        p.data.normal_(0, 0.3)
    return module.eval()


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights, average", [(False, True), (True, True), (True, False)])
def test_multihead_attention_is_unchanged_with_identity_gates(batch_first, need_weights, average):
    mha = _randomised(nn.MultiheadAttention(16, 4, batch_first=batch_first))
    x = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)
    expected = mha(x, x, x, need_weights=need_weights, average_attn_weights=average)
    handle = install_head_gate(mha, lambda t: t)
    got = mha(x, x, x, need_weights=need_weights, average_attn_weights=average)
    handle.remove()
    torch.testing.assert_close(got[0], expected[0])
    if need_weights:
        torch.testing.assert_close(got[1], expected[1])
    else:
        assert got[1] is None
    assert "forward" not in vars(mha)  # restored


def test_multihead_attention_with_masks_and_cross_attention():
    mha = _randomised(nn.MultiheadAttention(16, 2, batch_first=True, kdim=12, vdim=10))
    q, k, v = torch.randn(2, 4, 16), torch.randn(2, 6, 12), torch.randn(2, 6, 10)
    padding = torch.tensor([[False] * 5 + [True], [False] * 6])
    attn_mask = torch.zeros(4, 6, dtype=torch.bool)
    attn_mask[0, 2] = attn_mask[3, 0] = True
    expected = mha(q, k, v, key_padding_mask=padding, attn_mask=attn_mask, need_weights=False)[0]
    handle = install_head_gate(mha, lambda t: t)
    got = mha(q, k, v, key_padding_mask=padding, attn_mask=attn_mask, need_weights=False)[0]
    handle.remove()
    torch.testing.assert_close(got, expected)


def test_a_head_gate_scales_its_slice_before_the_projection():
    mha = _randomised(nn.MultiheadAttention(16, 4, batch_first=True))
    x = torch.randn(2, 5, 16)
    scale = torch.tensor([1.0, 0.0, 0.5, 1.0])
    seen = []

    def gate(t):
        seen.append(t.shape)
        return t * scale.view(1, 1, 4, 1)

    handle = install_head_gate(mha, gate)
    got = mha(x, x, x, need_weights=False)[0]
    handle.remove()
    assert seen == [torch.Size([2, 5, 4, 4])]  # (N, L, heads, head_dim)
    # Reference: the concatenated head outputs by hand, scaled per head, then out_proj.
    q, k, v = nn.functional.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1)
    split = lambda t: t.view(2, 5, 4, 4).transpose(1, 2)  # noqa: E731
    heads = torch.softmax(split(q) @ split(k).transpose(-1, -2) / 2.0, -1) @ split(v)  # (N, heads, L, d)
    concat = (heads * scale.view(1, 4, 1, 1)).transpose(1, 2).reshape(2, 5, 16)
    torch.testing.assert_close(got, mha.out_proj(concat))


@pytest.mark.parametrize("cls", [ShiftedWindowAttention, ShiftedWindowAttentionV2])
@pytest.mark.parametrize("shift", [[0, 0], [2, 2]])
@pytest.mark.parametrize("size", [(8, 8), (6, 9)])  # 9: padded to the window
def test_swin_window_attention_is_unchanged_with_identity_gates(cls, shift, size):
    attn = _randomised(cls(16, [4, 4], shift, 4))
    x = torch.randn(2, *size, 16)
    expected = attn(x)
    seen = []
    handle = install_head_gate(attn, lambda t: (seen.append(t.shape), t)[1])
    got = attn(x)
    handle.remove()
    torch.testing.assert_close(got, expected)
    assert seen == [torch.Size([2, *size, 4, 4])]  # (N, H, W, heads, head_dim)


def test_swin_head_gate_matches_a_projection_of_the_gated_heads():
    attn = _randomised(ShiftedWindowAttention(16, [4, 4], [2, 2], 4))
    x = torch.randn(1, 8, 8, 16)
    keep = torch.tensor([0.0, 1.0, 1.0, 0.0])
    captured = {}

    def gate(t):
        captured["heads"] = t.detach().clone()
        return t * keep.view(1, 1, 1, 4, 1)

    handle = install_head_gate(attn, gate)
    got = attn(x)
    handle.remove()
    concat = (captured["heads"] * keep.view(1, 1, 1, 4, 1)).reshape(1, 8, 8, 16)
    torch.testing.assert_close(got, attn.proj(concat))
    # All heads closed: only the projection's bias is left.
    handle = install_head_gate(attn, lambda t: t * 0)
    torch.testing.assert_close(attn(x), attn.proj.bias.expand(1, 8, 8, 16))
    handle.remove()


def test_only_attention_modules_take_head_gates():
    assert is_attention(nn.MultiheadAttention(8, 2)) and not is_attention(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="heads can only be gated on nn.MultiheadAttention"):
        install_head_gate(nn.Linear(8, 8), lambda t: t)
    with pytest.raises(NotImplementedError, match="add_bias_kv"):
        install_head_gate(nn.MultiheadAttention(8, 2, add_bias_kv=True), lambda t: t)
