"""The DSBP gradient projection and its sharpness term (METHOD.md §1).

Shapes: a weight / gradient matrix ``G`` is (d_out, d_in) (conv weights viewed as
C_out x C_in*kh*kw). The basis ``E`` is (d, k) with orthonormal columns, where d = d_out on the
``"output"`` side (left projection, the paper's reading) and d = d_in on the ``"input"`` side
(right projection, the K-FAC "A"-factor reading).
"""

from __future__ import annotations

from collections.abc import Callable

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


RowSum = Callable[[torch.Tensor], torch.Tensor]


def dsbp_coordinates(
    G: torch.Tensor,
    E: torch.Tensor,
    side: str,
    *,
    W: torch.Tensor | None = None,
    scale: torch.Tensor | float = 0.0,
    residual: float = 0.0,
    rescale: bool = False,
    max_rescale: float = 10.0,
    row_sum: RowSum | None = None,
) -> torch.Tensor:
    """The DSBP direction's part in the basis: the thin factor ``M`` of :func:`dsbp_update_`.

    Output side ``M = (1 - a) c E^T G + s e_1 (e1^T W)`` (k, d_in); input side
    ``M = (1 - a) c G E + s (W e1) e_1^T`` (d_out, k), with ``e_1`` the first unit vector of
    R^k, ``s`` the sharpness scale (``beta * lambda_1 / trace C``), ``a`` the residual weight and
    ``c = min(||G|| / ||E^T G||, max_rescale)`` when ``rescale`` (``||E E^T G|| = ||E^T G||``
    for orthonormal E), else 1. Then the direction is ``a G + E M`` (output) or ``a G + M E^T``
    (input). With ``a = 0`` and no rescale, ``M`` is the coordinates of the direction in the
    basis (what :class:`~dsbp.optim.subspace_state.SubspaceAdam` keeps its moments on).

    All of it works on one matrix or a stack: G, W (B, d_out, d_in), E (B, d, k), ``scale`` (B,).

    Row shards: when each process holds some rows of G and W (FSDP2), pass the rows of E that
    match them (output side) and a ``row_sum`` that adds a tensor up over the shards: the
    output side's ``E^T G`` and ``e1^T W`` are sums over rows, and the rescale's norms too.
    """
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    output, stacked = side == "output", G.dim() == 3
    G = G.to(E.dtype)
    W = None if W is None else W.to(E.dtype)
    if row_sum is None and not stacked and not rescale:  # the common case, fewest kernels
        M = torch.mm(E.T, G) if output else torch.mm(G, E)
        if residual:
            M.mul_(1.0 - residual)
        if W is not None:
            s = torch.as_tensor(scale, dtype=M.dtype, device=M.device)
            if output:
                M[:1].addcmul_(E[:, :1].T @ W, s)
            else:
                M[:, :1].addcmul_(W @ E[:, :1], s)
        return M
    rsum: RowSum = row_sum if row_sum is not None else (lambda t: t)
    u: torch.Tensor | None = None
    if output:
        M = E.mT @ G  # (k, d_in)
        if W is not None:  # e1^T W rides along in the same reduction
            M = rsum(torch.cat([M, E[..., :, :1].mT @ W], dim=-2))
            M, u = M[..., :-1, :], M[..., -1:, :]
        else:
            M = rsum(M)
    else:
        M = G @ E  # (d_out, k): row-local
        u = None if W is None else W @ E[..., :, :1]  # (d_out, 1)
    coef: torch.Tensor | float = 1.0 - residual
    if rescale:
        g2, m2 = G.square().sum((-2, -1)), M.square().sum((-2, -1))
        if output:  # M is already summed over the shards
            g2 = rsum(g2)
        else:
            g2, m2 = rsum(torch.stack([g2, m2])).unbind(0)
        c = (g2.sqrt() / m2.sqrt().clamp(min=1e-30)).clamp(max=max_rescale)
        coef = c.view(-1, 1, 1) * (1.0 - residual) if stacked else c * (1.0 - residual)
    if isinstance(coef, torch.Tensor) or coef != 1.0:
        M = M * coef
    if u is not None:
        s = torch.as_tensor(scale, dtype=M.dtype, device=M.device)
        s = s.view(-1, 1, 1) if stacked and s.dim() == 1 else s
        if output:
            M[..., :1, :] += s * u
        else:
            M[..., :, :1] += s * u
    return M


