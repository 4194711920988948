"""Perturbation curves on a quadratic at its minimum: E increase = 0.5 sum_i s_i^2 A_ii."""

from __future__ import annotations

import pytest
import torch

from dsbp.diagnostics.perturbation import noise_scales, perturbation_curve


def _at_minimum(helpers):
    A = helpers.known_spectrum(torch.linspace(0.5, 4.0, 12), seed=4)
    model = helpers.QuadraticModel(3, 4)
    c = model.lin.weight.detach().reshape(-1).clone()  # the weights sit at the minimum
    return model, helpers.quadratic_loss(A), [(torch.zeros(1), c)], A


@pytest.mark.parametrize("mode", ["filter", "global"])
def test_expected_increase_matches_closed_form(helpers, mode):
    model, loss, batches, A = _at_minimum(helpers)
    radii = [0.1, 0.2]
    curve = perturbation_curve(model, loss, batches, radii, n_draws=500, mode=mode,
                               generator=torch.Generator().manual_seed(0))
    s = noise_scales(model, mode=mode)
    for i, r in enumerate(radii):
        expected = 0.5 * r**2 * (s**2 * torch.diagonal(A)).sum().item()
        assert abs(curve.mean_increase[i].item() - expected) < 4 * curve.stderr[i].item()
    # Common random numbers and a quadratic at its minimum: doubling r multiplies each draw by 4.
    torch.testing.assert_close(curve.increases[1], 4 * curve.increases[0], rtol=1e-9, atol=1e-15)
    assert curve.base_loss == 0.0


def test_noise_scales_definition(helpers):
    model = helpers.tiny_mlp()
    s = noise_scales(model, mode="filter")
    W = model[0].weight.detach()
    # Row i of the first weight: std = ||w_i|| / sqrt(d_in), so E||eps_i||^2 = ||w_i||^2.
    torch.testing.assert_close(s[:20].view(5, 4)[:, 0], W.norm(dim=1) / 2.0)
    g = noise_scales(model, mode="global")
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(g[0] ** 2 * w.numel(), w.norm() ** 2)
    with pytest.raises(ValueError, match="mode"):
        noise_scales(model, mode="layer")
