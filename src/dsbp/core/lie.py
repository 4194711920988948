"""Cayley map and double-bracket steps on the orthogonal group, dense and in low-rank form.

METHOD.md §2.5 (Lie-algebra-inspired dynamics). A skew-symmetric ``A`` (``A^T = -A``) is an
element of the Lie algebra so(d); its Cayley transform

    Cay(A) = (I - A/2)^{-1} (I + A/2)

is orthogonal, so ``E <- Cay(A) E`` keeps the columns of ``E`` orthonormal and
``W <- Cay(A) W`` keeps the singular values of ``W``.

The skew matrices DSBP meets have rank at most 2r, written ``X Y^T - Y X^T`` with thin
``X, Y`` (d, r). Then ``A = U V^T`` with ``U = [X, Y]`` and ``V = [Y, -X]`` (d, 2r) and, by the
Woodbury identity,

    (I - s/2 U V^T)^{-1} = I + s/2 U (I_{2r} - s/2 V^T U)^{-1} V^T,

so ``Cay(s U V^T) Z`` costs O(d r (r + m)) for ``Z`` (d, m) and one (2r x 2r) solve: no d x d
matrix is formed or inverted.

* Double bracket (basis tracking): with ``P = E E^T`` and a symmetric PSD covariance ``C``,
  ``Omega = [C, P] = C P - P C = (C E) E^T - E (C E)^T``, i.e. ``X = C E``, ``Y = E``. The flow
  ``dE/dt = Omega E = C E - E (E^T C E)`` (for orthonormal ``E``) is Oja's subspace flow, the
  gradient ascent of ``trace(E^T C E)`` on the Stiefel manifold; it converges to the top-k
  eigenspace of ``C`` from almost every start.
* Rotation-only weight update: ``W <- Cay(-eta (G~ W^T - W G~^T)) W``; ``X = G~``, ``Y = W``
  (rank <= 2 d_in), or, on the output side where ``G~ = E (E^T G)``,
  ``G~ W^T - W G~^T = E M^T - M E^T`` with ``M = W G^T E`` (d_out, k): rank <= 2k.
"""

from __future__ import annotations

import torch

__all__ = [
    "cayley",
    "cayley_lowrank_apply",
    "double_bracket_step",
    "is_skew",
    "rotation_update",
    "skew_factors",
]


def is_skew(A: torch.Tensor, atol: float = 1e-6) -> bool:
    """Whether a square matrix is skew-symmetric up to ``atol`` relative to its largest entry."""
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        return False
    scale = max(float(A.abs().max()), 1.0)
    return bool((A + A.T).abs().max() <= atol * scale)


def cayley(A: torch.Tensor, check: bool = True) -> torch.Tensor:
    """Dense Cayley transform ``(I - A/2)^{-1} (I + A/2)`` (d, d) of a skew-symmetric ``A`` (d, d).

    The reference implementation (O(d^3)); :func:`cayley_lowrank_apply` is the fast path.
    ``I - A/2`` is always invertible for a real skew ``A`` (its eigenvalues are ``1 - i w/2``).

    Raises:
        ValueError: ``A`` not square, or (with ``check``) not skew-symmetric.
    """
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"cayley needs a square matrix, got shape {tuple(A.shape)}")
    if check and not is_skew(A):
        raise ValueError(
            "cayley needs a skew-symmetric matrix (A^T = -A); "
            f"max |A + A^T| = {float((A + A.T).abs().max()):.3g}"
        )
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    return torch.linalg.solve(eye - 0.5 * A, eye + 0.5 * A)


