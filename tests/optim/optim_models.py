"""Small models shared by the optimizer tests (a uniquely named module, not conftest,
so that test files can import it whatever other conftest.py pytest loaded first)."""

import torch
from torch import nn


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
