"""CIFAR ResNet-18: parameter count from the layer formulas, shapes, no max-pool stem."""

from __future__ import annotations

import torch
from torch import nn

from dsbp.models.resnet import ResNet18


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
