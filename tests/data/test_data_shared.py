"""The real files of shared/data load with the counts and contents their sidecars document.

Skipped (with the reason) where shared/data is absent; CI has it at ../shared/data.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dsbp.data import load_dataset

REPO = Path(__file__).resolve().parents[2]
_CANDS = [REPO.parent / "shared" / "data", Path("/work/shared/data")]
SHARED = next((p for p in _CANDS if (p / "README.md").is_file()), None)
pytestmark = pytest.mark.skipif(
    SHARED is None, reason=f"shared data directory not found (looked in {_CANDS})")


def sidecar(stem: str) -> dict:
    return json.loads((SHARED / f"{stem}.json").read_text())


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory):
    mp = pytest.MonkeyPatch()
    mp.setenv("DSBP_CACHE", str(tmp_path_factory.mktemp("decoded")))
    yield
    mp.undo()


def nhwc_sha(x: torch.Tensor) -> str:
    return hashlib.sha256(x.permute(0, 2, 3, 1).contiguous().numpy().tobytes()).hexdigest()


def per_class(y: torch.Tensor, k: int) -> list[int]:
    return torch.bincount(y, minlength=k).tolist()


def test_fashion_mnist_counts_and_exact_pixels(cache) -> None:
    meta = sidecar("fashion_mnist")
    ds = load_dataset("fashion_mnist", root=SHARED)
    assert ds.x_train.shape == (meta["counts"]["train"], 1, 28, 28) == (60000, 1, 28, 28)
    assert ds.x_test.shape[0] == meta["counts"]["test"] == 10000
    assert per_class(ds.y_train, 10) == meta["counts"]["train_per_class"]
    assert per_class(ds.y_test, 10) == meta["counts"]["test_per_class"]
    assert ds.classes == meta["class_names"]
    for s in ("x_train", "x_test"):
        assert nhwc_sha(getattr(ds, s)) == meta["content_sha256"][s]

    # The bundled subset is, as documented, the first 600 train / 100 test images per class.
    small = load_dataset("bundled")
    for split, k in (("train", 600), ("test", 100)):
        y = getattr(ds, f"y_{split}")
        idx = torch.sort(torch.cat([torch.nonzero(y == c).flatten()[:k] for c in range(10)]))
        assert torch.equal(getattr(small, f"x_{split}"), getattr(ds, f"x_{split}")[idx.values])
        assert torch.equal(getattr(small, f"y_{split}"), y[idx.values])


def test_medmnist_breastmnist_counts_and_exact_pixels(cache) -> None:
    meta = sidecar("medmnist_breastmnist")
    ds = load_dataset("medmnist:breastmnist", root=SHARED)
    assert (ds.x_train.shape[0], ds.x_val.shape[0], ds.x_test.shape[0]) == (546, 78, 156)
    assert per_class(ds.y_train, 2) == meta["counts"]["train_per_class"]
    assert per_class(ds.y_test, 2) == meta["counts"]["test_per_class"]
    assert ds.classes == meta["class_names"]
    for s in ("x_train", "x_val", "x_test"):
        assert nhwc_sha(getattr(ds, s)) == meta["content_sha256"][s]


def check_against_pillow(ds, npz: Path, picks: dict[str, list[int]]) -> None:
    """Images ``picks[split]`` of ``ds`` equal Pillow's own decode of the stored JPEG bytes."""
    from PIL import Image

    with np.load(npz) as d:
        for split, idx in picks.items():
            j, o = d[f"jpeg_{split}"], d[f"offsets_{split}"]
            for i in idx:
                im = Image.open(io.BytesIO(j[o[i]:o[i + 1]].tobytes())).convert("RGB")
                ref = torch.from_numpy(np.array(im))
                assert torch.equal(getattr(ds, f"x_{split}")[i].permute(1, 2, 0), ref), (split, i)


def test_tiny_imagenet_subset(cache) -> None:
    pytest.importorskip("PIL")
    meta = sidecar("tiny_imagenet_jpeg")
    ds = load_dataset("tiny_imagenet", root=SHARED)
    assert ds.x_train.shape == (meta["counts"]["train"], 3, 64, 64) == (6000, 3, 64, 64)
    assert ds.x_test.shape[0] == meta["counts"]["test"] == 2000
    assert per_class(ds.y_train, 200) == [30] * 200
    assert per_class(ds.y_test, 200) == [10] * 200
    assert ds.classes == meta["class_names"]
    check_against_pillow(ds, SHARED / "tiny_imagenet_jpeg.npz",
                         {"train": [0, 4321], "test": [1999]})


@pytest.mark.slow
def test_cifar10_jpeg_copy(cache) -> None:
    pytest.importorskip("PIL")
    meta = sidecar("cifar10_jpeg")
    ds = load_dataset("cifar10", root=SHARED)
    assert ds.x_train.shape == (meta["counts"]["train"], 3, 32, 32) == (50000, 3, 32, 32)
    assert ds.x_test.shape[0] == meta["counts"]["test"] == 10000
    assert per_class(ds.y_train, 10) == [5000] * 10
    # Class-major as stored: kept in that order (shuffling is the loader's job).
    assert bool((ds.y_train[1:] >= ds.y_train[:-1]).all())
    assert ds.classes == meta["class_names"]
    check_against_pillow(ds, SHARED / "cifar10_jpeg.npz",
                         {"train": [0, 31337], "test": [9999]})
