"""MLP: shapes, parameter count, input check."""

from __future__ import annotations

import pytest
import torch

from dsbp.models.mlp import MLP


def test_mlp_shapes_and_count():
    model = MLP(in_features=1 * 28 * 28, num_classes=10, hidden=[32, 16])
    assert model(torch.randn(5, 1, 28, 28)).shape == (5, 10)
    assert sum(p.numel() for p in model.parameters()) == (784 * 32 + 32) + (32 * 16 + 16) + (
        16 * 10 + 10
    )
    with pytest.raises(ValueError, match="features"):
        model(torch.randn(5, 3, 28, 28))
