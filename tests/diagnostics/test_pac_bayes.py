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


def test_bound_assembly_and_parts():
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


def test_bad_inputs():
    model, init, x, y = _tiny_trained()
    with pytest.raises(ValueError, match="delta"):
        pac_bayes_bound(model, init, x, y, delta=0.01, delta_mc=0.02)
    with pytest.raises(ValueError, match="s_grid"):
        pac_bayes_bound(model, init, x, y, s_grid=(0.0,))
