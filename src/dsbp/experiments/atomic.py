"""Atomic file writes: write a temporary file in the same folder, flush, fsync, ``os.replace``.

A crash (or an exception while serialising) at any point leaves either the old file or the
new one, never a truncated mix; the temporary file is removed on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import torch


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write(f)`` on a temporary binary file next to ``path``, then move it into place.

    Args:
        path: destination file; its folder must exist.
        write: fills the open binary file object.

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Atomically write UTF-8 ``text`` to ``path``."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write ``obj`` as indented, key-sorted JSON (NaN allowed, as in ``json``)."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """Atomically write one JSON object per line."""
    return write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def torch_save(path: str | Path, obj: Any) -> Path:
    """Atomically ``torch.save`` ``obj`` to ``path``."""
    return atomic_write(path, lambda f: torch.save(obj, f))


class CorruptFileError(ValueError):
    """A file of a run or sweep that cannot be read; the message names it."""


def read_json(path: str | Path) -> Any:
    """The JSON content of ``path``.

    Raises:
        CorruptFileError: the file is not valid JSON (the message names the file).
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{path} is corrupt (not valid JSON: {err}); move it away or "
                               "restore it") from None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file (blank lines skipped).

    Raises:
        CorruptFileError: a line is not a JSON object (the message names the file and line).
    """
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise CorruptFileError(f"{path}: line {i} is corrupt (not valid JSON: {err})"
                                       ) from None
            if not isinstance(rec, dict):
                raise CorruptFileError(f"{path}: line {i} is not a JSON object")
            out.append(rec)
    return out


def remove_orphans(folder: str | Path) -> list[Path]:
    """Remove the temporary files an interrupted :func:`atomic_write` left in ``folder``
    (``.<name>.<random>.tmp``); returns what was removed. Call it only while no other process
    writes there (e.g. under :class:`FolderLock`)."""
    removed = []
    for p in Path(folder).glob(".*.tmp"):
        if p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


class FolderLock:
    """An exclusive, non-blocking ``fcntl.flock`` on ``folder/.lock``, held while in use.

    The kernel drops the lock when the holding process ends, however it ends (SIGKILL
    included), so a crash never leaves a stale lock behind.

    Raises (on enter):
        FileExistsError: another process holds the lock (the message names the folder and
            the holder's process id and command).
    """

    def __init__(self, folder: str | Path, what: str = "dsbp bench") -> None:
        self.path = Path(folder) / ".lock"
        self.what = what
        self._fd: int | None = None

    def __enter__(self) -> FolderLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            raise FileExistsError(
                f"{self.path.parent} is in use by another process (pid {holder or '?'}); "
                "wait for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}, {self.what}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock; the file stays (removing it would race)
            self._fd = None
