"""``load_dataset``: find a data set on disk (or download it on request) and read it."""

from __future__ import annotations

import lzma
import os
import pickle
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

from dsbp.data import bundled, cifar10, fashion_mnist, medmnist, tiny_imagenet
from dsbp.data.dataset import DatasetCorruptError, DatasetNotFoundError, ImageDataset
from dsbp.data.locate import download_root, search_roots
from dsbp.data.sources import Candidate

DATASETS: list[str] = (
    ["bundled", "fashion_mnist", "cifar10"]
    + [f"medmnist:{f}" for f in sorted(medmnist.FLAGS_2D)]
    + ["tiny_imagenet"]
)
"""Names accepted by :func:`load_dataset` (any 2-D single-label MedMNIST flag, including the
size variants ``medmnist:<flag>_64`` etc., is accepted too)."""

# What a broken file raises while being read: all are turned into DatasetCorruptError.
_READ_ERRORS = (ValueError, OSError, KeyError, EOFError, IndexError, zipfile.BadZipFile,
                pickle.UnpicklingError, lzma.LZMAError, zlib.error)


def _spec(name: str) -> tuple[Callable[[Path], list[Candidate]], str,
                              Callable[[Path], None] | None]:
    """(candidates per root, how-to-get text, downloader or None) for a data set name."""
    if name == "fashion_mnist":
        return fashion_mnist.candidates, fashion_mnist.HOW_TO_GET, fashion_mnist.download
    if name == "cifar10":
        return cifar10.candidates, cifar10.HOW_TO_GET, cifar10.download
    if name == "tiny_imagenet":
        return tiny_imagenet.candidates, tiny_imagenet.HOW_TO_GET, None
    if name.startswith("medmnist:"):
        flag = name.split(":", 1)[1]
        medmnist.parse_flag(flag)
        return (lambda r: medmnist.candidates(r, flag), medmnist.how_to_get(flag),
                lambda t: medmnist.download(t, flag))
    raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)} "
                     "(or medmnist:<any 2-D flag>)")


def _search(cands_of: Callable[[Path], list[Candidate]], roots: list[Path],
            tried: list[str], how_to: str) -> ImageDataset | None:
    for root in roots:
        for c in cands_of(root):
            if not c.path.exists():
                tried.append(f"{c.path} ({c.layout})")
                continue
            try:
                return c.read()
            except _READ_ERRORS as e:
                raise DatasetCorruptError(
                    f"found {c.path} ({c.layout}) but could not read it: {e}\n"
                    "Delete or replace the broken file, or point `root=`/$DSBP_DATA elsewhere. "
                    f"{how_to}\nSearched before it:\n"
                    + "".join(f"  - {t}\n" for t in tried)
                ) from e
    return None


def load_dataset(
    name: str, root: str | os.PathLike[str] | None = None, download: bool = False
) -> ImageDataset:
    """Load an image-classification data set into uint8 tensors.

    Search order for files: ``root``, ``$DSBP_DATA``, ``./data``, ``../shared/data``,
    ``~/.cache/dsbp``; within one directory the exact official layout is preferred over the
    shared npz copies. JPEG data are decoded once and cached (``$DSBP_CACHE`` or
    ``~/.cache/dsbp/decoded``). Arrays are kept in their stored order (the CIFAR-10 JPEG copy
    is class-major): shuffle in the loader.

    Args:
        name: ``"bundled"``, ``"fashion_mnist"``, ``"cifar10"``, ``"medmnist:<flag>"`` (e.g.
            ``"medmnist:breastmnist"``) or ``"tiny_imagenet"``.
        root: Directory searched first; also where downloads go (default ``$DSBP_DATA``, else
            ``~/.cache/dsbp``).
        download: If nothing is found, download through torchvision (Fashion-MNIST,
            CIFAR-10) or medmnist; never touches the network when False.

    Returns:
        :class:`ImageDataset` with train/test (and MedMNIST val) splits, class names and the
        train split's per-channel mean/std.

    Raises:
        DatasetNotFoundError: No copy found (the message lists every path tried and how to get
            the data), or a download was asked for but is not possible.
        DatasetCorruptError: A copy was found but is malformed (a ``ValueError``).
        ValueError: Unknown name.
    """
    if not isinstance(name, str):
        raise ValueError(f"data set name must be a string, got {type(name).__name__}")
    if name == "bundled":
        return bundled.load()
    cands_of, how_to, downloader = _spec(name)
    tried: list[str] = []
    ds = _search(cands_of, search_roots(root), tried, how_to)
    if ds is not None:
        return ds
    looked = "\n".join(f"  - {t}" for t in tried)
    if download:
        if downloader is None:
            raise DatasetNotFoundError(
                f"{name!r} cannot be downloaded automatically. Looked in:\n{looked}\n{how_to}")
        target = download_root(root)
        try:
            downloader(target)
        except ImportError as e:
            raise DatasetNotFoundError(
                f"{name!r} not found and download=True needs a package that is missing ({e}); "
                f"install it with `pip install 'dsbp[download]'`. Looked in:\n{looked}\n{how_to}"
            ) from e
        ds = _search(cands_of, [target], [], how_to)
        if ds is None:
            raise DatasetNotFoundError(f"downloaded {name!r} into {target} but found no "
                                       f"readable copy there afterwards.\n{how_to}")
        return ds
    raise DatasetNotFoundError(
        f"data set {name!r} not found. Looked in:\n{looked}\n{how_to}\n"
        "Search order: root=, $DSBP_DATA, ./data, ../shared/data, ~/.cache/dsbp."
    )
