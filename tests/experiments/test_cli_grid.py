"""How ``dsbp bench`` flags expand into the grid of runs."""

from __future__ import annotations

import pytest

from dsbp.cli import _grid_from_args, build_parser


def _grid(*flags: str):
    argv = ["bench", *flags]
    return _grid_from_args(build_parser(argv).parse_args(argv))[0]


def test_seeds_count_from_zero_by_default():
    runs = _grid("--methods", "sgd,dsbp", "--seeds", "2")
    assert sorted((r.cfg.method, r.cfg.seed) for r in runs) == [
        ("dsbp", 0), ("dsbp", 1), ("sgd", 0), ("sgd", 1)]


def test_first_seed_shifts_the_seed_range():
    """One seed per parallel worker: --seeds 1 --first-seed 2 runs seed 2 only."""
    runs = _grid("--methods", "sgd", "--seeds", "2", "--first-seed", "3")
    assert [r.cfg.seed for r in runs] == [3, 4]
    assert len({r.name for r in runs}) == 2  # distinct run directories


def test_negative_first_seed_is_rejected():
    with pytest.raises(ValueError, match="first-seed"):
        _grid("--methods", "sgd", "--first-seed", "-1")
