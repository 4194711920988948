"""Activation rows -> covariance, matrix-free products, EMA, and row subsampling.

The covariance of a layer's activations ``A`` (n, d) is ``C = A^T A`` (METHOD.md §1, no
normalisation by n: DSBP only needs its eigenvectors and the ratio ``lambda_1 / trace(C)``,
both invariant to that scale). For large ``d`` it is never formed: ``C V = A^T (A V)``.
"""

from __future__ import annotations

import torch

from dsbp.core.eigen import Matvec


def covariance(A: torch.Tensor) -> torch.Tensor:
    """Explicit covariance ``A^T A`` (d, d) of rows ``A`` (n, d)."""
    return A.T @ A


def gram_matvec(A: torch.Tensor) -> Matvec:
    """Matrix-free ``V (d, b) -> A^T (A V)``: costs O(n d b) instead of forming the d x d matrix."""

    def matvec(V: torch.Tensor) -> torch.Tensor:
        return A.mT @ (A @ V)  # also for stacks: A (B, n, d), V (B, d, b)

    return matvec


def trace_of_covariance(A: torch.Tensor) -> torch.Tensor:
    """``trace(A^T A) = ||A||_F^2`` without forming the covariance (a 0-d tensor)."""
    return (A * A).sum()


def ema(old: torch.Tensor | None, new: torch.Tensor, rho: float) -> torch.Tensor:
    """Exponential moving average ``rho * old + (1 - rho) * new`` (``new`` when ``old`` is None)."""
    if not 0.0 <= rho < 1.0:
        raise ValueError(f"EMA factor rho must be in [0, 1), got {rho}")
    if old is None:
        return new.clone()
    return old.mul(rho).add_(new, alpha=1.0 - rho)


def subsample_rows(A: torch.Tensor, max_rows: int, generator: torch.Generator) -> torch.Tensor:
    """At most ``max_rows`` rows of ``A`` (n, d), drawn without replacement.

    The permutation comes from ``generator`` (a CPU generator private to the caller), so the
    global RNG stream of the training run is untouched and a resumed run draws the same rows.
    """
    n = A.shape[0]
    if n <= max_rows:
        return A
    idx = torch.randperm(n, generator=generator)[:max_rows].sort().values
    return A.index_select(0, idx.to(A.device))
