"""The two npz layouts of ``shared/data/README.md``: pixel arrays and concatenated JPEG bytes.

- pixel arrays: ``x_<split>`` uint8 (N, H, W, C), ``y_<split>`` int64 (N,), splits train/test
  and optionally val;
- JPEG bytes: ``jpeg_<split>`` uint8 (bytes,), ``offsets_<split>`` int (N + 1,), ``y_<split>``;
  image i is ``jpeg[offsets[i]:offsets[i+1]]``, decoded with Pillow to RGB.

A ``<stem>.json`` sidecar beside the npz may carry ``class_names``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dsbp.data.jpeg import decode_concatenated
from dsbp.data.locate import cached_arrays, file_key

Splits = dict[str, tuple[np.ndarray, np.ndarray]]


def _require(z: np.lib.npyio.NpzFile, keys: list[str], path: Path) -> None:
    missing = [k for k in keys if k not in z.files]
    if missing:
        raise ValueError(f"{path} lacks arrays {missing} (has {sorted(z.files)})")


def read_pixel_npz(path: Path) -> Splits:
    """Read the pixel-array layout. Returns ``{split: (x uint8 NHWC, y)}``."""
    with np.load(path, allow_pickle=False) as z:
        _require(z, ["x_train", "y_train", "x_test", "y_test"], path)
        splits: Splits = {}
        for s in ("train", "val", "test"):
            if f"x_{s}" in z.files:
                _require(z, [f"y_{s}"], path)
                splits[s] = (z[f"x_{s}"], z[f"y_{s}"])
    return splits


def read_jpeg_npz(path: Path, tag: str) -> Splits:
    """Read the JPEG-bytes layout, decoding once and caching the decoded arrays.

    Args:
        path: The npz file.
        tag: Cache-file prefix (the data set's name).

    Returns:
        ``{split: (x uint8 (N, H, W, 3), y)}``, in the stored order (no shuffling here).
    """
    def build() -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        with np.load(path, allow_pickle=False) as z:
            _require(z, [f"{k}_{s}" for k in ("jpeg", "offsets", "y") for s in ("train", "test")],
                     path)
            for s in ("train", "val", "test"):
                if f"jpeg_{s}" not in z.files:
                    continue
                y = z[f"y_{s}"]
                off = z[f"offsets_{s}"]
                if len(off) != len(y) + 1:
                    raise ValueError(
                        f"{path}: offsets_{s} has {len(off)} entries, expected len(y_{s})+1 = "
                        f"{len(y) + 1}"
                    )
                out[f"x_{s}"] = decode_concatenated(z[f"jpeg_{s}"], off, f"{path} [{s}]")
                out[f"y_{s}"] = np.asarray(y, dtype=np.int64)
        return out

    arrays = cached_arrays(tag, file_key(path), build)
    return {s: (arrays[f"x_{s}"], arrays[f"y_{s}"])
            for s in ("train", "val", "test") if f"x_{s}" in arrays}


def read_shared_npz(path: Path, tag: str) -> Splits:
    """Read either shared layout, chosen by the arrays the file holds."""
    with np.load(path, allow_pickle=False) as z:
        is_jpeg = "jpeg_train" in z.files
    return read_jpeg_npz(path, tag) if is_jpeg else read_pixel_npz(path)


def sidecar_classes(path: Path) -> list[str] | None:
    """``class_names`` from ``<path without .npz>.json`` if that file exists, else None."""
    side = path.with_suffix(".json")
    if not side.is_file():
        return None
    try:
        names = json.loads(side.read_text()).get("class_names")
    except (OSError, ValueError):
        return None
    return [str(n) for n in names] if isinstance(names, list) else None


def num_classes(splits: Splits) -> int:
    """Largest label over all splits, plus one."""
    return int(max(int(np.max(y)) for _, y in splits.values() if len(y))) + 1
