"""Parity of the low-rank backward (dsbp.layers.lowrank) with the projected full gradient.

The reference is computed independently: an ordinary nn.Linear's autograd gradient G, then
E E^T G (output side) or G E E^T (input side), in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dsbp.layers.lowrank import low_rank_backward, lowrank_flops, projected_weight_grad

DT = torch.float64


def _basis(d: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=g, dtype=DT)).Q


def _pair(d_in: int, d_out: int, bias: bool) -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(0)
    ref = nn.Linear(d_in, d_out, bias=bias).to(DT)
    lr = nn.Linear(d_in, d_out, bias=bias).to(DT)
    lr.load_state_dict(ref.state_dict())
    return ref, lr


def _run(layer: nn.Linear, x: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """Forward, a non-trivial scalar loss (weights each output differently), backward."""
    xi = x.clone().requires_grad_(True)
    (layer(xi) * w_out).sum().backward()
    assert xi.grad is not None
    return xi.grad


@pytest.mark.parametrize("side", ["output", "input"])
@pytest.mark.parametrize("lead", [(12,), (3, 5), (2, 3, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_gradients_match_projected_reference(side, lead, bias):
    """weight.grad == E E^T G (output) / G E E^T (input); bias.grad and dX unchanged.

    Catches: projecting on the wrong side (E^T applied to d_in), using E^T E or omitting the
    expansion, dropping leading dims (only the last slice's rows), a projected or missing bias
    gradient, and a dX computed from the projected weight gradient or not at all."""
    d_in, d_out, k = 7, 9, 3
    ref, low = _pair(d_in, d_out, bias)
    E = _basis(d_out if side == "output" else d_in, k, seed=1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(*lead, d_in, generator=g, dtype=DT)
    w_out = torch.randn(*lead, d_out, generator=g, dtype=DT)

    dx_ref = _run(ref, x, w_out)
    G = ref.weight.grad
    P = E @ E.T
    want = P @ G if side == "output" else G @ P
    with low_rank_backward(low, lambda: E, side=side):
        dx = _run(low, x, w_out)
    torch.testing.assert_close(low.weight.grad, want, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(want, G)  # the projection is not the identity here
    torch.testing.assert_close(dx, dx_ref, rtol=1e-12, atol=1e-12)
    if bias:
        torch.testing.assert_close(low.bias.grad, ref.bias.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("side", ["output", "input"])
def test_coordinates_mode(side):
    """coords=True: no weight.grad; coordinates E^T G (k, d_in) / G E (d_out, k) summed over two
    backward passes (gradient accumulation), and E @ coords equals the projected gradient.

    Catches: coordinates of the wrong side or transposed, overwriting instead of accumulating,
    and a weight gradient still written."""
    d_in, d_out, k = 6, 8, 2
    ref, low = _pair(d_in, d_out, True)
    E = _basis(d_out if side == "output" else d_in, k, seed=3)
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(5, d_in, generator=g, dtype=DT) for _ in range(2)]
    ws = [torch.randn(5, d_out, generator=g, dtype=DT) for _ in range(2)]
    for x, w in zip(xs, ws, strict=True):
        _run(ref, x, w)
    G = ref.weight.grad
    h = low_rank_backward(low, lambda: E, side=side, coords=True)
    for x, w in zip(xs, ws, strict=True):
        _run(low, x, w)
    assert low.weight.grad is None
    C = h.grad_coords
    assert C is not None
    want = E.T @ G if side == "output" else G @ E
    torch.testing.assert_close(C, want, rtol=1e-10, atol=1e-12)
    full = E @ C if side == "output" else C @ E.T
    torch.testing.assert_close(full, (E @ E.T @ G) if side == "output" else G @ E @ E.T)
    h.zero_coords()
    assert h.grad_coords is None
    h.remove()


def test_function_form_matches_full_projection():
    """projected_weight_grad from (dY, X) equals projecting dY^T X, both sides; the flop count
    is below the full GEMM's at k << d. Catches a swapped product order."""
    g = torch.Generator().manual_seed(5)
    dy = torch.randn(20, 11, generator=g, dtype=DT)
    x = torch.randn(20, 13, generator=g, dtype=DT)
    G = dy.T @ x
    Eo, Ei = _basis(11, 4, 6), _basis(13, 4, 7)
    torch.testing.assert_close(projected_weight_grad(dy, x, Eo, "output"), Eo @ Eo.T @ G)
    torch.testing.assert_close(projected_weight_grad(dy, x, Ei, "input"), G @ Ei @ Ei.T)
    assert lowrank_flops(1024, 4096, 4096, 128) < 2 * 1024 * 4096 * 4096
    with pytest.raises(ValueError, match="side"):
        projected_weight_grad(dy, x, Eo, "sideways")


def test_basis_follows_callable_and_none_means_ordinary():
    """The basis is read at each forward (a refresh between steps takes effect); None gives
    the ordinary gradient. Catches a basis cached at attach time."""
    ref, low = _pair(5, 6, True)
    x = torch.randn(4, 5, dtype=DT)
    w = torch.randn(4, 6, dtype=DT)
    current: dict[str, torch.Tensor | None] = {"E": None}
    with low_rank_backward(low, lambda: current["E"]):
        _run(ref, x, w)
        _run(low, x, w)
        torch.testing.assert_close(low.weight.grad, ref.weight.grad)
        E = _basis(6, 2, 8)
        current["E"] = E
        low.weight.grad = None
        _run(low, x, w)
        torch.testing.assert_close(low.weight.grad, E @ E.T @ ref.weight.grad)


def test_remove_restores_module_and_errors_are_clear():
    """remove() restores the class forward; bad module/side/basis shapes raise clear errors.
    Catches a wrapper that stays attached after the with block."""
    _, low = _pair(5, 6, True)
    E = _basis(6, 2, 9)
    with low_rank_backward(low, lambda: E):
        assert "forward" in vars(low)
        with pytest.raises(RuntimeError, match="already replaced"):
            low_rank_backward(low, lambda: E)
    assert "forward" not in vars(low)
    x = torch.randn(3, 5, dtype=DT)
    low(x).sum().backward()
    full = low.weight.grad.clone()
    torch.testing.assert_close(full, torch.ones(3, 6, dtype=DT).T @ x)
    with pytest.raises(TypeError, match="nn.Linear"):
        low_rank_backward(nn.Conv2d(1, 1, 1), lambda: E)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="side"):
        low_rank_backward(low, lambda: E, side="both")
    with low_rank_backward(low, lambda: _basis(5, 2, 1)), \
            pytest.raises(ValueError, match=r"needs \(6, k\)"):
        low(x)


@pytest.mark.parametrize("side", ["output", "input"])
def test_matches_spectral_projector_pure_projection(side):
    """With the projector's own basis (public ``basis``/``refresh_now``), the low-rank backward
    gives the gradient that ``SpectralProjector.project_()`` makes of the full gradient at
    sharpness 0 and residual 0 (the reference update). Catches a side convention that differs
    from the projector's (E applied to the other dimension)."""
    from dsbp import SpectralProjector

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))
    low = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))
    low.load_state_dict(model.state_dict())
    x, y = torch.randn(32, 6), torch.randint(0, 5, (32,))
    proj = SpectralProjector(model, rank=3, interval=1000, sharpness=0.0, side=side)
    model(x)  # a new projector is due: this forward captures rows
    proj.refresh_now()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    proj.project_()
    E = proj.basis(model[0]).detach().clone()
    handle = low_rank_backward(low[0], lambda: E, side=side)
    torch.nn.functional.cross_entropy(low(x), y).backward()
    handle.remove()
    proj.remove()
    torch.testing.assert_close(low[0].weight.grad, model[0].weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(low[0].bias.grad, model[0].bias.grad)
