"""SDE check of Proposition 1 on a quadratic: weak order 1, Monte Carlo against closed form."""

from __future__ import annotations

import math

import pytest
import torch

from dsbp.diagnostics.sde import (
    _ou_transition,
    fit_order,
    quadratic_weak_error,
    regression_net_weak_error,
)


def test_fit_order_recovers_power_law():
    etas = [0.2, 0.1, 0.05]
    order, se = fit_order(etas, [3.0 * e**1.5 for e in etas])
    assert abs(order - 1.5) < 1e-12 and se == 0.0
    with pytest.raises(ValueError):
        fit_order(etas, [1.0, 0.0, 1.0])


def test_ou_transition_matches_fine_euler_moments():
    # Independent check of the exact transition: the mean and covariance ODEs integrated with
    # many small steps (dm = -(M m - b) dt, dS = -(M S + S M^T) dt + Q dt).
    g = torch.Generator().manual_seed(0)
    M = 0.5 * torch.randn(4, 4, generator=g, dtype=torch.float64)
    M = M + torch.eye(4, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)
    G = torch.randn(4, 2, generator=g, dtype=torch.float64)
    Q = G @ G.T
    Phi, shift, Qd = _ou_transition(M, b, Q, 0.7)
    m0 = torch.randn(4, generator=g, dtype=torch.float64)

    def euler(n):
        m, S, h = m0.clone(), torch.zeros(4, 4, dtype=torch.float64), 0.7 / n
        for _ in range(n):
            m, S = m - h * (M @ m - b), S - h * (M @ S + S @ M.T) + h * Q
        return m, S

    (m1, S1), (m2, S2) = euler(2000), euler(4000)
    # Richardson extrapolation of the first-order Euler results: error O(h^2) ~ 1e-7.
    torch.testing.assert_close(Phi @ m0 + shift, 2 * m2 - m1, atol=1e-6, rtol=0)
    torch.testing.assert_close(Qd, 2 * S2 - S1, atol=1e-6, rtol=0)


@pytest.fixture
def one_thread():
    # Tiny tensors: extra threads only add contention on a shared CPU.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_quadratic_weak_order_is_one(one_thread):
    res = quadratic_weak_error(etas=(0.1, 0.05, 0.025), horizon=1.0, n_paths=1000, seed=0)
    # Monte Carlo is honest: each estimate agrees with the closed form within 4 standard errors,
    # and the standard errors are far below the errors being measured.
    for err, se, ex in zip(res.weak_error, res.mc_stderr, res.exact_error, strict=True):
        assert abs(err - ex) < 4 * se
        assert se < err / 20
    # Tolerance 0.1: the weak error is C1 eta + C2 eta^2 + ...; with eta <= 0.1 and the drift's
    # norm ~2, the second-order term bends the fitted slope by a few hundredths (measured
    # ~0.97 on this grid), while an order-0.5 or order-2 method is far outside the band.
    assert abs(res.order_exact - 1.0) < 0.1
    assert abs(res.order - 1.0) < 0.1
    assert res.order_stderr < 0.02


@pytest.mark.slow
def test_regression_net_runs_and_reports_consistent_parts(one_thread):
    res = regression_net_weak_error(etas=(0.2, 0.1), horizon=0.4, n_paths=200, n=16,
                                    batch=8, n_sub=1, chunk=200)
    assert len(res.weak_error) == 2 and all(se > 0 for se in res.mc_stderr)
    for err, a, b in zip(res.weak_error, res.mean_f_iterates, res.mean_f_sde, strict=True):
        assert math.isclose(err, abs(a - b))
    with pytest.raises(ValueError, match="refresh"):
        regression_net_weak_error(refresh="sometimes")


def test_regression_net_building_blocks_match_torch_and_core():
    # The batched net's per-sample gradients, projection and sharpness term against an
    # nn.Sequential with the same weights and dsbp.core.projection.
    from torch import nn

    from dsbp.core.projection import project, sharpness_term
    from dsbp.diagnostics.sde import _RegressionNet

    g = torch.Generator().manual_seed(0)
    X = torch.randn(6, 3, generator=g, dtype=torch.float64)
    Y = torch.randn(6, generator=g, dtype=torch.float64)
    net = _RegressionNet(X, Y, hidden=4, k=2, beta=0.1)
    th = torch.randn(2, net.dim, generator=g, dtype=torch.float64)
    seq = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    W1, b1, w2, b2 = net.split(th)
    with torch.no_grad():
        seq[0].weight.copy_(W1[1])
        seq[0].bias.copy_(b1[1])
        seq[2].weight.copy_(w2[1][None])
        seq[2].bias.copy_(b2[1][None])
    j = 4  # per-sample gradient of sample j on path 1 = weighted gradient with weight e_j
    loss = 0.5 * (seq(X[j : j + 1])[0, 0] - Y[j]) ** 2
    ref = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(seq.parameters()))])
    w = torch.zeros(2, 6, dtype=torch.float64)
    w[1, j] = 1.0
    torch.testing.assert_close(net.weighted_grad(th, w)[1], ref)
    # Basis: top eigenvectors of layer 1's output covariance Z^T Z.
    Z = X @ W1[1].T + b1[1]
    E, lam = net.basis(th)
    vals, vecs = torch.linalg.eigh(Z.T @ Z)
    P_ref = vecs[:, -2:] @ vecs[:, -2:].T
    torch.testing.assert_close(E[1] @ E[1].T, P_ref)
    torch.testing.assert_close(lam[1], vals[-1] / vals.sum())
    G = torch.randn(2, net.dim, generator=g, dtype=torch.float64)
    out = net.project(G, E)
    G1 = G[1, : net.nW1].view(4, 3)
    torch.testing.assert_close(out[1, : net.nW1].view(4, 3), project(G1, E[1], "output"))
    torch.testing.assert_close(out[1, net.nW1 :], G[1, net.nW1 :])  # rest unprojected
    s = net.sharpness(th, E, lam)
    torch.testing.assert_close(s[1, : net.nW1].view(4, 3),
                               0.1 * sharpness_term(W1[1], E[1][:, 0], lam[1], "output"))
