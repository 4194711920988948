"""Cayley basis tracking and rotation-only updates: checked against eigh and svdvals."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dsbp import SpectralProjector
from dsbp.core.subspace import principal_angles
from dsbp.extensions.lie_dynamics import LieDSBP, LieSpectralProjector


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matrices: intra-op threads only add spin-wait overhead on a shared 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


D, K = 24, 3


def _cov(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, sqrt-eigenvalues) of a covariance with a clear gap after the top K eigenvalues."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    ev = torch.cat([torch.tensor([9.0, 7.0, 5.0]), torch.linspace(1.0, 0.2, D - K)]).double()
    return Q, ev.sqrt()


def _batch(cov, n: int, g: torch.Generator) -> torch.Tensor:
    Q, s = cov
    return ((torch.randn(n, D, generator=g, dtype=torch.float64) * s) @ Q.T).float()


def _top(cov) -> torch.Tensor:
    Q, s = cov
    C = Q @ torch.diag(s**2) @ Q.T
    return torch.linalg.eigh(C).eigenvectors[:, -K:]  # the independent answer


def _drive(proj, model, covs, steps, seed=0, n=256):
    """Feed ``steps`` batches (the first from covs[0], the rest from covs[1]) through the layer."""
    g = torch.Generator().manual_seed(seed)
    for t in range(steps):
        x = _batch(covs[0] if t == 0 else covs[1], n, g)
        model.zero_grad()
        model(x).pow(2).sum().backward()
        proj.project_()


def _layer():
    torch.manual_seed(0)
    return nn.Linear(D, 4, bias=False)


def test_tracking_converges_to_new_top_k_without_refresh_and_stays_orthonormal():
    old, new = _cov(1), _cov(2)
    model = _layer()
    lie = LieSpectralProjector(
        model, rank=K, interval=10**6, side="input", sharpness=0.0, oversample=2, lie_step=0.5
    )
    _drive(lie, model, (old, new), steps=400)
    assert lie.num_refreshes() == 1  # only the cold start: everything after is Cayley tracking
    assert lie.num_tracking_steps() == 399
    E = lie.basis(model)
    assert E.dtype == torch.float32
    eye = torch.eye(E.shape[1])
    assert (
        float(
            (lie.layer_state(model).block.T @ lie.layer_state(model).block - torch.eye(K + 2))
            .abs()
            .max()
        )
        < 1e-6
    )
    assert float((E.T @ E - eye).abs().max()) < 1e-6
    # Converged to the new covariance's top-k eigenspace (up to batch noise) ...
    assert float(principal_angles(E, _top(new)).max()) < 0.1
    # ... which the plain projector, between its refreshes, does not see.
    model2 = _layer()
    plain = SpectralProjector(
        model2, rank=K, interval=10**6, side="input", sharpness=0.0, oversample=2
    )
    _drive(plain, model2, (old, new), steps=20)
    assert float(principal_angles(plain.basis(model2), _top(new)).max()) > 0.5
    assert float(principal_angles(plain.basis(model2), _top(old)).max()) < 0.3


def test_state_dict_round_trip_resumes_identically():
    old, new = _cov(3), _cov(4)
    model = _layer()
    a = LieSpectralProjector(model, rank=K, interval=7, side="input", oversample=2)
    _drive(a, model, (old, new), steps=5, seed=1)
    state = copy.deepcopy(a.state_dict())

    def cont(proj):
        g = torch.Generator().manual_seed(9)
        for _ in range(4):  # crosses a refresh (step 7) and tracking steps
            model.zero_grad()
            model(_batch(new, 128, g)).pow(2).sum().backward()
            proj.project_()
        proj.remove()
        return proj.layer_state(model).block.clone()

    block_a = cont(a)
    b = LieSpectralProjector(model, rank=K, interval=7, side="input", oversample=2)
    b.load_state_dict(state)
    assert torch.equal(cont(b), block_a)


def test_rotation_only_update_preserves_singular_values_and_learns():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(128, 8, generator=g)
    y = torch.randn(128, 3, generator=g)
    sv0 = {
        n: torch.linalg.svdvals(m.weight.detach())
        for n, m in net.named_modules()
        if isinstance(m, nn.Linear)
    }
    w0 = {n: m.weight.detach().clone() for n, m in net.named_modules() if isinstance(m, nn.Linear)}
    opt = LieDSBP(net, torch.optim.SGD, rank=4, interval=5, sharpness=0.1, rotation=True, lr=0.05)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = (net(x) - y).pow(2).mean()
        loss.backward()
        losses.append(float(loss.detach()))
        opt.step()
    for n, m in net.named_modules():
        if isinstance(m, nn.Linear):
            assert torch.allclose(torch.linalg.svdvals(m.weight.detach()), sv0[n], atol=1e-5), n
            assert not torch.allclose(m.weight.detach(), w0[n], atol=1e-3), n  # it did move
    assert losses[-1] < losses[0]
    assert opt.projector.num_tracking_steps() > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="track_every"):
        LieSpectralProjector(_layer(), track_every=0)
    with pytest.raises(ValueError, match="lie_step"):
        LieSpectralProjector(_layer(), lie_step=-1.0)
