from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

BUNDLED = Path(__file__).resolve().parents[2] / "src/dsbp/data/bundled/fashion_mnist_small.npz"


@pytest.fixture(scope="session")
def fmnist_batch():
    """128 real Fashion-MNIST images (bundled subset), normalised, (128, 1, 28, 28), and labels."""
    d = np.load(BUNDLED)
    x = torch.from_numpy(d["x_train"][::47][:128]).permute(0, 3, 1, 2).float() / 255.0
    y = torch.from_numpy(d["y_train"][::47][:128])
    return (x - 0.286) / 0.353, y


class ConvNet(nn.Module):
    """Tiny conv + linear model: both supported layer kinds, small enough for exact eigh."""

    def __init__(self, c_in=1, width=6, n_cls=10):
        super().__init__()
        self.conv = nn.Conv2d(c_in, width, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc1 = nn.Linear(width * 16, 24)
        self.fc2 = nn.Linear(24, n_cls)

    def forward(self, x):
        h = self.pool(torch.relu(self.conv(x))).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


@pytest.fixture
def convnet():
    torch.manual_seed(0)
    return ConvNet()
