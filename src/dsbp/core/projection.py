"""The DSBP gradient projection and its sharpness term (METHOD.md §1).

Shapes: a weight / gradient matrix ``G`` is (d_out, d_in) (conv weights viewed as
C_out x C_in*kh*kw). The basis ``E`` is (d, k) with orthonormal columns, where d = d_out on the
``"output"`` side (left projection, the paper's reading) and d = d_in on the ``"input"`` side
(right projection, the K-FAC "A"-factor reading).
"""

from __future__ import annotations

import torch

SIDES = ("output", "input")


def check_side(side: str) -> str:
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    return side


def project(G: torch.Tensor, E: torch.Tensor, side: str) -> torch.Tensor:
    """Projected gradient ``G~``: ``E E^T G`` (output side) or ``G E E^T`` (input side).

    Computed as two thin products, O(k d_out d_in), never forming the d x d projector.
    """
    if side == "output":
        return E @ (E.T @ G)
    if side == "input":
        return (G @ E) @ E.T
    raise ValueError(f"side must be one of {SIDES}, got {side!r}")


def residual(G: torch.Tensor, E: torch.Tensor, side: str) -> torch.Tensor:
    """The part of ``G`` that the projection removes: ``G - project(G, E, side)``."""
    return G - project(G, E, side)


def sharpness_term(
    W: torch.Tensor, e1: torch.Tensor, lam_hat: torch.Tensor | float, side: str
) -> torch.Tensor:
    """Gradient of the curvature-weighted penalty along the top spectral direction. [ours]

    ``lam_hat * e1 e1^T W`` (output side) or ``lam_hat * W e1 e1^T`` (input side), where
    ``lam_hat = lambda_1 / trace(C)``. The paper writes ``beta * lambda_1 * e1 e1^T``, whose shape
    does not match a non-square W and whose scale grows with the batch; this is the gradient of
    ``lam_hat / 2 * ||e1^T W||^2`` (output side), our well-posed reading. The caller multiplies
    by beta.

    Args:
        W: weight matrix (d_out, d_in).
        e1: top eigenvector (d,), d = d_out (output) or d_in (input).
        lam_hat: normalised top eigenvalue, a scalar.
        side: ``"output"`` or ``"input"``.
    """
    if side == "output":
        return lam_hat * torch.outer(e1, e1 @ W)
    if side == "input":
        return lam_hat * torch.outer(W @ e1, e1)
    raise ValueError(f"side must be one of {SIDES}, got {side!r}")


def dsbp_direction(
    G: torch.Tensor,
    W: torch.Tensor,
    E: torch.Tensor,
    lam_hat: torch.Tensor | float,
    beta: float,
    side: str,
) -> torch.Tensor:
    """The full DSBP update direction ``G~ + beta * lam_hat * e1 e1^T W`` (METHOD.md §1)."""
    out = project(G, E, side)
    if beta != 0.0:
        out = out + beta * sharpness_term(W, E[:, 0], lam_hat, side)
    return out
