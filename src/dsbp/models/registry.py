"""Build a model by name, e.g. ``build_model("resnet18", 3, 10, 32)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["MODEL_NAMES", "build_model"]


def _resnet18(in_channels: int, num_classes: int, image_size: int, **kw: Any) -> nn.Module:
    from dsbp.models.resnet import ResNet18

    # Global average pooling makes the net size-agnostic; three stride-2 stages need >= 8 px.
    if image_size < 8:
        raise ValueError(f"resnet18 needs image_size >= 8, got {image_size}")
    return ResNet18(in_channels=in_channels, num_classes=num_classes, **kw)


def _cnn(in_channels: int, num_classes: int, image_size: int, **kw: Any) -> nn.Module:
    from dsbp.models.cnn import SmallCNN

    return SmallCNN(in_channels=in_channels, num_classes=num_classes, **kw)


def _mlp(in_channels: int, num_classes: int, image_size: int, **kw: Any) -> nn.Module:
    from dsbp.models.mlp import MLP

    return MLP(in_features=in_channels * image_size * image_size, num_classes=num_classes, **kw)


def _vit(in_channels: int, num_classes: int, image_size: int, **kw: Any) -> nn.Module:
    from dsbp.models.vit import ViT

    return ViT(image_size=image_size, in_channels=in_channels, num_classes=num_classes, **kw)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": _resnet18,
    "cnn": _cnn,
    "mlp": _mlp,
    "vit": _vit,
}
MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_model(
    name: str, in_channels: int, num_classes: int, image_size: int, **kw: Any
) -> nn.Module:
    """Build one of the project's models for a data set's shape.

    Args:
        name: one of ``"resnet18"`` (:class:`~dsbp.models.resnet.ResNet18`, kw: ``width``),
            ``"cnn"`` (:class:`~dsbp.models.cnn.SmallCNN`, kw: ``width``), ``"mlp"``
            (:class:`~dsbp.models.mlp.MLP`, kw: ``hidden``), ``"vit"``
            (:class:`~dsbp.models.vit.ViT`, kw: ``patch``, ``dim``, ``depth``, ``heads``,
            ``mlp_ratio``, ``pool``).
        in_channels: image channels C.
        num_classes: number of logits.
        image_size: image side H = W in pixels.
        **kw: model-specific keyword arguments, passed through.

    Returns:
        The model, in training mode, on the CPU, mapping (N, C, H, W) to (N, num_classes).

    Raises:
        ValueError: on an unknown name or a non-positive shape argument.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    for arg, v in (
        ("in_channels", in_channels),
        ("num_classes", num_classes),
        ("image_size", image_size),
    ):
        if int(v) != v or v < 1:
            raise ValueError(f"{arg} must be a positive integer, got {v!r}")
    return _BUILDERS[name](int(in_channels), int(num_classes), int(image_size), **kw)
