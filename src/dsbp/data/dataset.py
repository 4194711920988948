"""The in-memory data set record every loader returns, and the errors loaders raise."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


class DatasetNotFoundError(FileNotFoundError):
    """No copy of a data set was found in any searched place.

    The message lists every path that was tried and how to obtain the data.
    """


class DatasetCorruptError(ValueError):
    """A data set file was found but is truncated, malformed or inconsistent.

    The message names the file, what is wrong, and how to obtain a fresh copy.
    """


@dataclass(frozen=True)
class ImageDataset:
    """An image-classification data set held in memory as uint8 tensors.

    Attributes:
        name: Registry name, e.g. ``"cifar10"`` or ``"medmnist:breastmnist"``.
        x_train: uint8 (N_train, C, H, W), pixel values 0..255.
        y_train: int64 (N_train,), labels in ``[0, len(classes))``.
        x_test: uint8 (N_test, C, H, W).
        y_test: int64 (N_test,).
        classes: Class names, index = label.
        mean: Per-channel mean of ``x_train`` in [0, 1] units (pixel / 255), length C.
        std: Per-channel population standard deviation of ``x_train`` in [0, 1] units.
        source: Human-readable description of the file(s) the arrays came from.
        x_val: uint8 (N_val, C, H, W) or None when the data set has no validation split.
        y_val: int64 (N_val,) or None.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None

    def __post_init__(self) -> None:
        splits = [("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)]
        if (self.x_val is None) != (self.y_val is None):
            raise ValueError(f"{self.name}: x_val and y_val must both be given or both be None")
        if self.x_val is not None and self.y_val is not None:  # both or neither (checked above)
            splits.append(("val", self.x_val, self.y_val))
        shape = tuple(self.x_train.shape[1:])
        for split, x, y in splits:
            if x.dtype != torch.uint8 or x.ndim != 4:
                raise ValueError(
                    f"{self.name}: x_{split} must be uint8 (N, C, H, W), "
                    f"got {x.dtype} {tuple(x.shape)}"
                )
            if tuple(x.shape[1:]) != shape:
                raise ValueError(
                    f"{self.name}: x_{split} has image shape {tuple(x.shape[1:])}, "
                    f"x_train has {shape}"
                )
            if y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise ValueError(
                    f"{self.name}: y_{split} must be int64 ({x.shape[0]},), "
                    f"got {y.dtype} {tuple(y.shape)}"
                )
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= len(self.classes)):
                raise ValueError(
                    f"{self.name}: y_{split} has labels in [{int(y.min())}, {int(y.max())}] "
                    f"but there are {len(self.classes)} classes"
                )
        if len(self.mean) != shape[0] or len(self.std) != shape[0]:
            raise ValueError(f"{self.name}: mean/std need one value per channel ({shape[0]})")

    @property
    def num_classes(self) -> int:
        """Number of classes, ``len(classes)``."""
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        """Channels C of every image (1 grayscale, 3 RGB)."""
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of every image."""
        return int(self.x_train.shape[2]), int(self.x_train.shape[3])


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of uint8 images, in [0, 1] units.

    Computed exactly from a 256-bin histogram per channel, so a 50000-image data set needs no
    float copy of itself.

    Args:
        x: uint8 (N, C, H, W), N > 0.

    Returns:
        ``(mean, std)``, each a tuple of C floats.
    """
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"channel_stats needs non-empty uint8 (N, C, H, W), got {x.dtype} "
                         f"{tuple(x.shape)}")
    v = torch.arange(256, dtype=torch.float64) / 255.0  # pixel value in [0, 1] units
    means, stds = [], []
    for c in range(x.shape[1]):
        h = torch.bincount(x[:, c].reshape(-1), minlength=256).double()
        p = h / h.sum()
        m = float((p * v).sum())
        means.append(m)
        stds.append(float((p * (v - m) ** 2).sum()) ** 0.5)
    return tuple(means), tuple(stds)


def nhwc_to_tensor(x: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W[, C]) numpy images -> contiguous uint8 torch (N, C, H, W)."""
    if x.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"expected images (N, H, W) or (N, H, W, C), got shape {x.shape}")
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()


def labels_to_tensor(y: np.ndarray) -> torch.Tensor:
    """Integer labels (N,) or (N, 1) -> int64 torch (N,)."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"expected integer labels (N,) or (N, 1), got {y.dtype} {y.shape}")
    return torch.from_numpy(y.astype(np.int64))


def make_dataset(
    name: str,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    classes: Sequence[str],
    source: str,
) -> ImageDataset:
    """Build an :class:`ImageDataset` from numpy NHWC splits and compute train mean/std.

    Args:
        name: Registry name.
        splits: ``{"train": (x, y), "test": (x, y)[, "val": (x, y)]}``, x uint8 (N, H, W[, C]).
        classes: Class names.
        source: Description of the origin.
    """
    t = {k: (nhwc_to_tensor(x), labels_to_tensor(y)) for k, (x, y) in splits.items()}
    for k, (x, y) in t.items():
        if x.shape[0] != y.shape[0]:
            raise DatasetCorruptError(
                f"{name}: split {k!r} has {x.shape[0]} images but {y.shape[0]} labels ({source})"
            )
    mean, std = channel_stats(t["train"][0])
    val = t.get("val")
    return ImageDataset(
        name=name,
        x_train=t["train"][0], y_train=t["train"][1],
        x_test=t["test"][0], y_test=t["test"][1],
        classes=list(classes), mean=mean, std=std, source=source,
        x_val=None if val is None else val[0], y_val=None if val is None else val[1],
    )
