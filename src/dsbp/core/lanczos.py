"""Lanczos iteration with full reorthogonalisation for a symmetric operator given as a matvec.

Pure tensor math: the operator is a callable ``matvec(v: (dim,)) -> (dim,)``; nothing here knows
about modules. Used for top Hessian eigenpairs (``dsbp.diagnostics``) and for the dominant Hessian
subspace of the Dom/Bulk-SGD baseline (Zakarin & Singh, arXiv 2505.11972).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Matvec = Callable[[torch.Tensor], torch.Tensor]

__all__ = ["density_on_grid", "lanczos", "lanczos_tridiag", "slq"]


def _check_args(dim: int, k: int, iters: int | None) -> int:
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"lanczos: dim must be a positive int, got {dim!r}")
    if not isinstance(k, int) or not 1 <= k <= dim:
        raise ValueError(f"lanczos: k must be an int in [1, dim={dim}], got {k!r}")
    if iters is None:
        # 2k + 20 Krylov vectors resolve the top k Ritz pairs well on the operators we meet
        # (Hessians of small nets, known-spectrum test matrices); capped at dim where the
        # Krylov space is the whole space and the answer is exact.
        iters = 2 * k + 20
    if not isinstance(iters, int) or iters < k:
        raise ValueError(f"lanczos: iters must be an int >= k={k}, got {iters!r}")
    return min(iters, dim)


def _orthogonalise(w: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    # Two passes of classical Gram-Schmidt ("twice is enough", Giraud et al. 2005) keep the
    # basis orthonormal to working precision, which plain Lanczos loses (ghost eigenvalues).
    for _ in range(2):
        w = w - Q @ (Q.T @ w)
    return w


def lanczos_tridiag(
    matvec: Matvec,
    dim: int,
    iters: int,
    *,
    v0: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    restart: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``iters`` Lanczos steps and return the tridiagonal matrix and the Krylov basis.

    With full reorthogonalisation, ``Q^T A Q = T`` to working precision. When an invariant
    subspace is found early (off-diagonal ``beta_j ~ 0``) and ``restart`` is true, a fresh random
    vector orthogonal to ``Q`` continues the iteration (``beta_j = 0`` in ``T``), so repeated
    eigenvalues are found with their multiplicity [ours: standard practice].

    Args:
        matvec: symmetric operator ``v (dim,) -> A v (dim,)``.
        dim: size of the operator.
        iters: number of Lanczos steps m (``<= dim``).
        v0: optional start vector (dim,); random Gaussian when None.
        generator: RNG for the start / restart vectors.
        dtype: working dtype (float64 default; the matvec output is cast to it).
        device: device of the basis; defaults to ``v0``'s device or CPU.
        restart: continue with a new random direction after an early breakdown.

    Returns:
        ``(T, Q, beta_last)``: ``T`` (m, m) symmetric tridiagonal, ``Q`` (dim, m) orthonormal
        columns, ``beta_last`` the final residual norm (scalar tensor; the error bound of the Ritz
        pair ``(theta_i, Q s_i)`` is ``beta_last * |s_i[-1]|``). ``m`` may be smaller than
        ``iters`` when ``restart`` is false and the Krylov space is exhausted.
    """
    if device is None:
        device = v0.device if v0 is not None else torch.device("cpu")
    m = min(int(iters), dim)
    Q = torch.zeros(dim, m, dtype=dtype, device=device)
    alphas = torch.zeros(m, dtype=dtype, device=device)
    betas = torch.zeros(max(m - 1, 0), dtype=dtype, device=device)

    def _random() -> torch.Tensor:
        r = torch.randn(dim, generator=generator, dtype=dtype, device="cpu")
        return r.to(device)

    q = (v0.detach().to(device=device, dtype=dtype).reshape(-1) if v0 is not None else _random())
    if q.numel() != dim:
        raise ValueError(f"lanczos: v0 has {q.numel()} entries, expected dim={dim}")
    norm = torch.linalg.vector_norm(q)
    if norm == 0:
        raise ValueError("lanczos: v0 must be non-zero")
    q = q / norm
    beta_last = torch.zeros((), dtype=dtype, device=device)
    scale = torch.zeros((), dtype=dtype, device=device)  # running estimate of ||A|| for breakdown
    j = 0
    while j < m:
        Q[:, j] = q
        w = matvec(q.clone())
        w = torch.as_tensor(w).detach().reshape(-1).to(device=device, dtype=dtype)
        if w.numel() != dim:
            raise ValueError(f"lanczos: matvec returned {w.numel()} entries, expected dim={dim}")
        alphas[j] = torch.dot(q, w)
        w = _orthogonalise(w, Q[:, : j + 1])
        beta = torch.linalg.vector_norm(w)
        scale = torch.maximum(scale, alphas[j].abs() + beta)
        beta_last = beta
        if j == m - 1:
            break
        tol = 1e3 * torch.finfo(dtype).eps * torch.clamp(scale, min=1.0)
        if beta <= tol:
            if not restart:
                m = j + 1
                Q, alphas, betas = Q[:, :m], alphas[:m], betas[: max(m - 1, 0)]
                break
            # Invariant subspace: continue in its orthogonal complement (T decouples, beta=0).
            w = _orthogonalise(_random(), Q[:, : j + 1])
            beta = torch.zeros((), dtype=dtype, device=device)
            q = w / torch.linalg.vector_norm(w)
        else:
            q = w / beta
        betas[j] = beta
        j += 1
    T = torch.diag(alphas) + torch.diag(betas, 1) + torch.diag(betas, -1)
    return T, Q, beta_last


