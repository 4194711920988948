from pathlib import Path

import numpy as np
import pytest
import torch
from optim_models import ConvNet

BUNDLED = Path(__file__).resolve().parents[2] / "src/dsbp/data/bundled/fashion_mnist_small.npz"


@pytest.fixture(scope="session")
def fmnist_batch():
    """128 real Fashion-MNIST images (bundled subset), normalised, (128, 1, 28, 28), and labels."""
    d = np.load(BUNDLED)
    x = torch.from_numpy(d["x_train"][::47][:128]).permute(0, 3, 1, 2).float() / 255.0
    y = torch.from_numpy(d["y_train"][::47][:128])
    return (x - 0.286) / 0.353, y


@pytest.fixture
def convnet():
    torch.manual_seed(0)
    return ConvNet()
