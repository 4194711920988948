"""Shared fixtures: the bundled Fashion-MNIST subset (real data, shipped with the package)."""

from __future__ import annotations

import pytest
import torch

from dsbp.data import load_dataset


@pytest.fixture(scope="session")
def bundled():
    """The bundled 6000/1000-image Fashion-MNIST subset, loaded once per session."""
    return load_dataset("bundled")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared CPU: one intra-op thread is faster (no thread-pool waits) and
    the bit-exact comparisons do not depend on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
