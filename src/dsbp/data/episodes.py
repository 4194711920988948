"""Few-shot episodes (N-way K-shot) from class splits, for spectral meta-learning and MAML."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch


def class_split(
    num_classes: int, fractions: Sequence[float], seed: int = 0
) -> tuple[list[int], ...]:
    """Split class ids ``0..num_classes-1`` at random into disjoint groups (meta-train/val/test).

    Sizes are ``round(f * num_classes)`` for every group but the last, which takes the rest
    [ours].

    Args:
        num_classes: Number of classes.
        fractions: Positive fractions summing to 1, e.g. ``(0.6, 0.2, 0.2)``.
        seed: Seed of the random assignment.

    Returns:
        One sorted list of class ids per fraction; together they cover every class once.
    """
    fr = [float(f) for f in fractions]
    if not fr or any(f <= 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be positive and sum to 1, got {list(fractions)}")
    perm = torch.randperm(num_classes, generator=torch.Generator().manual_seed(int(seed)))
    sizes = [round(f * num_classes) for f in fr[:-1]]
    sizes.append(num_classes - sum(sizes))
    if any(s < 1 for s in sizes):
        raise ValueError(f"{num_classes} classes cannot be split into {fr}: sizes {sizes}")
    out, start = [], 0
    for s in sizes:
        out.append(sorted(perm[start:start + s].tolist()))
        start += s
    return tuple(out)


@dataclass(frozen=True)
class Episode:
    """One N-way K-shot task. Labels are relabelled 0..N-1 in the order of ``classes``.

    Attributes:
        support_x: (N*K, ...) samples, class-major (K of class 0, then K of class 1, ...).
        support_y: int64 (N*K,) in 0..N-1.
        query_x: (N*Q, ...) samples, class-major.
        query_y: int64 (N*Q,).
        classes: int64 (N,) original class ids; ``classes[j]`` is episode label j.
        support_idx: int64 (N*K,) indices into the sampler's ``x``.
        query_idx: int64 (N*Q,) indices into the sampler's ``x``.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    classes: torch.Tensor
    support_idx: torch.Tensor
    query_idx: torch.Tensor


class EpisodeSampler:
    """Draws N-way K-shot episodes with Q queries per class from a subset of classes.

    Episode ``i`` depends only on (seed, i) [ours], so a meta-training run can resume at any
    episode and evaluation episodes are the same for every method compared.

    Args:
        x: Samples (N_total, ...), any dtype/device (uint8 images are kept as is).
        y: int labels (N_total,).
        classes: Class ids episodes may use (e.g. one group of :func:`class_split`).
        n_way: Classes per episode (N).
        k_shot: Support samples per class (K).
        n_query: Query samples per class (Q); support and query never share a sample.
        seed: Base seed.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, classes: Sequence[int], n_way: int,
                 k_shot: int, n_query: int, seed: int = 0) -> None:
        if x.shape[0] != y.shape[0] or y.ndim != 1:
            raise ValueError(f"x ({tuple(x.shape)}) and y ({tuple(y.shape)}) must have the "
                             "same number of samples, y 1-D")
        cls = sorted({int(c) for c in classes})
        if n_way < 1 or k_shot < 1 or n_query < 0:
            raise ValueError(f"need n_way >= 1, k_shot >= 1, n_query >= 0; got {n_way}, "
                             f"{k_shot}, {n_query}")
        if n_way > len(cls):
            raise ValueError(f"n_way={n_way} but only {len(cls)} classes are available")
        y_cpu = y.cpu()
        self._by_class = [torch.nonzero(y_cpu == c).flatten() for c in cls]
        need = k_shot + n_query
        small = [(c, len(i)) for c, i in zip(cls, self._by_class, strict=True) if len(i) < need]
        if small:
            raise ValueError(f"class {small[0][0]} has {small[0][1]} samples; an episode needs "
                             f"k_shot + n_query = {need} ({len(small)} classes too small)")
        self.x, self.y = x, y
        self.classes = cls
        self.n_way, self.k_shot, self.n_query = n_way, k_shot, n_query
        self.seed = int(seed)

    def _generator(self, i: int) -> torch.Generator:
        digest = hashlib.sha256(f"dsbp.episodes:{self.seed}:{int(i)}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    def episode(self, i: int) -> Episode:
        """Episode number ``i`` (deterministic in (seed, i))."""
        g = self._generator(i)
        picked = torch.randperm(len(self.classes), generator=g)[: self.n_way]
        sup, qry = [], []
        for j in picked.tolist():
            pool = self._by_class[j]
            take = pool[torch.randperm(len(pool), generator=g)[: self.k_shot + self.n_query]]
            sup.append(take[: self.k_shot])
            qry.append(take[self.k_shot:])
        s_idx, q_idx = torch.cat(sup), torch.cat(qry)
        ways = torch.arange(self.n_way)
        dev = self.x.device
        return Episode(
            support_x=self.x[s_idx.to(dev)],
            support_y=ways.repeat_interleave(self.k_shot).to(self.y.device),
            query_x=self.x[q_idx.to(dev)],
            query_y=ways.repeat_interleave(self.n_query).to(self.y.device),
            classes=torch.tensor([self.classes[j] for j in picked.tolist()], dtype=torch.int64),
            support_idx=s_idx,
            query_idx=q_idx,
        )

    def episodes(self, count: int, start: int = 0) -> Iterator[Episode]:
        """Episodes ``start, start+1, ..., start+count-1``."""
        for i in range(start, start + count):
            yield self.episode(i)
