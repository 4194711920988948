"""Lanczos against torch.linalg.eigh on operators with a known spectrum."""

from __future__ import annotations

import pytest
import torch

from dsbp.core.lanczos import density_on_grid, lanczos, lanczos_tridiag, slq


def _known_spectrum(eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = eigs.numel()
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return U @ torch.diag(eigs) @ U.T


def _subspace_residual(V: torch.Tensor, U: torch.Tensor) -> float:
    # || (I - U U^T) V ||_F: zero iff span(V) is inside span(U).
    return torch.linalg.norm(V - U @ (U.T @ V)).item()


def test_full_krylov_matches_eigh_exactly():
    eigs = torch.linspace(-3.0, 10.0, 40, dtype=torch.float64)
    A = _known_spectrum(eigs)
    g = torch.Generator().manual_seed(1)
    vals, vecs = lanczos(lambda v: A @ v, 40, k=5, iters=40, generator=g)
    ref_vals, ref_vecs = torch.linalg.eigh(A)
    torch.testing.assert_close(vals, ref_vals.flip(0)[:5], rtol=0, atol=1e-10)
    # Ritz vectors are eigenvectors: A v = lambda v.
    torch.testing.assert_close(A @ vecs, vecs * vals, rtol=0, atol=1e-9)
    assert _subspace_residual(vecs, ref_vecs[:, -5:]) < 1e-8
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(5, dtype=torch.float64), atol=1e-12, rtol=0)


def test_few_iterations_separated_top_eigenvalues():
    # A few outliers above a bulk, the shape of a neural-net Hessian: Lanczos with m << dim
    # resolves them (convergence rate set by the gap to the bulk).
    n = 300
    bulk = torch.rand(n - 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    eigs = torch.cat([torch.tensor([50.0, 30.0, 20.0], dtype=torch.float64), bulk])
    A = _known_spectrum(eigs, seed=3)
    vals, vecs = lanczos(lambda v: A @ v, n, k=3, iters=30, generator=torch.Generator())
    torch.testing.assert_close(vals, torch.tensor([50.0, 30.0, 20.0], dtype=torch.float64),
                               rtol=1e-9, atol=0)
    ref_vals, ref_vecs = torch.linalg.eigh(A)
    assert _subspace_residual(vecs, ref_vecs[:, -3:]) < 1e-6


def test_repeated_eigenvalue_found_with_multiplicity():
    # Lanczos from one start vector sees a repeated eigenvalue once; the restart after the
    # invariant-subspace breakdown must recover its multiplicity.
    eigs = torch.tensor([5.0, 5.0, 5.0, 1.0, 1.0, 0.5], dtype=torch.float64)
    A = _known_spectrum(eigs, seed=4)
    vals, vecs = lanczos(lambda v: A @ v, 6, k=4, iters=6, generator=torch.Generator())
    torch.testing.assert_close(vals, torch.tensor([5.0, 5.0, 5.0, 1.0], dtype=torch.float64),
                               atol=1e-10, rtol=0)
    torch.testing.assert_close(A @ vecs, vecs * vals, atol=1e-9, rtol=0)


def test_tridiagonal_is_projection_of_operator():
    A = _known_spectrum(torch.linspace(0.1, 4.0, 25, dtype=torch.float64), seed=5)
    T, Q, _ = lanczos_tridiag(lambda v: A @ v, 25, 12, generator=torch.Generator())
    torch.testing.assert_close(Q.T @ A @ Q, T, atol=1e-10, rtol=0)
    torch.testing.assert_close(torch.triu(T, 2), torch.zeros_like(T))


def test_float32_matvec_is_cast():
    A = _known_spectrum(torch.linspace(1.0, 2.0, 10, dtype=torch.float64), seed=6).float()
    vals, vecs = lanczos(lambda v: A @ v.float(), 10, k=1, iters=10)
    assert vals.dtype == torch.float64 and vecs.shape == (10, 1)
    assert abs(vals.item() - 2.0) < 1e-5


@pytest.mark.parametrize(
    ("dim", "k", "iters"), [(0, 1, None), (5, 0, None), (5, 6, None), (5, 3, 2)]
)
def test_bad_arguments(dim, k, iters):
    with pytest.raises(ValueError):
        lanczos(lambda v: v, dim, k, iters)


def test_wrong_matvec_size():
    with pytest.raises(ValueError, match="matvec returned"):
        lanczos(lambda v: torch.cat([v, v]), 4, 1)


def test_slq_quadrature_exact_for_low_degree_polynomials():
    # Gauss quadrature with m nodes is exact for degree < 2m: sum_j w_j theta_j^p = v^T A^p v/|v|^2.
    A = _known_spectrum(torch.linspace(-1.0, 3.0, 30, dtype=torch.float64), seed=7)
    g = torch.Generator().manual_seed(8)
    probes = (torch.randint(0, 2, (3, 30), generator=g) * 2 - 1).double()
    nodes, weights = slq(lambda v: A @ v, 30, n_probes=3, iters=6, probes=probes)
    assert nodes.shape == weights.shape == (3, 6)
    torch.testing.assert_close(weights.sum(1), torch.ones(3, dtype=torch.float64))
    for p in range(0, 12):
        quad = (weights * nodes**p).sum(1)
        exact = torch.einsum("pi,ij,pj->p", probes, torch.linalg.matrix_power(A, p), probes) / 30
        torch.testing.assert_close(quad, exact, rtol=1e-8, atol=1e-10)


def test_slq_density_recovers_spectrum():
    eigs = torch.tensor([0.0] * 10 + [5.0] * 10, dtype=torch.float64)
    A = _known_spectrum(eigs, seed=9)
    nodes, weights = slq(lambda v: A @ v, 20, n_probes=20, iters=20,
                         generator=torch.Generator().manual_seed(0))
    grid = torch.linspace(-3, 8, 2201, dtype=torch.float64)
    rho = density_on_grid(nodes, weights, grid, sigma=0.2)
    mass = torch.trapezoid(rho, grid)
    assert abs(mass.item() - 1.0) < 1e-6
    # Half the mass near 0, half near 5 (Rademacher probes: sampling error ~ 1/sqrt(20 * 20)).
    near5 = torch.trapezoid(rho * (grid > 2.5), grid).item()
    assert abs(near5 - 0.5) < 0.15
