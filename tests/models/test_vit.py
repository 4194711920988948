"""Small ViT: patch count, token shapes, attention against torch's MultiheadAttention."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dsbp.models.vit import ViT


def test_vit_patch_count_and_shapes():
    for pool, extra in (("cls", 1), ("mean", 0)):
        model = ViT(
            image_size=32,
            patch=4,
            in_channels=3,
            num_classes=10,
            dim=32,
            depth=2,
            heads=4,
            pool=pool,
        )
        assert model.num_patches == (32 // 4) ** 2
        x = torch.randn(3, 3, 32, 32)
        assert model.tokens(x).shape == (3, 64 + extra, 32)
        assert model(x).shape == (3, 10)
    with pytest.raises(ValueError, match="divide"):
        ViT(image_size=28, patch=5)


def test_vit_attention_matches_torch_multihead_attention():
    torch.manual_seed(0)
    model = ViT(image_size=8, patch=4, in_channels=1, num_classes=2, dim=16, depth=1, heads=4)
    attn = model.blocks[0].attn
    ref = nn.MultiheadAttention(16, 4, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(attn.qkv.weight)
        ref.in_proj_bias.copy_(attn.qkv.bias)
        ref.out_proj.weight.copy_(attn.proj.weight)
        ref.out_proj.bias.copy_(attn.proj.bias)
    x = torch.randn(2, 5, 16)
    expected, _ = ref(x, x, x, need_weights=False)
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)