def skew_factors(X: torch.Tensor, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(U, V)``, both (d, 2r), with ``U V^T = X Y^T - Y X^T`` for ``X, Y`` (d, r)."""
    if X.shape != Y.shape or X.ndim != 2:
        raise ValueError(
            f"X and Y must be 2-D of the same shape, got {tuple(X.shape)} and {tuple(Y.shape)}"
        )
    return torch.cat([X, Y], dim=1), torch.cat([Y, -X], dim=1)


def cayley_lowrank_apply(
    U: torch.Tensor, V: torch.Tensor, Z: torch.Tensor, scale: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """``Cay(s U V^T) Z`` without forming a d x d matrix (Woodbury, one (r x r) solve).

    ``U V^T`` must be skew-symmetric (build it with :func:`skew_factors`); that is what makes
    the result an orthogonal transform of ``Z``. Not checked here (it would cost O(d^2)).

    Args:
        U, V: (d, r) factors, usually r = 2k.
        Z: (d, m) block to transform (a basis ``E`` or a weight ``W``).
        scale: s, the step (``eps`` of the double bracket, ``-eta`` of the rotation update).

    Returns:
        (d, m) tensor ``(I - A/2)^{-1} (I + A/2) Z`` with ``A = s U V^T``.
    """
    if U.shape != V.shape or U.ndim != 2 or Z.ndim != 2 or Z.shape[0] != U.shape[0]:
        raise ValueError(
            f"shapes do not fit: U {tuple(U.shape)}, V {tuple(V.shape)}, "
            f"Z {tuple(Z.shape)}; need U, V (d, r) and Z (d, m)"
        )
    h = 0.5 * scale
    # (I + A/2) Z, then (I - A/2)^{-1} via Woodbury: only V^T U (r, r) is inverted.
    Y = Z + h * (U @ (V.T @ Z))
    r = U.shape[1]
    K = torch.eye(r, dtype=U.dtype, device=U.device) - h * (V.T @ U)  # (r, r)
    return Y + h * (U @ torch.linalg.solve(K, V.T @ Y))


def double_bracket_step(
    E: torch.Tensor, CE: torch.Tensor, eps: float | torch.Tensor
) -> torch.Tensor:
    """One Cayley step of the double-bracket flow: ``E <- Cay(eps * Omega) E``.

    ``Omega = C P - P C`` with ``P = E E^T`` (METHOD.md §2.5), from ``C E`` alone, so ``C`` can
    be matrix-free (``C E = A^T (A E)``).

    Args:
        E: (d, k) orthonormal basis.
        CE: (d, k) product ``C E`` with the symmetric PSD covariance ``C``.
        eps: step size. The flow's rate along an eigen-direction scales with the eigenvalue
            gaps of ``C``, so a scale-free choice is ``eps = c / lambda_1`` with ``c ~ 0.5``.

    Returns:
        (d, k) basis ``Cay(eps Omega) E``, orthonormal up to round-off.
    """
    if E.shape != CE.shape:
        raise ValueError(
            f"E and CE must have the same shape, got {tuple(E.shape)} and {tuple(CE.shape)}"
        )
    U, V = skew_factors(CE, E)  # U V^T = (C E) E^T - E (C E)^T = C P - P C
    return cayley_lowrank_apply(U, V, E, eps)


def rotation_update(
    W: torch.Tensor,
    G: torch.Tensor,
    eta: float,
    E: torch.Tensor | None = None,
    side: str = "output",
) -> torch.Tensor:
    """Rotation-only weight update ``W <- Cay(-eta (G~ W^T - W G~^T)) W`` (d_out, d_in).

    It moves ``W`` on its orbit under left rotations, so the singular values of ``W`` are
    unchanged (METHOD.md §2.5). To first order in ``eta`` the step is
    ``W - eta (G~ W^T - W G~^T) W``: only the part of the gradient that rotates ``W``.

    Args:
        W: weight (d_out, d_in).
        G: gradient (d_out, d_in). With ``E`` given it is the raw gradient and ``G~`` its DSBP
            projection (``E E^T G`` output side, ``G E E^T`` input side); without ``E``, ``G`` is
            used as ``G~`` as is.
        eta: learning rate.
        E: optional orthonormal basis, (d_out, k) on the output side, (d_in, k) on the input
            side. With it the skew generator has rank <= 2k: ``E M^T - M E^T`` with
            ``M = W G^T E`` (output), or ``X Y^T - Y X^T`` with ``X = G E``, ``Y = W E`` (input).
            Without it, rank <= 2 d_in.
        side: ``"output"`` or ``"input"``, only used with ``E``.

    Returns:
        the updated weight, same shape and dtype as ``W``.
    """
    if W.shape != G.shape or W.ndim != 2:
        raise ValueError(
            f"W and G must be 2-D of the same shape, got {tuple(W.shape)} and {tuple(G.shape)}"
        )
    if E is None:
        U, V = skew_factors(G, W)  # G W^T - W G^T
    elif side == "output":
        if E.ndim != 2 or E.shape[0] != W.shape[0]:
            raise ValueError(f"E must be (d_out={W.shape[0]}, k), got {tuple(E.shape)}")
        U, V = skew_factors(E, W @ (G.T @ E))  # G~ W^T = E (W G^T E)^T
    elif side == "input":
        if E.ndim != 2 or E.shape[0] != W.shape[1]:
            raise ValueError(f"E must be (d_in={W.shape[1]}, k), got {tuple(E.shape)}")
        U, V = skew_factors(G @ E, W @ E)  # G~ W^T = (G E)(W E)^T
    else:
        raise ValueError(f"side must be 'output' or 'input', got {side!r}")
    if U.shape[1] >= W.shape[0]:
        # The factored form is no thinner than the dense one: solve with the d_out x d_out matrix.
        return cayley(-eta * (U @ V.T), check=False) @ W
    return cayley_lowrank_apply(U, V, W, -eta)
