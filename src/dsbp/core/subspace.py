"""Subspace geometry: principal angles, drift, gradient energy kept, effective rank."""

from __future__ import annotations

import torch

from dsbp.core.projection import project


def _orth64(U: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(U.to(torch.float64), mode="reduced").Q


def principal_angles(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, float64, ascending) between span(U) and span(V).

    ``U`` (d, k1) and ``V`` (d, k2) need not be orthonormal. Angles are computed from the sines
    (singular values of ``(I - Q_U Q_U^T) Q_V``) where they are small and from the cosines
    where they are large, so angles near 0 are accurate to ~1e-15 instead of the ~1e-8 that
    ``arccos`` of the cosines gives.
    """
    if U.shape[0] != V.shape[0]:
        raise ValueError(f"U and V must have the same number of rows, got {U.shape} and {V.shape}")
    Qu, Qv = _orth64(U), _orth64(V)
    if Qu.shape[1] < Qv.shape[1]:
        Qu, Qv = Qv, Qu
    cos = torch.linalg.svdvals(Qu.T @ Qv).clamp(max=1.0).flip(0)  # ascending cosines
    sin = torch.linalg.svdvals(Qv - Qu @ (Qu.T @ Qv)).clamp(max=1.0)  # descending sines
    small = torch.arcsin(sin)  # paired with the ascending-cosine order (largest angle first)
    large = torch.arccos(cos)
    angles = torch.where(sin < 0.5 ** 0.5, small, large)
    return angles.flip(0)


def drift(E_old: torch.Tensor, E_new: torch.Tensor) -> torch.Tensor:
    """Subspace drift ``delta = sqrt(1 - ||E_old^T E_new||_F^2 / k)`` in [0, 1] (METHOD.md §2.1).

    0 when the spans agree, 1 when they are orthogonal. Both bases orthonormal, (d, k).
    """
    k = E_old.shape[1]
    overlap = (E_old.T.to(torch.float64) @ E_new.to(torch.float64)).pow(2).sum() / k
    return (1.0 - overlap).clamp(min=0.0).sqrt()


def energy_kept(G: torch.Tensor, E: torch.Tensor, side: str) -> torch.Tensor:
    """Fraction of gradient norm kept by the projection, ``||P(G)||_F / ||G||_F`` in [0, 1].

    Returns 1 for a zero gradient (nothing is lost).
    """
    g = G.to(torch.float64)
    gn = torch.linalg.matrix_norm(g)
    if gn == 0:
        return torch.ones((), dtype=torch.float64)
    return torch.linalg.matrix_norm(project(g, E.to(torch.float64), side)) / gn


def effective_rank(eigvals: torch.Tensor) -> torch.Tensor:
    """Entropy effective rank ``exp(H(p))`` with ``p = lambda / sum(lambda)`` (Roy & Vetterli)."""
    lam = eigvals.to(torch.float64).clamp(min=0)
    total = lam.sum()
    if total == 0:
        return torch.zeros((), dtype=torch.float64)
    p = lam / total
    p = p[p > 0]
    return torch.exp(-(p * p.log()).sum())


def rank_for_energy(eigvals: torch.Tensor, tau: float) -> int:
    """Smallest ``r`` with ``sum_{i<r} lambda_i >= tau * sum_i lambda_i`` (eigvals descending)."""
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"energy threshold tau must be in (0, 1], got {tau}")
    lam = eigvals.to(torch.float64).clamp(min=0)
    total = lam.sum()
    if total == 0:
        return 1
    frac = torch.cumsum(lam, 0) / total
    return int(torch.searchsorted(frac, torch.tensor(tau, dtype=frac.dtype) - 1e-12).item()) + 1
