"""Class-balanced subsets (``dsbp bench --subset N``)."""

from __future__ import annotations

import torch


def balanced_indices(y: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Indices of ``n`` samples split as evenly as possible across the classes present in ``y``.

    Each of the C classes gets ``n // C`` samples; the ``n % C`` left over go one each to
    classes chosen at random [ours]. Within a class the samples are a random choice. Drawn
    from a private generator seeded with ``seed`` (the global RNG is untouched).

    Args:
        y: int labels (N,).
        n: Total subset size, C <= n <= N.
        seed: Seed of the choice.

    Returns:
        int64 (n,) indices into ``y``, sorted ascending (the stored order is kept; shuffling
        is the loader's job).

    Raises:
        ValueError: ``n`` too small for one sample per class, or a class has fewer samples
            than its share.
    """
    if y.ndim != 1:
        raise ValueError(f"y must be 1-D labels, got shape {tuple(y.shape)}")
    y = y.cpu()
    classes, counts = torch.unique(y, return_counts=True)
    c = len(classes)
    if not isinstance(n, int) or n < c:
        raise ValueError(f"n={n!r} is too small: need at least one sample for each of {c} classes")
    g = torch.Generator().manual_seed(int(seed))
    share = torch.full((c,), n // c, dtype=torch.int64)
    share[torch.randperm(c, generator=g)[: n % c]] += 1
    short = [(int(k), int(m), int(s)) for k, m, s in zip(classes, counts, share, strict=True)
             if m < s]
    if short:
        k, m, s = short[0]
        raise ValueError(
            f"class {k} has only {m} samples but a balanced subset of {n} needs {s} per class "
            f"({len(short)} classes too small)"
        )
    picks = []
    for k, s in zip(classes, share, strict=True):
        idx = torch.nonzero(y == k).flatten()
        picks.append(idx[torch.randperm(len(idx), generator=g)[: int(s)]])
    return torch.sort(torch.cat(picks)).values


def balanced_subset(
    x: torch.Tensor, y: torch.Tensor, n: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A class-balanced random subset of ``n`` samples: ``(x[idx], y[idx])``.

    See :func:`balanced_indices` for how ``n`` is split across classes.

    Args:
        x: Samples (N, ...).
        y: int labels (N,).
        n: Subset size.
        seed: Seed of the choice.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
    idx = balanced_indices(y, n, seed)
    return x[idx.to(x.device)], y[idx.to(y.device)]
