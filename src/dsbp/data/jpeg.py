"""JPEG decoding with Pillow into one uint8 array, in parallel threads.

Pillow is imported here, lazily, so ``import dsbp.data`` stays light. For small images (32x32,
64x64) Python overhead per image (~90 us) dominates the decode itself, and threads measured no
faster than one (CPython GIL), so the default is one worker; ``workers`` > 1 may help for
large images, whose decode time Pillow spends with the GIL released.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - Pillow is in the test extra
        raise ImportError(
            "decoding JPEG data sets needs Pillow: pip install 'dsbp[data]' (or pillow)"
        ) from e
    return Image


def decode_rgb(data: bytes) -> np.ndarray:
    """Decode one JPEG (or any Pillow-readable image) to RGB uint8 (H, W, 3).

    Grayscale and CMYK files are converted to RGB, as the data README asks.
    """
    Image = _pil()
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _decode_many(
    n: int, get: Callable[[int], bytes], what: Callable[[int], str], workers: int | None
) -> np.ndarray:
    if n == 0:
        raise ValueError("no images to decode")

    def one(i: int) -> np.ndarray:
        try:
            return decode_rgb(get(i))
        except Exception as e:  # Pillow raises several types for broken files
            raise ValueError(f"cannot decode {what(i)}: {e}") from e

    first = one(0)
    out = np.empty((n, *first.shape), dtype=np.uint8)
    out[0] = first

    def work(lo_hi: tuple[int, int]) -> None:
        for i in range(*lo_hi):
            img = one(i)
            if img.shape != first.shape:
                raise ValueError(
                    f"{what(i)} decodes to {img.shape}, but the first image is {first.shape}"
                )
            out[i] = img

    workers = max(1, workers or 1)
    if workers == 1:
        work((1, n))
        return out
    step = max(1, -(-(n - 1) // (workers * 4)))  # ~4 chunks per worker for load balance
    chunks = [(lo, min(lo + step, n)) for lo in range(1, n, step)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(work, chunks):
            pass
    return out


def decode_concatenated(
    buf: np.ndarray, offsets: np.ndarray, label: str = "image", workers: int | None = None
) -> np.ndarray:
    """Decode images stored back to back: image i is ``buf[offsets[i]:offsets[i+1]]``.

    Args:
        buf: uint8 (total_bytes,), the concatenated JPEG files.
        offsets: int (N + 1,), increasing, ``offsets[0] == 0``, ``offsets[-1] == len(buf)``.
        label: Prefix naming the source in error messages.
        workers: Decoding threads (default 1, see the module note).

    Returns:
        uint8 (N, H, W, 3); every image must decode to the same size.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    if offsets.ndim != 1 or len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != len(buf):
        raise ValueError(
            f"{label}: offsets must run from 0 to len(jpeg)={len(buf)}, got "
            f"{offsets[:1].tolist()}..{offsets[-1:].tolist()} ({len(offsets)} entries)"
        )
    if np.any(np.diff(offsets) <= 0):
        raise ValueError(f"{label}: offsets are not strictly increasing")
    data = buf.tobytes()
    return _decode_many(
        len(offsets) - 1,
        lambda i: data[offsets[i]:offsets[i + 1]],
        lambda i: f"{label} #{i}",
        workers,
    )


def decode_files(paths: Sequence[Path], workers: int | None = None) -> np.ndarray:
    """Decode image files to one uint8 (N, H, W, 3) array (all must have the same size)."""
    return _decode_many(
        len(paths), lambda i: Path(paths[i]).read_bytes(), lambda i: str(paths[i]), workers
    )
