"""Multi-layer perceptron on flattened images."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MLP"]


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU] * len(hidden) -> Linear.

    Args:
        in_features: input size after flattening (C * H * W for an image).
        num_classes: number of output logits.
        hidden: widths of the hidden layers, in order. Default ``(256, 128)``; an empty sequence
            gives a linear classifier.

    Shapes: (N, ...) with prod(...) == in_features -> (N, num_classes).
    """

    def __init__(
        self, in_features: int, num_classes: int = 10, hidden: Sequence[int] = (256, 128)
    ) -> None:
        super().__init__()
        if in_features < 1:
            raise ValueError(f"in_features must be >= 1, got {in_features}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        hidden = list(hidden)
        if any(int(h) != h or h < 1 for h in hidden):
            raise ValueError(f"hidden sizes must be positive integers, got {hidden}")
        self.in_features = in_features
        layers: list[nn.Module] = []
        d = in_features
        for h in hidden:
            layers += [nn.Linear(d, int(h)), nn.ReLU()]
            d = int(h)
        layers.append(nn.Linear(d, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if x.shape[1] != self.in_features:
            raise ValueError(
                f"MLP expects {self.in_features} features per sample, got {x.shape[1]}"
            )
        return self.net(x)
