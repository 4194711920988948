"""CIFAR-10: the official ``cifar-10-batches-py`` pickles or the shared JPEG-bytes npz.

The JPEG copy (``cifar10_jpeg.npz``) is lossy (q75) and class-major; arrays are kept in the
stored order, shuffling is the loader's job.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from dsbp.data.dataset import ImageDataset, make_dataset
from dsbp.data.npz_layouts import read_jpeg_npz, sidecar_classes
from dsbp.data.sources import Candidate

NAME = "cifar10"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck"]
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
HOW_TO_GET = (
    "Get CIFAR-10 with `load_dataset('cifar10', download=True)` (needs "
    "`pip install 'dsbp[download]'`, i.e. torchvision), or unpack "
    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz so that "
    "<root>/cifar-10-batches-py/ holds data_batch_1..5, test_batch and batches.meta; or put "
    "cifar10_jpeg.npz (JPEG-bytes layout, lossy) into <root>."
)

# The CIFAR pickles hold a dict of bytes keys, Python lists and one numpy array; nothing else
# may be constructed while unpickling (a pickle can otherwise run arbitrary code).
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python-3 protocol-2 pickles spell a bytes payload
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR pickle")


def load_pickle(path: Path) -> dict:
    """Unpickle one CIFAR batch file (Python-2 pickles: bytes keys), allowing numpy only."""
    with open(path, "rb") as f:
        d = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a dict, got {type(d).__name__}")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    d = load_pickle(path)
    if "data" not in d or "labels" not in d:
        raise ValueError(f"{path}: batch lacks 'data' or 'labels' (keys {sorted(d)})")
    data = np.asarray(d["data"])
    labels = np.asarray(d["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: data must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(data)} images but {len(labels)} labels")
    # Each row is the R plane, then G, then B, each 32x32 row-major -> (N, 3, 32, 32) -> NHWC.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _read_pickles(folder: Path) -> ImageDataset:
    xs, ys = zip(*(_read_batch(folder / b) for b in TRAIN_BATCHES), strict=True)
    test = _read_batch(folder / "test_batch")
    meta = folder / "batches.meta"
    classes = CLASSES
    if meta.is_file():
        names = load_pickle(meta).get("label_names")
        if names:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    splits = {"train": (np.concatenate(xs), np.concatenate(ys)), "test": test}
    return make_dataset(NAME, splits, classes, f"CIFAR-10 python pickles in {folder}")


def _read_npz(path: Path) -> ImageDataset:
    classes = sidecar_classes(path) or CLASSES
    return make_dataset(NAME, read_jpeg_npz(path, "cifar10_jpeg"), classes,
                        f"JPEG-bytes npz {path} (lossy JPEG q75 copy, class-major order)")


def candidates(root: Path) -> list[Candidate]:
    """Copies of CIFAR-10 that may be under ``root``: exact pickles first, then the JPEG npz."""
    folder = root / "cifar-10-batches-py"
    npz = root / "cifar10_jpeg.npz"
    return [
        Candidate(folder, "cifar-10-batches-py pickles", lambda: _read_pickles(folder)),
        Candidate(npz, "JPEG-bytes npz", lambda: _read_npz(npz)),
    ]


def download(target: Path) -> None:
    """Download with torchvision into ``target/cifar-10-batches-py``."""
    from torchvision.datasets import CIFAR10

    CIFAR10(root=str(target), train=True, download=True)
