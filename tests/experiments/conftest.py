"""Shared fixtures: the bundled Fashion-MNIST subset (real data, shipped with the package)."""

from __future__ import annotations

import pytest

from dsbp.data import load_dataset


@pytest.fixture(scope="session")
def bundled():
    """The bundled 6000/1000-image Fashion-MNIST subset, loaded once per session."""
    return load_dataset("bundled")
