import pytest
import torch

from dsbp.core.projection import dsbp_direction, project, residual, sharpness_term


def _basis(d, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64)).Q


@pytest.mark.parametrize("side", ["output", "input"])
def test_projection_equals_explicit_projector_idempotent_and_orthogonal(side):
    d_out, d_in, k = 12, 9, 4
    d = d_out if side == "output" else d_in
    E = _basis(d, k)
    G = torch.randn(d_out, d_in, dtype=torch.float64)
    P = E @ E.T  # explicit d x d projector as the independent answer
    expected = P @ G if side == "output" else G @ P
    out = project(G, E, side)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(project(out, E, side), out)  # idempotent
    r = residual(G, E, side)
    assert abs((out * r).sum().item()) < 1e-10  # orthogonal decomposition
    torch.testing.assert_close(out + r, G)
    # norm never grows
    assert torch.linalg.matrix_norm(out) <= torch.linalg.matrix_norm(G) + 1e-12


def test_projection_rejects_unknown_side():
    with pytest.raises(ValueError, match="side"):
        project(torch.zeros(2, 2), torch.zeros(2, 1), "left")


@pytest.mark.parametrize("side", ["output", "input"])
def test_sharpness_term_is_gradient_of_penalty(side):
    # [ours] the term is the gradient of lam/2 * ||e1^T W||^2 (output) or lam/2 * ||W e1||^2 (input)
    d_out, d_in = 6, 5
    e1 = _basis(d_out if side == "output" else d_in, 1)[:, 0]
    W = torch.randn(d_out, d_in, dtype=torch.float64, requires_grad=True)
    lam = 0.37
    pen = 0.5 * lam * ((e1 @ W) if side == "output" else (W @ e1)).pow(2).sum()
    (g,) = torch.autograd.grad(pen, W)
    torch.testing.assert_close(sharpness_term(W.detach(), e1, lam, side), g)
    # and equals the formula of METHOD.md: lam e1 e1^T W / lam W e1 e1^T
    ref = lam * (torch.outer(e1, e1) @ W if side == "output" else W @ torch.outer(e1, e1))
    torch.testing.assert_close(sharpness_term(W.detach(), e1, lam, side), ref.detach())


def test_dsbp_direction_combines_both_terms():
    E = _basis(6, 3)
    G, W = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    out = dsbp_direction(G, W, E, 0.5, 0.1, "output")
    ref = E @ E.T @ G + 0.1 * 0.5 * torch.outer(E[:, 0], E[:, 0]) @ W
    torch.testing.assert_close(out, ref)
