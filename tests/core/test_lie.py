"""dsbp.core.lie against closed forms: dense Cayley, eigh, svdvals."""

from __future__ import annotations

import math

import pytest
import torch

from dsbp.core.lie import (
    cayley,
    cayley_lowrank_apply,
    double_bracket_step,
    is_skew,
    rotation_update,
    skew_factors,
)
from dsbp.core.subspace import principal_angles


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matrices: intra-op threads only add spin-wait overhead on a shared 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _known_spectrum(d: int, evals: torch.Tensor, seed: int, dtype=torch.float64):
    """C = Q diag(evals) Q^T with a random orthogonal Q: a covariance with a known spectrum."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=dtype))
    return Q @ torch.diag(evals.to(dtype)) @ Q.T, Q


def _orth_err(E: torch.Tensor) -> float:
    eye = torch.eye(E.shape[1], dtype=E.dtype)
    return float((E.T @ E - eye).abs().max())


def test_dense_cayley_is_orthogonal_and_matches_the_exponential_for_a_rotation():
    # 2x2: Cay([[0,-t],[t,0]]) is the rotation by 2*atan(t/2) (closed form).
    t = 0.7
    A = torch.tensor([[0.0, -t], [t, 0.0]], dtype=torch.float64)
    th = 2 * math.atan(t / 2)
    R = torch.tensor(
        [[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]], dtype=torch.float64
    )
    assert torch.allclose(cayley(A), R, atol=1e-14)
    with pytest.raises(ValueError, match="skew"):
        cayley(torch.ones(3, 3))
    with pytest.raises(ValueError, match="square"):
        cayley(torch.zeros(2, 3))


def test_lowrank_cayley_equals_dense_cayley():
    g = torch.Generator().manual_seed(0)
    d, r, m = 12, 3, 5
    X = torch.randn(d, r, generator=g, dtype=torch.float64)
    Y = torch.randn(d, r, generator=g, dtype=torch.float64)
    Z = torch.randn(d, m, generator=g, dtype=torch.float64)
    U, V = skew_factors(X, Y)
    A = U @ V.T
    assert is_skew(A) and torch.allclose(A, X @ Y.T - Y @ X.T)
    for s in (0.01, 0.3, 2.0):
        dense = cayley(s * A) @ Z
        fast = cayley_lowrank_apply(U, V, Z, s)
        assert torch.allclose(fast, dense, atol=1e-11, rtol=1e-11), s


def test_double_bracket_keeps_orthonormality_over_many_steps():
    d, k = 64, 6
    evals = torch.linspace(10.0, 0.1, d)
    C, _ = _known_spectrum(d, evals, seed=1)
    E = torch.linalg.qr(
        torch.randn(d, k, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ).Q
    assert _orth_err(E) < 1e-6
    for _ in range(2000):
        E = double_bracket_step(E, C @ E, 0.5 / 10.0)
    assert _orth_err(E) < 1e-6


def test_double_bracket_converges_to_top_k_eigenspace():
    d, k = 40, 4
    evals = torch.cat([torch.tensor([8.0, 6.0, 5.0, 4.0]), torch.linspace(2.0, 0.1, d - k)])
    C, _ = _known_spectrum(d, evals, seed=3)
    E = torch.linalg.qr(
        torch.randn(d, k, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ).Q
    top = torch.linalg.eigh(C).eigenvectors[:, -k:]  # the independent answer
    start = float(principal_angles(E, top).max())
    assert start > 0.5  # a random start is far from the answer
    for _ in range(300):
        E = double_bracket_step(E, C @ E, 0.5 / float(evals[0]))
    assert float(principal_angles(E, top).max()) < 1e-6


def test_double_bracket_first_order_is_ojas_flow():
    # For small eps: E_new - E = eps * (C E - E E^T C E) + O(eps^2).
    d, k = 10, 3
    C, _ = _known_spectrum(d, torch.linspace(3.0, 0.5, d), seed=5)
    E = torch.linalg.qr(
        torch.randn(d, k, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    ).Q
    eps = 1e-5
    step = (double_bracket_step(E, C @ E, eps) - E) / eps
    oja = C @ E - E @ (E.T @ C @ E)
    assert torch.allclose(step, oja, atol=1e-4)


@pytest.mark.parametrize("with_basis", [False, True])
def test_rotation_update_preserves_singular_values(with_basis):
    g = torch.Generator().manual_seed(7)
    d_out, d_in, k = 20, 8, 3
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    sv0 = torch.linalg.svdvals(W)
    E = torch.linalg.qr(torch.randn(d_out, k, generator=g, dtype=torch.float64)).Q
    for _ in range(50):
        G = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
        W_new = rotation_update(W, G, 0.1, E=E if with_basis else None)
        assert not torch.allclose(W_new, W)  # it moved
        W = W_new
    assert torch.allclose(torch.linalg.svdvals(W), sv0, rtol=1e-10, atol=1e-10)


def test_rotation_update_lowrank_matches_dense_formula():
    g = torch.Generator().manual_seed(8)
    d_out, d_in, k = 30, 16, 4
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    G = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    E = torch.linalg.qr(torch.randn(d_out, k, generator=g, dtype=torch.float64)).Q
    Gt = E @ (E.T @ G)
    eta = 0.05
    dense = cayley(-eta * (Gt @ W.T - W @ Gt.T)) @ W
    assert torch.allclose(rotation_update(W, G, eta, E=E), dense, atol=1e-12)
    assert torch.allclose(rotation_update(W, Gt, eta), dense, atol=1e-12)
    # input side: G~ = G F F^T with F (d_in, k)
    F = torch.linalg.qr(torch.randn(d_in, k, generator=g, dtype=torch.float64)).Q
    Gi = G @ F @ F.T
    dense_in = cayley(-eta * (Gi @ W.T - W @ Gi.T)) @ W
    assert torch.allclose(rotation_update(W, G, eta, E=F, side="input"), dense_in, atol=1e-12)
    with pytest.raises(ValueError, match="same shape"):
        rotation_update(W, G[:, :3], eta)
