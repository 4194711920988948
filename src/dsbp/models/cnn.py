"""A small CNN for 28x28 / 32x32 images: the demo's and the CPU tests' model."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """conv(3x3) -> BN -> ReLU -> pool, twice, then a 2-layer MLP head.

    Args:
        in_channels: image channels (1 for Fashion-MNIST, 3 for CIFAR-10).
        num_classes: output logits.
        width: channels of the first conv; the second has ``2 * width``.
        hidden: width of the hidden Linear layer.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32,
                 hidden: int = 128) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d(4)  # (N, 2w, 4, 4) whatever the input size
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * 16, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))
