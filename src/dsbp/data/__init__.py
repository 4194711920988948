"""Data sets, the on-device input pipeline, subsets, few-shot episodes and shifted streams.

Public API: :func:`load_dataset`, :class:`ImageDataset`, :data:`DATASETS`,
:class:`DatasetNotFoundError`, :class:`DatasetCorruptError`. Submodules: ``loader``
(``DeviceLoader``), ``augment``, ``subset``, ``episodes``, ``shifts``. Pillow is imported only
when JPEG data are decoded.
"""

from __future__ import annotations

from dsbp.data.dataset import DatasetCorruptError, DatasetNotFoundError, ImageDataset
from dsbp.data.registry import DATASETS, load_dataset

__all__ = [
    "DATASETS",
    "DatasetCorruptError",
    "DatasetNotFoundError",
    "ImageDataset",
    "load_dataset",
]
