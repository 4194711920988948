"""Tiny ImageNet: the official ``tiny-imagenet-200`` folder or the shared JPEG-bytes npz.

The official test labels were never released, so the labelled **val** split serves as
``x_test`` (and ``x_val`` is None), as the shared subset does. Label = line index in
``wnids.txt``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from dsbp.data.dataset import ImageDataset, make_dataset
from dsbp.data.jpeg import decode_files
from dsbp.data.locate import cached_arrays, file_key
from dsbp.data.npz_layouts import num_classes, read_jpeg_npz, sidecar_classes
from dsbp.data.sources import Candidate

NAME = "tiny_imagenet"
HOW_TO_GET = (
    "Download http://cs231n.stanford.edu/tiny-imagenet-200.zip and unzip it so that "
    "<root>/tiny-imagenet-200/ holds wnids.txt, words.txt, train/ and val/ (there is no "
    "torchvision downloader for it), or put tiny_imagenet_jpeg.npz (JPEG-bytes layout) into "
    "<root>."
)
_NUM = re.compile(r"_(\d+)\.jpe?g$", re.IGNORECASE)


def _number(p: Path) -> int:
    m = _NUM.search(p.name)
    if not m:
        raise ValueError(f"unexpected Tiny ImageNet file name {p}")
    return int(m.group(1))


def _listing(folder: Path) -> tuple[list[str], list[Path], list[int], list[Path], list[int]]:
    """wnids, train files + labels, val files + labels, in a fixed order."""
    wnids = [w.strip() for w in (folder / "wnids.txt").read_text().splitlines() if w.strip()]
    if not wnids:
        raise ValueError(f"{folder / 'wnids.txt'} is empty")
    index = {w: i for i, w in enumerate(wnids)}
    tr_files: list[Path] = []
    tr_labels: list[int] = []
    for w in wnids:
        files = sorted((folder / "train" / w / "images").glob("*.[Jj][Pp][Ee][Gg]"), key=_number)
        if not files:
            raise ValueError(f"no training images in {folder / 'train' / w / 'images'}")
        tr_files += files
        tr_labels += [index[w]] * len(files)
    val: list[tuple[int, Path, int]] = []
    for line in (folder / "val" / "val_annotations.txt").read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        if parts[1] not in index:
            raise ValueError(f"val_annotations.txt names {parts[1]!r}, not in wnids.txt")
        p = folder / "val" / "images" / parts[0]
        val.append((_number(p), p, index[parts[1]]))
    if not val:
        raise ValueError(f"{folder / 'val' / 'val_annotations.txt'} lists no images")
    val.sort()
    return wnids, tr_files, tr_labels, [v[1] for v in val], [v[2] for v in val]


def _words(folder: Path, wnids: list[str]) -> list[str]:
    words = {}
    path = folder / "words.txt"
    if path.is_file():
        for line in path.read_text().splitlines():
            w, _, text = line.partition("\t")
            words[w.strip()] = text.strip()
    return [words.get(w, w) for w in wnids]


def _read_folder(folder: Path) -> ImageDataset:
    wnids, tr_files, tr_y, va_files, va_y = _listing(folder)
    key = file_key(folder / "wnids.txt", folder / "val" / "val_annotations.txt",
                   *tr_files, *va_files)

    def build() -> dict[str, np.ndarray]:
        return {
            "x_train": decode_files(tr_files), "y_train": np.asarray(tr_y, dtype=np.int64),
            "x_test": decode_files(va_files), "y_test": np.asarray(va_y, dtype=np.int64),
        }

    a = cached_arrays("tiny_imagenet_folder", key, build)
    splits = {"train": (a["x_train"], a["y_train"]), "test": (a["x_test"], a["y_test"])}
    return make_dataset(NAME, splits, _words(folder, wnids),
                        f"tiny-imagenet-200 folder {folder} (test = official val split)")


def _read_npz(path: Path) -> ImageDataset:
    splits = read_jpeg_npz(path, "tiny_imagenet_jpeg")
    classes = sidecar_classes(path) or [f"class_{i}" for i in range(num_classes(splits))]
    return make_dataset(NAME, splits, classes,
                        f"JPEG-bytes npz {path} (test = official val split)")


def candidates(root: Path) -> list[Candidate]:
    """Copies of Tiny ImageNet that may be under ``root``: the folder, then the npz."""
    folder = root / "tiny-imagenet-200"
    npz = root / "tiny_imagenet_jpeg.npz"
    return [
        Candidate(folder, "tiny-imagenet-200 folder", lambda: _read_folder(folder)),
        Candidate(npz, "JPEG-bytes npz", lambda: _read_npz(npz)),
    ]
