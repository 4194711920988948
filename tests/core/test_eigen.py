import torch

from dsbp.core.covariance import covariance, gram_matvec
from dsbp.core.eigen import block_power_iteration, orthonormalize, top_eigh
from dsbp.core.subspace import principal_angles


def _known_spectrum(d, evals, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return Q @ torch.diag(torch.as_tensor(evals, dtype=torch.float64)) @ Q.T, Q


def test_block_power_iteration_recovers_known_spectrum():
    d, k = 40, 5
    evals = torch.cat([torch.tensor([50.0, 40, 30, 20, 10]), torch.linspace(1.0, 0.1, d - k)])
    C, Q = _known_spectrum(d, evals)
    V0 = torch.randn(d, k + 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lam, V = block_power_iteration(lambda X: C @ X, V0, iters=60)
    torch.testing.assert_close(lam[:k], evals[:k].double(), rtol=1e-8, atol=1e-8)
    assert principal_angles(V[:, :k], Q[:, :k]).max() < 1e-6
    # Ritz vectors are orthonormal
    torch.testing.assert_close(V.T @ V, torch.eye(k + 3, dtype=torch.float64), atol=1e-10, rtol=0)


def test_power_iteration_converges_geometrically_with_gap():
    # the error after i iterations shrinks like (lambda_{b+1}/lambda_k)^i
    d, k = 30, 3
    evals = torch.tensor([9.0, 6.0, 4.0] + [2.0] * (d - 3))
    C, Q = _known_spectrum(d, evals, seed=3)
    V0 = torch.randn(d, k, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    errs = [principal_angles(block_power_iteration(lambda X: C @ X, V0, it)[1], Q[:, :k]).max()
            for it in (2, 6, 12)]
    assert errs[0] > errs[1] > errs[2]
    # asymptotic rate (lambda_4 / lambda_3)^6 = 0.5^6 between 6 and 12 iterations (2x slack)
    assert errs[2] / errs[1] < 2 * 0.5 ** 6


def test_top_eigh_matches_eigh_and_is_deterministic():
    A = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    C = covariance(A)
    lam, V = top_eigh(C, 4)
    ref = torch.linalg.eigvalsh(C).flip(0)[:4]
    torch.testing.assert_close(lam, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(C @ V, V * lam, rtol=1e-4, atol=1e-3)
    lam2, V2 = top_eigh(C.clone(), 4)
    assert torch.equal(V, V2)


def test_gram_matvec_equals_explicit_covariance():
    A = torch.randn(50, 7, dtype=torch.float64)
    V = torch.randn(7, 3, dtype=torch.float64)
    torch.testing.assert_close(gram_matvec(A)(V), covariance(A) @ V)


def test_orthonormalize_spans_input():
    V = torch.randn(10, 4, dtype=torch.float64)
    Q = orthonormalize(V)
    torch.testing.assert_close(Q.T @ Q, torch.eye(4, dtype=torch.float64))
    assert principal_angles(Q, V).max() < 1e-12
