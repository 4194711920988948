"""SDE check of Proposition 1 on the real DSBP(SGD): the right SDE passes, wrong SDEs fail."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from dsbp import DSBP
from dsbp.diagnostics.sde import (
    _ou_transition,
    error_vanishes,
    extrapolate_to_zero,
    fit_order,
    linear_problem,
    run_dsbp_paths,
    sde_drift,
    weak_error_check,
)


@pytest.fixture
def one_thread():
    # Small tensors: extra threads only add contention on a shared CPU.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_fit_order_recovers_power_law():
    etas = [0.2, 0.1, 0.05]
    order, se = fit_order(etas, [3.0 * e**1.5 for e in etas])
    assert abs(order - 1.5) < 1e-12 and se == 0.0
    with pytest.raises(ValueError):
        fit_order(etas, [1.0, 0.0, 1.0])


def test_extrapolation_tells_order_one_from_a_limit():
    etas = [0.05, 0.025, 0.0125, 0.00625]
    se = [1e-3] * 4
    right = [2.0 * e - 5.0 * e * e for e in etas]  # C1 eta + C2 eta^2: limit 0
    a, sa = extrapolate_to_zero(etas, right, se)
    assert abs(a) < 1e-12 and 0 < sa < 0.1
    assert error_vanishes(etas, right, se)
    plateau = [0.03 + 2.0 * e for e in etas]  # tends to 0.03: a wrong SDE
    assert extrapolate_to_zero(etas, plateau, se)[0] == pytest.approx(0.03)
    assert not error_vanishes(etas, plateau, se)


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


def test_stacked_paths_equal_separate_models(one_thread):
    # The vectorisation: n paths as the rows of one Linear layer must be n independent DSBP
    # runs. Reference: three separate models, each with its own DSBP(SGD, momentum) and the
    # label noise of its slice.
    p = linear_problem()
    n_paths, eta, K = 3, 0.1, 6
    W, opt, layer = run_dsbp_paths(p, eta, K * eta, n_paths, momentum=0.5, interval=2, cold_iters=1,
                                   seed=3, return_optimizer=True)
    g = torch.Generator().manual_seed(3)
    clean = (p.X @ p.W_star.T).repeat(1, n_paths)
    noises = [p.sigma * torch.randn(clean.shape, generator=g, dtype=torch.float64)
              for _ in range(K)]
    for j in range(n_paths):
        lin = nn.Linear(p.d_in, p.d_out, bias=False).to(torch.float64)
        with torch.no_grad():
            lin.weight.copy_(p.W0)
        o = DSBP(lin, torch.optim.SGD, rank=p.rank, interval=2, power_iters=1, side="input",
                 sharpness=p.sharpness, lr=eta, momentum=0.5,
                 projector_kwargs={"oversample": 0, "exact_threshold": 0, "cold_iters": 1,
                                   "eig_dtype": torch.float64, "seed": 3})
        for k in range(K):
            Y = (clean + noises[k])[:, j * p.d_out:(j + 1) * p.d_out]
            o.zero_grad()
            (0.5 / p.X.shape[0] * (lin(p.X) - Y).square().sum()).backward()
            o.step()
        torch.testing.assert_close(W[j], lin.weight.detach().reshape(-1), rtol=0, atol=1e-12)
        torch.testing.assert_close(o.projector.basis(lin), opt.projector.basis(layer))


def test_drift_is_the_optimizer_step(one_thread):
    # The SDE's drift, written down from the problem (eigh of X^T X, lambda_1 / trace), against
    # one noise-free step of the real optimizer once its power iteration has converged.
    # A drift without the projection, or without the sharpness term, does not match.
    p = dataclasses.replace(linear_problem(), sigma=0.0)
    eta, n = 0.05, 2
    W20, opt, layer = run_dsbp_paths(p, eta, 40 * eta, n, return_optimizer=True)
    W21 = run_dsbp_paths(p, eta, 41 * eta, n)
    M, b = sde_drift(p)
    angle = 1 - torch.linalg.matrix_norm(p.E.T @ opt.projector.basis(layer)) ** 2 / p.rank
    assert float(angle) < 1e-12
    torch.testing.assert_close(W21[0], W20[0] - eta * (M @ W20[0] - b), rtol=0, atol=1e-9)
    M_free, b_free = sde_drift(p, project=False)
    assert (W21[0] - (W20[0] - eta * (M_free @ W20[0] - b_free))).abs().max() > 1e-3
    no_sharp = dataclasses.replace(p, sharpness=0.0)
    M0, b0 = sde_drift(no_sharp)
    assert (W21[0] - (W20[0] - eta * (M0 @ W20[0] - b0))).abs().max() > 1e-3


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_sde_check_accepts_the_sde_and_rejects_wrong_ones(one_thread, momentum):
    # 2000 paths per step size (results/sde_check uses 20000), eta = 0.05 ... 0.00625, T = 1,
    # refresh every 2 steps with one warm-started power iteration, cold start of 3 iterations;
    # momentum as the SDE models it (drift and diffusion / (1 - mu)). The SDE side is exact
    # (OU moments), so nothing couples its noise to the iterates'.
    res = weak_error_check(n_paths=2000, momentum=momentum, interval=2, seed=0)
    assert res.accepted == {"sde": True, "diffusion x0": False, "diffusion x2": False,
                            "drift without projection": False}
    # The right SDE: both weak errors extrapolate to 0, and fall with eta.
    for name in ("loss", "fluctuation"):
        a, se = res.limit["sde"][name]
        assert abs(a) <= 4 * se, (name, a, se)
        assert abs(res.errors["sde"][name][-1]) < abs(res.errors["sde"][name][0]) + 4 * (
            res.stderr["sde"][name][-1])
    # Each wrong SDE fails, by many standard errors, on the function that sees its defect; a
    # test function that cannot see it (the loss for the diffusion) does not reject it.
    for v, name in (("diffusion x0", "fluctuation"), ("diffusion x2", "fluctuation"),
                    ("drift without projection", "loss")):
        a, se = res.limit[v][name]
        assert abs(a) > 20 * se, (v, a, se)
    for v in ("diffusion x0", "diffusion x2"):
        a, se = res.limit[v]["loss"]
        assert abs(a) <= 4 * se, (v, a, se)
    # The basis reached the eigenvectors: refreshes and power iteration converged.
    assert res.basis_angle[-1] < 1e-6
