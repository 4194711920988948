"""The small balanced Fashion-MNIST subset shipped inside the package (no download needed).

600 train and 100 test images per class, made by ``scripts/make_bundled_data.py``.
"""

from __future__ import annotations

import json
from importlib import resources

import numpy as np

from dsbp.data.dataset import ImageDataset, make_dataset

NAME = "bundled"
FILE = "fashion_mnist_small.npz"


def load() -> ImageDataset:
    """Load the bundled subset through ``importlib.resources`` (works from a wheel or zip)."""
    base = resources.files("dsbp.data").joinpath("bundled")
    meta = json.loads(base.joinpath("fashion_mnist_small.json").read_text())
    with resources.as_file(base.joinpath(FILE)) as path:
        with np.load(path, allow_pickle=False) as z:
            splits = {s: (z[f"x_{s}"], z[f"y_{s}"]) for s in ("train", "test")}
    return make_dataset(NAME, splits, meta["classes"],
                        f"bundled {FILE} ({meta['selection']} of Fashion-MNIST)")
