"""Dom/Bulk/interpolated SGD on a quadratic with a known Hessian."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from dsbp.baselines.subspace_sgd import SubspaceSGD

DIM, K = 8, 3


class Quadratic(nn.Module):
    """loss(w) = 0.5 w^T A w - c^T w (the input is ignored); Hessian A."""

    def __init__(self, A: torch.Tensor, c: torch.Tensor, w0: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("A", A)
        self.register_buffer("c", c)
        self.w = nn.Parameter(w0.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.w @ self.A @ self.w - self.c @ self.w


def _identity_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return out


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=g, dtype=torch.float64))
    eig = torch.tensor([9.0, 7.0, 5.0, 1.0, 0.5, 0.3, 0.2, 0.1], dtype=torch.float64)
    A = Q @ torch.diag(eig) @ Q.T
    c = torch.randn(DIM, generator=g, dtype=torch.float64)
    w0 = torch.randn(DIM, generator=g, dtype=torch.float64)
    return A, c, w0


BATCH = (torch.zeros(1), torch.zeros(1))


def _one_step(mode, a=1.0, b=1.0, lr=0.05, **kw):
    A, c, w0 = _problem()
    model = Quadratic(A, c, w0)
    opt = SubspaceSGD(
        model, _identity_loss, mode=mode, k=K, a=a, b=b, lr=lr, hvp_batches=BATCH, **kw
    )
    model(None).backward()
    opt.step()
    # Independent answer: the top-K eigenvectors of A from eigh.
    _, vecs = torch.linalg.eigh(A)
    V = vecs[:, -K:]
    g = A @ w0 - c
    pg = V @ (V.T @ g)
    return model.w.detach(), w0, g, pg, opt


def test_dom_keeps_exactly_the_top_k_component():
    w, w0, g, pg, opt = _one_step("dom")
    torch.testing.assert_close(w, w0 - 0.05 * pg, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        opt.eigenvalues, torch.tensor([9.0, 7.0, 5.0], dtype=torch.float64), rtol=1e-10, atol=0
    )
    assert opt.dom_fraction == pytest.approx(float(pg.norm() / g.norm()), rel=1e-10)
    # float32 Lanczos (the memory-saving option for large nets): same step to fp32 accuracy.
    w32, *_ = _one_step("dom", lanczos_dtype=torch.float32)
    torch.testing.assert_close(w32, w, rtol=1e-5, atol=1e-6)


def test_bulk_keeps_the_rest():
    w, w0, g, pg, _ = _one_step("bulk")
    torch.testing.assert_close(w, w0 - 0.05 * (g - pg), rtol=1e-10, atol=1e-12)


def test_interp_weights_both_parts_and_one_one_is_sgd():
    w, w0, g, pg, _ = _one_step("interp", a=0.3, b=2.0)
    torch.testing.assert_close(w, w0 - 0.05 * (0.3 * pg + 2.0 * (g - pg)), rtol=1e-10, atol=1e-12)

    w, w0, g, _, _ = _one_step("interp", a=1.0, b=1.0)
    A, c, _ = _problem()
    ref = Quadratic(A, c, w0)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.05)
    ref(None).backward()
    sgd.step()
    torch.testing.assert_close(w, ref.w.detach(), rtol=1e-12, atol=1e-13)


def test_refresh_cadence_and_state_dict_round_trip():
    A, c, w0 = _problem()
    model = Quadratic(A, c, w0)
    opt = SubspaceSGD(model, _identity_loss, "dom", k=K, interval=3, lr=0.05, momentum=0.9)
    refreshes = []
    original = opt.refresh_basis
    opt.refresh_basis = lambda batches: refreshes.append(opt._step) or original(batches)

    def closure():
        loss = model(None)
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="batch"):
        opt.step(closure)  # step 0 needs a Hessian batch
    drawn = []
    opt.hvp_batches = lambda: drawn.append(1) or BATCH  # a loader-like source, drawn per refresh
    for _ in range(4):
        opt.step(closure)
    assert refreshes == [0, 3] and len(drawn) == 2

    sd_buf = io.BytesIO()
    torch.save(opt.state_dict(), sd_buf)
    sd_buf.seek(0)
    sd = torch.load(sd_buf, weights_only=True)
    twin = copy.deepcopy(model)
    opt2 = SubspaceSGD(twin, _identity_loss, "dom", k=K, interval=3, lr=0.05, momentum=0.9)
    opt2.load_state_dict(sd)

    def twin_closure():
        loss = twin(None)
        loss.backward()
        return loss

    for _ in range(3):  # steps 4, 5 (kept basis), 6 (refresh)
        opt.step(closure, batch=BATCH)
        opt2.step(twin_closure, batch=BATCH)
    torch.testing.assert_close(model.w, twin.w, rtol=0, atol=0)


def test_bad_arguments():
    A, c, w0 = _problem()
    model = Quadratic(A, c, w0)
    with pytest.raises(ValueError, match="mode"):
        SubspaceSGD(model, _identity_loss, mode="top")
    with pytest.raises(ValueError, match="k must"):
        SubspaceSGD(model, _identity_loss, k=DIM + 1)
    with pytest.raises(ValueError, match="interval"):
        SubspaceSGD(model, _identity_loss, k=2, interval=0)


def test_dom_on_a_tiny_net_matches_exact_hessian_eigenvectors():
    """Several parameter tensors: the flat order of grads and Hessian must agree."""
    from torch.func import functional_call, jacrev

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,))
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    theta0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def loss_flat(theta):
        chunks = torch.split(theta, [s.numel() for s in shapes])
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        return nn.functional.cross_entropy(functional_call(net, params, (x,)), y)

    H = jacrev(jacrev(loss_flat))(theta0)  # reverse-over-reverse: exact, no forward AD
    vals, vecs = torch.linalg.eigh(H)
    assert vals[-2] - vals[-3] > 1e-3 * vals[-1]  # top-2 subspace well separated
    V = vecs[:, -2:]
    g = torch.func.grad(loss_flat)(theta0)

    opt = SubspaceSGD(net, nn.functional.cross_entropy, "dom", k=2, lr=0.1, lanczos_iters=26)
    nn.functional.cross_entropy(net(x), y).backward()
    opt.step(batch=(x, y))
    theta1 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    torch.testing.assert_close(theta1, theta0 - 0.1 * V @ (V.T @ g), rtol=1e-8, atol=1e-10)
