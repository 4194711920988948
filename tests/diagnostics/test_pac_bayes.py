"""PAC-Bayes bound: closed-form KL, the kl-inverse, and the bound's assembly on a tiny model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.distributions import Independent, Normal, kl_divergence

from dsbp.diagnostics.pac_bayes import (
    gaussian_kl,
    kl_bernoulli,
    kl_inv_upper,
    pac_bayes_bound,
    zero_one_error,
)


def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    w, w0 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g,
                                                                           dtype=torch.float64)
    for s in (0.01, 0.3, 2.0):
        q = Independent(Normal(w, torch.full_like(w, s)), 1)
        p = Independent(Normal(w0, torch.full_like(w0, s)), 1)
        assert math.isclose(gaussian_kl(w, w0, s), kl_divergence(q, p).item(), rel_tol=1e-10)


def test_kl_inverse():
    for c in (1e-4, 0.05, 0.7, 3.0):
        assert math.isclose(kl_inv_upper(0.0, c), 1 - math.exp(-c), rel_tol=0, abs_tol=1e-10)
    for q in (0.01, 0.2, 0.5):
        for c in (1e-3, 0.1):
            p = kl_inv_upper(q, c)
            assert q <= p <= q + math.sqrt(c / 2) + 1e-12  # Pinsker: never looser than sqrt form
            assert math.isclose(kl_bernoulli(q, p), c, rel_tol=1e-6)
    assert kl_inv_upper(0.3, 50.0) > 1 - 1e-9  # kl(0.3 || p) < 50 for all p < 1
    with pytest.raises(ValueError):
        kl_inv_upper(1.5, 0.1)


def _tiny_trained():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 2, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    init = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, init, x, y


def test_bound_assembly_and_parts(one_thread):
    model, init, x, y = _tiny_trained()
    w_before = [p.detach().clone() for p in model.parameters()]
    res = pac_bayes_bound(model, init, x, y, s_grid=(1e-6, 0.05, 0.5), n_mc=20,
                          generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(w_before, model.parameters(), strict=True))
    m, J = 200, 3
    assert math.isclose(res.confidence, math.log(2 * math.sqrt(m) * J / 0.04) / m)
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    w0 = torch.cat([p.detach().reshape(-1) for p in init.parameters()])
    assert math.isclose(res.kl, (w - w0).double().pow(2).sum().item() / (2 * res.s**2),
                        rel_tol=1e-6)
    assert math.isclose(res.complexity, res.kl / m + res.confidence, rel_tol=1e-12)
    mc_budget = math.log(2 * J / 0.01) / 20
    assert math.isclose(res.empirical_upper, kl_inv_upper(res.empirical, mc_budget))
    assert math.isclose(res.bound, kl_inv_upper(res.empirical_upper, res.complexity))
    assert res.empirical <= res.empirical_upper <= res.bound <= res.bound_sqrt
    assert res.bound == min(r["bound"] for r in res.grid)
    # A vanishing posterior scale reproduces the trained classifier's own error.
    tiny = next(r for r in res.grid if r["s"] == 1e-6)
    assert res.deterministic_error == zero_one_error(model, x, y)
    assert math.isclose(tiny["empirical"], res.deterministic_error, rel_tol=1e-12)


def test_bad_inputs(one_thread):
    model, init, x, y = _tiny_trained()
    with pytest.raises(ValueError, match="delta"):
        pac_bayes_bound(model, init, x, y, delta=0.01, delta_mc=0.02)
    with pytest.raises(ValueError, match="s_grid"):
        pac_bayes_bound(model, init, x, y, s_grid=(0.0,))


def _phi(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def _two_class_data(m=300, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d, generator=g, dtype=torch.float64)
    y = (x @ torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64) > 0).long()
    return x, y


def _gibbs_se(e: float, n_mc: int) -> float:
    # The error fraction of one draw is a mean of Bernoullis: its variance is at most e(1 - e).
    return math.sqrt(max(e * (1 - e), 1e-12) / n_mc)


def test_posterior_error_and_bound_match_closed_form_linear(one_thread):
    # Independent answer: a Linear(d, 2) classifier under N(w, s^2 I) weight noise errs on
    # (x, y) with probability Phi(-margin / (s sqrt(2 (|x|^2 + 1)))), margin = logit_y - logit_other
    # (the logit difference has noise variance 2 s^2 (|x|^2 + 1)). The bound is then assembled
    # by hand from that closed form and torch.distributions' KL.
    x, y = _two_class_data()
    torch.manual_seed(1)
    init = nn.Linear(3, 2).double()
    model = copy.deepcopy(init)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[-1.0, 0.5, -0.2], [1.2, -0.6, 0.3]]))
        model.bias.copy_(torch.tensor([0.1, -0.1]))
    n_mc, s_grid, m = 400, (0.05, 0.3), x.shape[0]
    res = pac_bayes_bound(model, init, x, y, s_grid=s_grid, n_mc=n_mc,
                          generator=torch.Generator().manual_seed(2))
    logits = model(x).detach()
    margin = logits.gather(1, y[:, None])[:, 0] - logits.gather(1, 1 - y[:, None])[:, 0]
    norm2 = x.pow(2).sum(1)
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    w0 = torch.cat([p.detach().reshape(-1) for p in init.parameters()])
    J, d_pb = len(s_grid), 0.04
    for row, s in zip(res.grid, s_grid, strict=True):
        closed = sum(_phi(-float(mg) / (s * math.sqrt(2 * (float(n2) + 1))))
                     for mg, n2 in zip(margin, norm2, strict=True)) / m
        assert abs(row["empirical"] - closed) <= 4 * _gibbs_se(closed, n_mc), (s, closed)
        se = row["empirical_std"] / math.sqrt(n_mc)
        assert abs(row["empirical"] - closed) <= 4 * se + 1e-12, (s, closed, se)
        q = Independent(Normal(w, torch.full_like(w, s)), 1)
        p = Independent(Normal(w0, torch.full_like(w0, s)), 1)
        kl = kl_divergence(q, p).item()
        assert math.isclose(row["kl"], kl, rel_tol=1e-9)
        budget = (kl + math.log(2 * math.sqrt(m) * J / d_pb)) / m
        mc = math.log(2 * J / 0.01) / n_mc
        # the bound is monotone in the empirical error: bracket it by the closed form +- 4 s.e.
        lo = kl_inv_upper(kl_inv_upper(max(0.0, closed - 4 * _gibbs_se(closed, n_mc)), mc), budget)
        hi = kl_inv_upper(kl_inv_upper(min(1.0, closed + 4 * _gibbs_se(closed, n_mc)), mc), budget)
        assert lo <= row["bound"] <= hi
    assert res.valid and res.n_batchnorm_stats == 0 and res.batchnorm == "bounded"


def _bn_model():
    torch.manual_seed(3)
    init = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2, affine=False)).double()
    model = copy.deepcopy(init)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[-1.0, 0.5, -0.2], [1.2, -0.6, 0.3]]))
        model[0].bias.copy_(torch.tensor([0.1, -0.1]))
        model[1].running_mean.copy_(torch.tensor([0.3, -0.2]))  # as if trained on data
        model[1].running_var.copy_(torch.tensor([2.0, 0.5]))
    return model, init


@pytest.fixture
def one_thread():
    # Tiny models: extra threads only add contention on a shared CPU.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_batchnorm_statistics_are_bounded_closed_form(one_thread):
    # Linear(3, 2) -> BatchNorm1d(2, affine=False), eval mode: logit_j = (h_j - mu_j) / e^u_j
    # with u_j = 0.5 ln(var_j + eps). Under the posterior, h_j - mu_j ~ N(m_j, s^2 (|x|^2 + 2))
    # (weights, bias and running mean drawn) and u_j ~ N(u_j, s^2). Given u the error is a normal
    # tail; the expectation over u is a 2-D Gauss-Hermite quadrature: an answer independent of
    # the Monte Carlo draws. The KL counts the statistics' distance from the fresh init's (0, 1).
    import numpy as np

    x, y = _two_class_data()
    x = 0.3 * x  # small inputs: the running mean's noise is a large part of each logit's
    model, init = _bn_model()
    bn = model[1]
    saved = (bn.running_mean.clone(), bn.running_var.clone())
    s, n_mc, m = 0.3, 2000, x.shape[0]
    res = pac_bayes_bound(model, init, x, y, s_grid=(s,), n_mc=n_mc,
                          generator=torch.Generator().manual_seed(4))
    assert torch.equal(bn.running_mean, saved[0]) and torch.equal(bn.running_var, saved[1])
    assert res.valid and res.n_batchnorm_stats == 4
    assert any("BatchNorm running statistics" in a for a in res.assumptions)

    h = model[0](x).detach()
    mbar = h - bn.running_mean
    ubar = 0.5 * torch.log(bn.running_var + bn.eps)
    z, wz = (torch.from_numpy(a) for a in np.polynomial.hermite_e.hermegauss(40))
    wz = wz / wz.sum()
    yi = y[:, None]
    m_y, m_o = mbar.gather(1, yi)[:, 0], mbar.gather(1, 1 - yi)[:, 0]
    u_y, u_o = ubar[y], ubar[1 - y]
    sd0 = s * torch.sqrt(x.pow(2).sum(1) + 2)
    sy = torch.exp(u_y[:, None, None] + s * z[None, :, None])  # (m, node_y, node_o)
    so = torch.exp(u_o[:, None, None] + s * z[None, None, :])
    mean = m_y[:, None, None] / sy - m_o[:, None, None] / so
    sd = sd0[:, None, None] * torch.sqrt(1 / sy**2 + 1 / so**2)
    tail = 0.5 * torch.erfc(mean / sd / math.sqrt(2.0))
    closed = float((tail * wz[None, :, None] * wz[None, None, :]).sum() / m)
    assert abs(res.empirical - closed) <= 4 * _gibbs_se(closed, n_mc), (res.empirical, closed)
    se = res.grid[0]["empirical_std"] / math.sqrt(n_mc)
    assert abs(res.empirical - closed) <= 4 * se, (res.empirical, closed, se)
    # With the statistics held fixed (the old behaviour) the Gibbs error is another closed form
    # (noise variance s^2 (|x|^2 + 1) per logit, u not drawn), far from the drawn one in units of
    # the MC standard error: an implementation that did not draw the statistics fails above.
    sd_fixed = s * torch.sqrt(x.pow(2).sum(1) + 1) * torch.sqrt(
        torch.exp(-2 * u_y) + torch.exp(-2 * u_o))
    mean_fixed = m_y / torch.exp(u_y) - m_o / torch.exp(u_o)
    closed_fixed = float((0.5 * torch.erfc(mean_fixed / sd_fixed / math.sqrt(2.0))).mean())
    assert abs(closed_fixed - closed) > 8 * se, (closed_fixed, closed, se)

    theta = torch.cat([torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
                       bn.running_mean, ubar])
    theta0 = torch.cat([torch.cat([p.detach().reshape(-1) for p in init.parameters()]),
                        torch.zeros(2, dtype=torch.float64),
                        torch.full((2,), 0.5 * math.log(1 + bn.eps), dtype=torch.float64)])
    assert math.isclose(res.kl, (theta - theta0).pow(2).sum().item() / (2 * s * s),
                        rel_tol=1e-9)


def test_batchnorm_fixed_is_flagged_and_batch_statistics_refused():
    x, y = _two_class_data(m=50)
    model, init = _bn_model()
    res = pac_bayes_bound(model, init, x, y, s_grid=(0.1,), n_mc=5, batchnorm="fixed")
    assert not res.valid and res.n_batchnorm_stats == 0
    assert any(a.startswith("NOT MET") for a in res.assumptions)
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    w0 = torch.cat([p.detach().reshape(-1) for p in init.parameters()])
    assert math.isclose(res.kl, (w - w0).pow(2).sum().item() / (2 * 0.01), rel_tol=1e-9)
    with pytest.raises(ValueError, match="init as a module"):
        pac_bayes_bound(model, w0, x, y, s_grid=(0.1,), n_mc=2)
    no_stats = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2, track_running_stats=False))
    with pytest.raises(ValueError, match="no running statistics"):
        pac_bayes_bound(no_stats, copy.deepcopy(no_stats), x.float(), y, s_grid=(0.1,), n_mc=2)
    with pytest.raises(ValueError, match="batchnorm must be"):
        pac_bayes_bound(model, init, x, y, batchnorm="frozen")
