"""Top eigenpairs, Hutchinson trace and SLQ density against exact Hessians."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsbp.diagnostics.hessian import (
    hessian_spectral_density,
    hessian_top_eigenvalues,
    hessian_trace,
)


def _quadratic(helpers, eigs, d_out=4, d_in=3, seed=0):
    A = helpers.known_spectrum(torch.tensor(eigs, dtype=torch.float64), seed=seed)
    model = helpers.QuadraticModel(d_out, d_in)
    c = torch.randn(d_out * d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return model, helpers.quadratic_loss(A), [(torch.zeros(1), c)], A


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_quadratic_known_spectrum(helpers, method):
    eigs = [9.0, 6.0, 4.0] + [0.5 + 0.1 * i for i in range(9)]
    model, loss, batches, _ = _quadratic(helpers, eigs)
    res = hessian_top_eigenvalues(model, loss, batches, k=3, method=method,
                                  iters=200 if method == "power" else None, tol=1e-12,
                                  generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(res.eigenvalues, torch.tensor([9.0, 6.0, 4.0], dtype=torch.float64),
                               rtol=1e-6, atol=0)
    assert res.eigenvectors.shape == (12, 3)
    assert res.param_names == ("lin.weight",)


def test_mlp_matches_exact_hessian(helpers):
    model, batches = helpers.tiny_mlp(), helpers.tiny_batches()
    names = [n for n, _ in model.named_parameters()]
    H = helpers.exact_hessian(model, batches, names)
    ref_vals, ref_vecs = torch.linalg.eigh(H)
    res = hessian_top_eigenvalues(model, F.cross_entropy, batches, k=3, iters=24,
                                  generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(res.eigenvalues, ref_vals.flip(0)[:3], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(H @ res.eigenvectors, res.eigenvectors * res.eigenvalues,
                               atol=1e-5, rtol=0)


def test_per_layer_blocks(helpers):
    model, batches = helpers.tiny_mlp(), helpers.tiny_batches()
    res = hessian_top_eigenvalues(model, F.cross_entropy, batches, k=2, per_layer=True, iters=20,
                                  generator=torch.Generator().manual_seed(0))
    assert set(res) == {"0", "2"}
    for name in ("0", "2"):
        block = helpers.exact_hessian(model, batches, [f"{name}.weight"])
        ref = torch.linalg.eigvalsh(block).flip(0)[:2]
        torch.testing.assert_close(res[name].eigenvalues, ref, rtol=1e-7, atol=1e-10)
    tr = hessian_trace(model, F.cross_entropy, batches, n_samples=4, per_layer=True)
    assert set(tr) == {"0", "2"}


def test_hutchinson_trace(helpers):
    model, batches = helpers.tiny_mlp(), helpers.tiny_batches(sizes=(12,))
    names = [n for n, _ in model.named_parameters()]
    exact = torch.trace(helpers.exact_hessian(model, batches, names)).item()
    est = hessian_trace(model, F.cross_entropy, batches, n_samples=100,
                        generator=torch.Generator().manual_seed(0))
    assert est.stderr > 0
    assert abs(est.mean - exact) < 4 * est.stderr  # unbiased: within 4 standard errors
    # Diagonal Hessian: Rademacher probes are exact (v^T D v = tr D for every v).
    eigs = [3.0, 2.0, 1.0, 0.5, 0.25, 0.1]
    A = torch.diag(torch.tensor(eigs, dtype=torch.float64))
    qm = helpers.QuadraticModel(2, 3)
    est = hessian_trace(qm, helpers.quadratic_loss(A), [(torch.zeros(1), torch.zeros(6))],
                        n_samples=3)
    assert abs(est.mean - sum(eigs)) < 1e-12 and est.stderr < 1e-12


def test_spectral_density_mass_and_mean(helpers):
    eigs = [4.0] * 2 + [1.0] * 10
    model, loss, batches, A = _quadratic(helpers, eigs)
    sd = hessian_spectral_density(model, loss, batches, n_probes=30, iters=12,
                                  generator=torch.Generator().manual_seed(0))
    assert abs(torch.trapezoid(sd.density, sd.grid).item() - 1.0) < 1e-3
    # First moment of the quadrature = Hutchinson estimate of tr(A)/dim; exact value 1.5.
    first = (sd.weights * sd.nodes).sum(1)
    se = first.std().item() / 30**0.5
    assert abs(first.mean().item() - sum(eigs) / 12) < 4 * se + 1e-12


def test_bad_method(helpers):
    with pytest.raises(ValueError, match="method"):
        hessian_top_eigenvalues(helpers.tiny_mlp(), F.cross_entropy, helpers.tiny_batches(),
                                method="arnoldi")
