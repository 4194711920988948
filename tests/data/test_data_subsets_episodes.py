"""Balanced subsets and N-way K-shot episodes."""

from __future__ import annotations

import pytest
import torch

from dsbp.data import load_dataset
from dsbp.data.episodes import EpisodeSampler, class_split
from dsbp.data.subset import balanced_indices, balanced_subset


@pytest.fixture(scope="module")
def fmnist():
    return load_dataset("bundled")


def test_balanced_subset_counts(fmnist) -> None:
    x, y = fmnist.x_train, fmnist.y_train
    xs, ys = balanced_subset(x, y, 500, seed=3)
    assert xs.shape == (500, 1, 28, 28)
    assert torch.bincount(ys, minlength=10).tolist() == [50] * 10
    idx = balanced_indices(y, 500, seed=3)
    assert len(set(idx.tolist())) == 500 and torch.equal(idx, torch.sort(idx).values)
    assert torch.equal(xs, x[idx]) and torch.equal(ys, y[idx])
    # Not divisible: shares differ by at most one, total exact.
    counts = torch.bincount(y[balanced_indices(y, 503, seed=3)], minlength=10)
    assert counts.sum() == 503 and counts.max() - counts.min() == 1
    # Deterministic in the seed, different across seeds.
    assert torch.equal(balanced_indices(y, 500, 3), idx)
    assert not torch.equal(balanced_indices(y, 500, 4), idx)


def test_balanced_subset_errors() -> None:
    y = torch.tensor([0] * 10 + [1] * 3 + [2] * 10)
    with pytest.raises(ValueError, match="class 1 has only 3"):
        balanced_indices(y, 12, 0)
    assert torch.bincount(y[balanced_indices(y, 9, 0)]).tolist() == [3, 3, 3]
    with pytest.raises(ValueError, match="too small"):
        balanced_indices(y, 2, 0)


def test_class_split() -> None:
    parts = class_split(200, (0.64, 0.16, 0.2), seed=1)
    assert [len(p) for p in parts] == [128, 32, 40]
    flat = [c for p in parts for c in p]
    assert sorted(flat) == list(range(200))
    assert class_split(200, (0.64, 0.16, 0.2), seed=1) == parts
    assert class_split(200, (0.64, 0.16, 0.2), seed=2) != parts
    with pytest.raises(ValueError, match="sum to 1"):
        class_split(10, (0.5, 0.4))
    with pytest.raises(ValueError, match="cannot be split"):
        class_split(3, (0.1, 0.1, 0.8))


def test_episodes(fmnist) -> None:
    x, y = fmnist.x_train, fmnist.y_train
    train_cls, test_cls = class_split(10, (0.6, 0.4), seed=0)
    s = EpisodeSampler(x, y, train_cls, n_way=5, k_shot=3, n_query=4, seed=9)
    for i in range(5):
        ep = s.episode(i)
        assert ep.support_x.shape == (15, 1, 28, 28) and ep.query_x.shape == (20, 1, 28, 28)
        assert ep.support_x.dtype == torch.uint8
        assert len(set(ep.classes.tolist())) == 5 and set(ep.classes.tolist()) <= set(train_cls)
        assert torch.bincount(ep.support_y, minlength=5).tolist() == [3] * 5
        assert torch.bincount(ep.query_y, minlength=5).tolist() == [4] * 5
        assert not set(ep.support_idx.tolist()) & set(ep.query_idx.tolist())
        assert len(set(ep.support_idx.tolist())) == 15 and len(set(ep.query_idx.tolist())) == 20
        # Episode label j means original class classes[j], for every sample.
        assert torch.equal(y[ep.support_idx], ep.classes[ep.support_y])
        assert torch.equal(y[ep.query_idx], ep.classes[ep.query_y])
        assert torch.equal(ep.support_x, x[ep.support_idx])
    a = s.episode(3)
    b = EpisodeSampler(x, y, train_cls, 5, 3, 4, seed=9).episode(3)
    assert torch.equal(a.support_idx, b.support_idx) and torch.equal(a.query_idx, b.query_idx)
    assert not torch.equal(s.episode(4).support_idx, a.support_idx)
    assert [e.support_idx.tolist() for e in s.episodes(2, start=3)][0] == a.support_idx.tolist()


def test_episode_errors(fmnist) -> None:
    x, y = fmnist.x_train, fmnist.y_train
    with pytest.raises(ValueError, match="n_way=6"):
        EpisodeSampler(x, y, [0, 1, 2, 3, 4], n_way=6, k_shot=1, n_query=1)
    with pytest.raises(ValueError, match="needs k_shot"):
        EpisodeSampler(x[:30], y[:30], [0, 1], n_way=2, k_shot=5, n_query=5)
