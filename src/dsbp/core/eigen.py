"""Top-k eigenpairs of a symmetric PSD operator: block power iteration and an exact fallback.

METHOD.md §1: block (subspace) iteration, warm-started from the previous basis, QR
re-orthonormalisation, fp32, autocast off. A final Rayleigh-Ritz step rotates the block onto
Ritz vectors so the columns come out ordered by eigenvalue (largest first).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Matvec = Callable[[torch.Tensor], torch.Tensor]


def orthonormalize(V: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the column space of ``V`` (d, b) by reduced QR, signs fixed.

    The sign of each column is chosen so the diagonal of R is non-negative, which makes the
    result a deterministic function of ``V``. A stack (B, d, b) is orthonormalised per matrix.
    """
    Q, R = torch.linalg.qr(V, mode="reduced")
    s = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    s = torch.where(s == 0, torch.ones_like(s), s)
    return Q * s.unsqueeze(-2)


def rayleigh_ritz(matvec: Matvec, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ritz pairs of the operator on span(V) (V orthonormal, (d, b)), eigenvalues descending.

    Also for stacks: V (B, d, b) gives eigenvalues (B, b) and vectors (B, d, b).
    """
    CV = matvec(V)  # (d, b)
    T = V.mT @ CV  # (b, b), symmetric up to round-off
    T = 0.5 * (T + T.mT)
    evals, U = torch.linalg.eigh(T)
    evals, U = evals.flip(-1), U.flip(-1)
    return evals, V @ U


def block_power_iteration(
    matvec: Matvec, V0: torch.Tensor, iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block power (subspace) iteration with QR and a final Rayleigh-Ritz step.

    Args:
        matvec: ``V (d, b) -> C V (d, b)`` for the symmetric PSD operator ``C`` (the activation
            covariance ``C_l = A^T A`` of METHOD.md, applied matrix-free as ``A^T (A V)``).
        V0: starting block (d, b); the previous basis when warm-starting. A stack (B, d, b)
            runs B independent iterations at once (``matvec`` must then take stacks too).
        iters: number of power iterations (the paper uses 5).

    Returns:
        ``(eigenvalues (b,), V (d, b))``: Ritz values in descending order and the orthonormal
        Ritz vectors, column ``i`` pairing with eigenvalue ``i``.
    """
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    V = orthonormalize(V0)
    for _ in range(iters):
        V = orthonormalize(matvec(V))
    return rayleigh_ritz(matvec, V)


def top_eigh(C: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` eigenpairs of a symmetric matrix ``C`` (d, d) by ``torch.linalg.eigh``.

    Returns eigenvalues (k,) in descending order and eigenvectors (d, k), with each column's
    sign fixed so its largest-magnitude entry is positive (deterministic output).
    """
    evals, vecs = torch.linalg.eigh(0.5 * (C + C.T))
    evals, vecs = evals.flip(0)[:k], vecs.flip(1)[:, :k]
    idx = vecs.abs().argmax(dim=0)
    s = torch.sign(vecs[idx, torch.arange(vecs.shape[1], device=vecs.device)])
    s = torch.where(s == 0, torch.ones_like(s), s)
    return evals, vecs * s