def _write(G: torch.Tensor, E: torch.Tensor, M: torch.Tensor, side: str, a: float) -> None:
    """``G <- a G + E M`` (output) or ``a G + M E^T`` (input) in one pass over G."""
    L, R = (E, M) if side == "output" else (M, E.mT)
    if G.dtype != E.dtype:
        G.mul_(a).add_(L @ R) if a else G.copy_(L @ R)
    elif G.dim() == 3:
        G.baddbmm_(L, R, beta=a) if a else torch.bmm(L, R, out=G)
    elif a:
        G.addmm_(L, R, beta=a)
    elif G.is_contiguous():
        torch.mm(L, R, out=G)
    else:
        G.copy_(L @ R)


def dsbp_update_(
    G: torch.Tensor,
    E: torch.Tensor,
    side: str,
    *,
    W: torch.Tensor | None = None,
    scale: torch.Tensor | float = 0.0,
    residual: float = 0.0,
    rescale: bool = False,
    max_rescale: float = 10.0,
    row_sum: RowSum | None = None,
    host_check: bool = False,
    in_span: bool = False,
) -> torch.Tensor:
    """Overwrite ``G`` with the DSBP direction, in place; return which matrices were finite.

    ``G <- a G + (1 - a) c E E^T G + s e1 e1^T W`` (output side) or
    ``G <- a G + (1 - a) c G E E^T + s W e1 e1^T`` (input side): METHOD.md §1's projection and
    sharpness term, with our residual and rescale switches (see :func:`dsbp_coordinates`, which
    computes the thin factor). This is the one place DSBP's update is written; every execution
    path (the per-weight loop, the stacked path, the CUDA graph) calls it, and SubspaceAdam
    calls :func:`dsbp_coordinates`.

    Non-finite gradients: a projection would spread one bad entry over a whole column (output
    side) or row (input side). Where the thin factor is not finite, that matrix is left as it
    was, and the returned bool tensor (() or (B,)) is False for it (also when the thin
    factor's sum overflows: a gradient that large is not projected either). With ``host_check`` the
    flag is read on the host (free on a CPU) and a finite update is written in one pass;
    without it the update is masked on the device (no synchronisation: CUDA graphs).

    Args:
        G: gradient (d_out, d_in) or stack (B, d_out, d_in); overwritten.
        E: orthonormal basis (d, k) or (B, d, k).
        side: ``"output"`` or ``"input"``.
        W: the weights (same shape as G), needed when ``scale`` is non-zero.
        scale: sharpness scale ``beta * lambda_1 / trace C``: a number, 0-d or (B,) tensor.
        residual: a in [0, 1], the weight kept on the plain gradient.
        rescale, max_rescale: rescale the projected part to the gradient's norm, at most so.
        row_sum: sums over row shards (see :func:`dsbp_coordinates`); None: no shards.
        host_check: read the finiteness flag on the host (see above).
        in_span: ``G`` is already ``E E^T G`` (or ``G E E^T``), as a low-rank backward
            (:mod:`dsbp.layers.lowrank`) computes it with no residual: the projection is the
            identity on it, so only the sharpness term is added (one thin product instead of
            two). Not with ``residual``, ``rescale`` or row shards.
    """
    if in_span:
        if residual or rescale or row_sum is not None or G.dim() != 2:
            raise ValueError("in_span needs the pure projection of one unsharded matrix")
        if W is not None:
            G.add_(sharpness_term(W.to(E.dtype), E[:, 0], scale, side).to(G.dtype))
        return torch.isfinite(G.sum())
    M = dsbp_coordinates(G, E, side, W=W, scale=scale, residual=residual, rescale=rescale,
                         max_rescale=max_rescale, row_sum=row_sum)
    ok = torch.isfinite(M.sum((-2, -1)))  # a NaN or inf anywhere makes the sum non-finite
    if host_check and bool(ok.all()):
        _write(G, E, M, side, residual)
        return ok
    okv = ok.view(-1, 1, 1) if G.dim() == 3 else ok
    M = torch.where(okv, M, torch.zeros((), dtype=M.dtype, device=M.device))
    keep = torch.where(okv, torch.full((), residual, dtype=G.dtype, device=G.device),
                       torch.ones((), dtype=G.dtype, device=G.device))
    G.mul_(keep)  # a G where finite, G unchanged where not
    G.add_((E @ M) if side == "output" else (M @ E.mT))
    return ok


def dsbp_direction(
    G: torch.Tensor,
    W: torch.Tensor,
    E: torch.Tensor,
    lam_hat: torch.Tensor | float,
    beta: float,
    side: str,
) -> torch.Tensor:
    """The full DSBP update direction ``E E^T G + beta * lam_hat * e1 e1^T W`` (METHOD.md §1),
    out of place (:func:`dsbp_update_` on a copy)."""
    out = G.clone()
    dsbp_update_(out, E, side, W=W, scale=beta * lam_hat)
    return out
