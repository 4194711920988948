"""build_model: every registered name builds and maps (N, C, H, W) to (N, num_classes)."""

from __future__ import annotations

import pytest
import torch

from dsbp.models.registry import MODEL_NAMES, build_model


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
