"""A place a data set may be stored, and how to read it from there."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dsbp.data.dataset import ImageDataset


@dataclass(frozen=True)
class Candidate:
    """One possible on-disk copy of a data set.

    Attributes:
        path: The file or folder whose existence means "this copy is here".
        layout: Short description of the layout (for error messages and ``source``).
        read: Reads the copy; raises ``ValueError``/``OSError`` if it is corrupt.
    """

    path: Path
    layout: str
    read: Callable[[], ImageDataset]
