"""Where data sets are looked for, and the decoded-array cache.

Search order for data files [ours]: explicit ``root``, ``$DSBP_DATA``, ``./data``,
``../shared/data``, ``~/.cache/dsbp``. The first root holding a readable copy wins; inside one
root the exact official layout is preferred over a lossy or subset copy.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np

# Bump when the layout of cached arrays changes, so old cache files are ignored.
CACHE_FORMAT = 1


def search_roots(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """Directories to search for data, in priority order, without duplicates.

    Args:
        root: An explicit directory; searched first when given.

    Returns:
        Absolute, normalised paths (they need not exist).
    """
    cands: list[Path] = []
    if root is not None:
        cands.append(Path(root).expanduser())
    env = os.environ.get("DSBP_DATA")
    if env:
        cands.append(Path(env).expanduser())
    cands += [Path("data"), Path("..") / "shared" / "data", Path("~/.cache/dsbp").expanduser()]
    out: list[Path] = []
    for c in cands:
        a = Path(os.path.abspath(c))  # normalises "..", keeps symlinks
        if a not in out:
            out.append(a)
    return out


def download_root(root: str | os.PathLike[str] | None = None) -> Path:
    """Directory downloads go to: ``root``, else ``$DSBP_DATA``, else ``~/.cache/dsbp``."""
    if root is not None:
        return Path(root).expanduser().absolute()
    env = os.environ.get("DSBP_DATA")
    if env:
        return Path(env).expanduser().absolute()
    return Path("~/.cache/dsbp").expanduser().absolute()


def cache_dir() -> Path:
    """Directory of decoded-array caches: ``$DSBP_CACHE`` or ``~/.cache/dsbp/decoded``."""
    env = os.environ.get("DSBP_CACHE")
    if env:
        return Path(env).expanduser().absolute()
    return Path("~/.cache/dsbp/decoded").expanduser().absolute()


def file_key(*paths: Path) -> str:
    """Cache key from the paths, sizes and modification times of source files.

    Size + mtime (not a content hash) so checking the cache costs one ``stat`` per file; a
    rewritten file changes its mtime and so misses the cache.
    """
    h = hashlib.sha256(f"v{CACHE_FORMAT}".encode())
    for p in paths:
        st = p.stat()
        h.update(f"|{p.absolute()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def atomic_save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` via a temporary file and ``os.replace``.

    A crash mid-write leaves at most a stray temp file, never a truncated ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            # Uncompressed: reading back is a memcpy, and decoding JPEG is what we avoid.
            # (cast: numpy's stub types **kwds against its allow_pickle: bool keyword)
            np.savez(f, **cast("dict[str, Any]", arrays))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def cached_arrays(
    tag: str, key: str, build: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Return arrays from the decoded cache, building and storing them on a miss.

    Args:
        tag: Readable prefix of the cache file name (e.g. ``"cifar10_jpeg"``).
        key: Source fingerprint from :func:`file_key`.
        build: Produces the arrays (the slow decode) on a cache miss.

    A cache file that cannot be read is rebuilt; a cache directory that cannot be written
    gives a warning and the arrays are returned uncached.
    """
    path = cache_dir() / f"{tag}-{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError) as e:
            warnings.warn(f"ignoring unreadable cache file {path}: {e}", stacklevel=3)
    arrays = build()
    try:
        atomic_save_npz(path, arrays)
    except OSError as e:
        warnings.warn(f"could not write decoded cache {path}: {e}", stacklevel=3)
    return arrays
