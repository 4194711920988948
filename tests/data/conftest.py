"""Fixtures shared by the dsbp.data tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A sandbox where no real data set can be found: cwd, HOME, caches all under tmp_path.

    Returns the directory to use as ``root=``.
    """
    work = tmp_path / "home" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DSBP_DATA", raising=False)
    monkeypatch.setenv("DSBP_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "root"
    root.mkdir()
    return root