def lanczos(
    matvec: Matvec,
    dim: int,
    k: int,
    iters: int | None = None,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (algebraically largest) eigenpairs of a symmetric operator by Lanczos.

    Lanczos with full reorthogonalisation builds an orthonormal Krylov basis ``Q`` (dim, m) with
    ``Q^T A Q = T`` tridiagonal; the Ritz pairs of ``T`` approximate the extreme eigenpairs of
    ``A``. With ``m = dim`` the result is exact up to rounding. This is the solver the
    Bulk/Dom-SGD paper uses for the dominant Hessian subspace.

    Args:
        matvec: the operator, ``v (dim,) -> A v (dim,)``; A must be symmetric.
        dim: size of the operator (number of parameters for a Hessian).
        k: number of eigenpairs wanted, ``1 <= k <= dim``.
        iters: Krylov dimension m (default ``min(dim, 2k + 20)``); more steps, better accuracy.
        generator: RNG for the random start vector (reproducibility).
        dtype: working dtype of the basis and T (float64 default: Hessians of float32 nets
            are ill-conditioned enough that fp32 Lanczos loses orthogonality fast).
        device: device of the basis (default CPU). The matvec's output is moved there.

    Returns:
        ``(eigvals, eigvecs)``: ``eigvals`` (k,) in descending order, ``eigvecs`` (dim, k) with
        orthonormal columns (Ritz vectors), both in ``dtype``. Each eigenvector's sign is fixed so
        that its largest-magnitude entry is positive [ours: makes results comparable].

    Raises:
        ValueError: on a bad ``dim``, ``k`` or ``iters``, or a matvec returning the wrong size.
    """
    m = _check_args(dim, k, iters)
    T, Q, _ = lanczos_tridiag(matvec, dim, m, generator=generator, dtype=dtype, device=device)
    theta, S = torch.linalg.eigh(T)  # ascending Ritz values
    idx = torch.argsort(theta, descending=True)[:k]
    vals = theta[idx]
    vecs = Q @ S[:, idx]  # (dim, k)
    # Re-normalise against rounding, fix the sign convention.
    vecs = vecs / torch.linalg.vector_norm(vecs, dim=0, keepdim=True)
    pivot = vecs.abs().argmax(dim=0)
    signs = torch.sign(vecs[pivot, torch.arange(vecs.shape[1], device=vecs.device)])
    signs[signs == 0] = 1
    return vals, vecs * signs


def slq(
    matvec: Matvec,
    dim: int,
    n_probes: int,
    iters: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    probes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017) of a symmetric operator's spectrum.

    For each Rademacher probe ``v`` (normalised), ``iters`` Lanczos steps give the Gauss quadrature
    ``v^T f(A) v / ||v||^2 ~= sum_j w_j f(theta_j)`` with nodes ``theta_j`` (Ritz values) and
    weights ``w_j = s_j[0]^2`` (first components of T's eigenvectors); exact for polynomials of
    degree < 2 * iters. Averaging over probes estimates the spectral measure
    ``(1/dim) sum_i delta(lambda_i)``: ``tr f(A) / dim ~= mean_p sum_j w_pj f(theta_pj)``.

    Args:
        matvec: symmetric operator (dim,) -> (dim,).
        dim: its size.
        n_probes: number of random probes (>= 1).
        iters: Lanczos steps per probe (``<= dim``; clipped).
        generator: RNG for the probes.
        dtype, device: as in :func:`lanczos`.
        probes: optional explicit probe vectors (n_probes, dim) instead of Rademacher draws.

    Returns:
        ``(nodes, weights)``, each (n_probes, m): Ritz values and quadrature weights; each row of
        ``weights`` sums to 1.
    """
    if not isinstance(n_probes, int) or n_probes < 1:
        raise ValueError(f"slq: n_probes must be a positive int, got {n_probes!r}")
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"slq: iters must be a positive int, got {iters!r}")
    m = min(iters, dim)
    nodes, weights = [], []
    if probes is not None and tuple(probes.shape) != (n_probes, dim):
        raise ValueError(f"slq: probes must have shape ({n_probes}, {dim}), got {probes.shape}")
    for p in range(n_probes):
        if probes is not None:
            v = probes[p]
        else:
            v = torch.randint(0, 2, (dim,), generator=generator, dtype=torch.int64) * 2 - 1
        # No restart: after a breakdown the Krylov space of v is exhausted and the quadrature
        # with the shorter T is already exact for v.
        T, _, _ = lanczos_tridiag(matvec, dim, m, v0=v.to(dtype), generator=generator,
                                  dtype=dtype, device=device, restart=False)
        theta, S = torch.linalg.eigh(T)
        w = S[0, :] ** 2
        pad = m - theta.numel()
        if pad:  # zero-weight padding keeps a rectangular result
            theta = torch.cat([theta, theta.new_zeros(pad)])
            w = torch.cat([w, w.new_zeros(pad)])
        nodes.append(theta)
        weights.append(w)
    return torch.stack(nodes), torch.stack(weights)


def density_on_grid(
    nodes: torch.Tensor, weights: torch.Tensor, grid: torch.Tensor, sigma: float
) -> torch.Tensor:
    """Gaussian-smoothed spectral density from :func:`slq` output, evaluated on ``grid`` (g,).

    ``rho(t) = mean_p sum_j w_pj N(t; theta_pj, sigma^2)``; integrates to 1 over the real line.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    t = grid.to(nodes.dtype).reshape(-1, 1, 1)  # (g, 1, 1)
    kern = torch.exp(-0.5 * ((t - nodes) / sigma) ** 2) / (sigma * (2 * torch.pi) ** 0.5)
    return (kern * weights).sum(dim=-1).mean(dim=-1)
