"""Fashion-MNIST: the official IDX files (``*-ubyte.gz``) or the shared pixel-array npz."""

from __future__ import annotations

import gzip
from functools import partial
from pathlib import Path

import numpy as np

from dsbp.data.dataset import ImageDataset, make_dataset
from dsbp.data.npz_layouts import read_pixel_npz, sidecar_classes
from dsbp.data.sources import Candidate

NAME = "fashion_mnist"
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
HOW_TO_GET = (
    "Get Fashion-MNIST with `load_dataset('fashion_mnist', download=True)` (needs "
    "`pip install 'dsbp[download]'`, i.e. torchvision), or put the four IDX files "
    "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
    "t10k-labels-idx1-ubyte.gz from https://github.com/zalandoresearch/fashion-mnist "
    "(data/fashion/) into <root>/fashion_mnist/, or a fashion_mnist.npz (pixel-array layout) "
    "into <root>."
)
# IDX type code 0x08 = unsigned byte; magic = 0x0000 0x08 <ndim>.
_UBYTE = 0x08


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzip-compressed or not) of unsigned bytes.

    The header is the big-endian magic ``0x000008<ndim>`` followed by ``ndim`` big-endian
    uint32 sizes; the rest is the row-major payload, which must have exactly that length.

    Returns:
        uint8 array of the stored shape (images (N, 28, 28), labels (N,)).
    """
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4:
        raise ValueError(f"{path}: IDX file of {len(raw)} bytes has no header")
    if raw[0] != 0 or raw[1] != 0 or raw[2] != _UBYTE or raw[3] == 0:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()} (expected 0x000008 + ndim, "
            "e.g. 0x00000803 for images, 0x00000801 for labels)"
        )
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: IDX header truncated")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(
            f"{path}: IDX header says shape {dims} ({int(np.prod(dims))} bytes) but the file "
            f"holds {body.size} bytes of data (truncated or corrupt)"
        )
    return body.reshape(dims).copy()


def _idx_path(folder: Path, stem: str) -> Path:
    gz = folder / f"{stem}.gz"
    return gz if gz.is_file() or not (folder / stem).is_file() else folder / stem


def _read_idx_folder(folder: Path) -> ImageDataset:
    splits = {}
    for split, (img, lab) in FILES.items():
        x = read_idx(_idx_path(folder, img))
        y = read_idx(_idx_path(folder, lab))
        if x.ndim != 3 or y.ndim != 1:
            raise ValueError(f"{folder}: {split} images must be 3-D and labels 1-D, got "
                             f"{x.shape} and {y.shape}")
        splits[split] = (x, y.astype(np.int64))
    return make_dataset(NAME, splits, CLASSES, f"Fashion-MNIST IDX files in {folder}")


def _read_npz(path: Path) -> ImageDataset:
    classes = sidecar_classes(path) or CLASSES
    return make_dataset(NAME, read_pixel_npz(path), classes, f"pixel-array npz {path}")


def candidates(root: Path) -> list[Candidate]:
    """Copies of Fashion-MNIST that may be under ``root``, preferred first."""
    out = []
    for folder in (root / "fashion_mnist", root / "fashion-mnist",
                   root / "FashionMNIST" / "raw", root):
        probe = _idx_path(folder, FILES["train"][0])
        out.append(Candidate(probe, "IDX", partial(_read_idx_folder, folder)))
    npz = root / "fashion_mnist.npz"
    out.append(Candidate(npz, "pixel-array npz", lambda: _read_npz(npz)))
    return out


def download(target: Path) -> None:
    """Download with torchvision into ``target/FashionMNIST/raw`` (IDX .gz files)."""
    from torchvision.datasets import FashionMNIST

    for train in (True, False):
        FashionMNIST(root=str(target), train=train, download=True)
