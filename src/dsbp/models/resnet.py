"""CIFAR-style ResNet-18: 3x3 stem convolution, no max-pool, BasicBlocks [2, 2, 2, 2].

This is the ResNet-18 variant used for 32x32 inputs (He et al. 2016, as adapted in the usual CIFAR
code bases): the ImageNet stem (7x7 stride-2 conv + 3x3 max-pool) is replaced by a single 3x3
stride-1 conv, so the four stages see 32, 16, 8 and 4 pixel feature maps. With ``width=1`` the stage
widths are 64, 128, 256, 512 and the model has 11,173,962 parameters for 10 classes.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BasicBlock", "ResNet18", "resnet18"]

# Stage widths at width multiplier 1 and blocks per stage (ResNet-18).
_BASE_WIDTHS = (64, 128, 256, 512)
_BLOCKS = (2, 2, 2, 2)


def _scaled(channels: int, width: float) -> int:
    """Channels of a stage at width multiplier ``width`` (at least 1)."""
    return max(1, int(round(channels * width)))


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm and an identity (or 1x1 conv + BN) shortcut.

    Args:
        in_planes: input channels.
        planes: output channels.
        stride: stride of the first conv (2 halves the spatial size).

    Shapes: (N, in_planes, H, W) -> (N, planes, H / stride, W / stride).
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            # Projection shortcut (option B of He et al.) where the shape changes.
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 (3x3 stem, no max-pool).

    Args:
        in_channels: image channels (3 for CIFAR-10, 1 for Fashion-MNIST). Default 3.
        num_classes: number of output logits. Default 10.
        width: multiplier on the stage widths 64, 128, 256, 512 (e.g. 0.25 for a thin model in
            CPU tests). Default 1.0.

    Shapes: (N, in_channels, H, W) -> (N, num_classes) logits. Any H, W >= 8 works (global
    average pooling before the classifier); 32x32 is the design size.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not width > 0:
            raise ValueError(f"width multiplier must be > 0, got {width}")
        widths = [_scaled(c, width) for c in _BASE_WIDTHS]
        self.widths = tuple(widths)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        stages = []
        for i, (planes, blocks) in enumerate(zip(widths, _BLOCKS, strict=True)):
            stride = 1 if i == 0 else 2
            layers = []
            for b in range(blocks):
                layers.append(BasicBlock(in_planes, planes, stride if b == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))  # (N, w0, H, W): no max-pool
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))  # (N, w3, H/8, W/8)
        out = self.pool(out).flatten(1)  # (N, w3)
        return self.fc(out)


def resnet18(in_channels: int = 3, num_classes: int = 10, width: float = 1.0) -> ResNet18:
    """Build a CIFAR-style ResNet-18; see :class:`ResNet18` for the arguments."""
    return ResNet18(in_channels=in_channels, num_classes=num_classes, width=width)
