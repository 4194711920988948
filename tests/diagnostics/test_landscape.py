"""Loss-landscape slices against the closed form of a quadratic; filter normalisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsbp.diagnostics.landscape import (
    basis_direction,
    filter_normalized_direction,
    hessian_directions,
    loss_slice_1d,
    loss_slice_2d,
)


def _setup(helpers, d_out=3, d_in=4):
    A = helpers.known_spectrum(torch.linspace(0.5, 5.0, d_out * d_in), seed=2)
    model = helpers.QuadraticModel(d_out, d_in)
    c = torch.randn(d_out * d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    return model, helpers.quadratic_loss(A), [(torch.zeros(1), c)], A, c


def _closed_form(w, c, A, D):
    # L(w + D) = 0.5 (w + D - c)^T A (w + D - c) for each direction D (rows).
    r = w + D - c
    return 0.5 * torch.einsum("...i,ij,...j->...", r, A, r)


def test_2d_slice_equals_closed_form(helpers):
    model, loss, batches, A, c = _setup(helpers)
    w = model.lin.weight.detach().reshape(-1).clone()
    g = torch.Generator().manual_seed(0)
    d1 = filter_normalized_direction(model, generator=g)
    d2 = filter_normalized_direction(model, generator=g)
    alphas, betas = torch.linspace(-1, 1, 5), torch.linspace(-0.5, 1.5, 4)
    got = loss_slice_2d(model, loss, batches, d1, d2, alphas, betas)
    D = alphas.double()[:, None, None] * d1 + betas.double()[None, :, None] * d2
    torch.testing.assert_close(got, _closed_form(w, c, A, D), rtol=1e-12, atol=1e-12)
    assert torch.equal(model.lin.weight.detach().reshape(-1), w)  # restored bit-exactly


def test_1d_slice_along_hessian_eigenvector_is_parabola(helpers):
    model, loss, batches, A, c = _setup(helpers)
    w = model.lin.weight.detach().reshape(-1).clone()
    vals, vecs = torch.linalg.eigh(A)
    (d,) = hessian_directions(vecs[:, -1:])
    alphas = torch.linspace(-2, 2, 9)
    got = loss_slice_1d(model, loss, batches, d, alphas)
    # Along a unit eigenvector the curvature is exactly the eigenvalue.
    expected = _closed_form(w, c, A, torch.zeros_like(w)) + alphas.double() * ((A @ (w - c)) @ d) \
        + 0.5 * vals[-1] * alphas.double() ** 2
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_basis_direction_slice(helpers):
    model, loss, batches, A, c = _setup(helpers)
    W = model.lin.weight.detach().clone()
    E, _ = torch.linalg.qr(torch.randn(3, 2, dtype=torch.float64))
    d = basis_direction(model, "lin", E, index=0, side="output")
    Dm = d.view(3, 4)
    # Rank one along e1 on the output side, with the weight's Frobenius norm.
    torch.testing.assert_close(Dm, torch.outer(E[:, 0], E[:, 0] @ Dm))
    torch.testing.assert_close(Dm.norm(), W.norm())
    din = basis_direction(model, "lin", torch.eye(4, dtype=torch.float64)[:, :1], side="input")
    assert torch.count_nonzero(din.view(3, 4)[:, 1:]) == 0
    got = loss_slice_1d(model, loss, batches, d, [0.0, 0.5, 1.0])
    D = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)[:, None] * d
    torch.testing.assert_close(got, _closed_form(W.reshape(-1), c, A, D), rtol=1e-12, atol=1e-12)


def test_filter_normalisation(helpers):
    model = helpers.tiny_mlp()
    d = filter_normalized_direction(model, generator=torch.Generator().manual_seed(0))
    parts = torch.split(d, [p.numel() for p in model.parameters()])
    for (name, p), part in zip(model.named_parameters(), parts, strict=True):
        if p.dim() == 1:
            assert torch.count_nonzero(part) == 0, name  # biases zeroed
        else:
            torch.testing.assert_close(part.view_as(p).norm(dim=1), p.detach().norm(dim=1))
    dk = filter_normalized_direction(model, bias_bn="keep", generator=torch.Generator())
    bias_part = torch.split(dk, [p.numel() for p in model.parameters()])[1]
    torch.testing.assert_close(bias_part.norm(), model[0].bias.detach().norm())


def test_slice_restores_mlp_and_rejects_bad_direction(helpers):
    model, batches = helpers.tiny_mlp(), helpers.tiny_batches()
    before = [p.detach().clone() for p in model.parameters()]
    d = filter_normalized_direction(model, generator=torch.Generator().manual_seed(1))
    vals = loss_slice_1d(model, F.cross_entropy, batches, d, [0.0, 1.0])
    assert vals[0] != vals[1]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    with pytest.raises(ValueError, match="entries"):
        loss_slice_1d(model, F.cross_entropy, batches, d[:-1], [0.0])
