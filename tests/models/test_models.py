"""Shapes, parameter counts and structural properties of dsbp.models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dsbp.models.mlp import MLP
from dsbp.models.registry import MODEL_NAMES, build_model
from dsbp.models.resnet import ResNet18
from dsbp.models.vit import ViT


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _resnet18_param_formula(in_channels: int, num_classes: int, widths: list[int]) -> int:
    """Parameter count of a CIFAR ResNet-18 from the layer formulas (independent of the code)."""

    def conv(cin: int, cout: int, k: int) -> int:  # bias-free conv
        return cin * cout * k * k

    def bn(c: int) -> int:  # weight + bias (running stats are buffers)
        return 2 * c

    total = conv(in_channels, widths[0], 3) + bn(widths[0])
    cin = widths[0]
    for stage, cout in enumerate(widths):
        for block in range(2):
            stride = 2 if (stage > 0 and block == 0) else 1
            total += conv(cin, cout, 3) + bn(cout) + conv(cout, cout, 3) + bn(cout)
            if stride != 1 or cin != cout:
                total += conv(cin, cout, 1) + bn(cout)
            cin = cout
    return total + cin * num_classes + num_classes


def test_resnet18_full_width_parameter_count():
    model = ResNet18(in_channels=3, num_classes=10)
    assert _n_params(model) == _resnet18_param_formula(3, 10, [64, 128, 256, 512])
    model = ResNet18(in_channels=1, num_classes=200)
    assert _n_params(model) == _resnet18_param_formula(1, 200, [64, 128, 256, 512])


def test_resnet18_thin_shapes_and_no_maxpool():
    model = ResNet18(in_channels=3, num_classes=7, width=0.125)
    assert model.widths == (8, 16, 32, 64)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    seen = {}
    for name in ("layer1", "layer4"):
        getattr(model, name).register_forward_hook(
            lambda _m, _i, out, name=name: seen.__setitem__(name, out.shape)
        )
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    # Stem keeps full resolution (no stride, no max-pool); three stride-2 stages give 4x4.
    assert seen["layer1"] == (2, 8, 32, 32)
    assert seen["layer4"] == (2, 64, 4, 4)
    assert _n_params(model) == _resnet18_param_formula(3, 7, [8, 16, 32, 64])


def test_mlp_shapes_and_count():
    model = MLP(in_features=1 * 28 * 28, num_classes=10, hidden=[32, 16])
    assert model(torch.randn(5, 1, 28, 28)).shape == (5, 10)
    assert _n_params(model) == (784 * 32 + 32) + (32 * 16 + 16) + (16 * 10 + 10)
    with pytest.raises(ValueError, match="features"):
        model(torch.randn(5, 3, 28, 28))


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


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_registry_builds_every_model(name):
    kw = {
        "resnet18": {"width": 0.125},
        "cnn": {"width": 8},
        "mlp": {"hidden": [16]},
        "vit": {"patch": 7, "dim": 16, "depth": 1, "heads": 2},
    }[name]
    model = build_model(name, in_channels=1, num_classes=5, image_size=28, **kw)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 5)


def test_registry_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet50", 3, 10, 32)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("mlp", 3, 0, 32)
