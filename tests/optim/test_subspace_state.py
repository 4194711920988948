"""SubspaceAdam (memory mode): closed forms for the subspace Adam step and state re-projection."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsbp.optim.subspace_state import SubspaceAdam, reproject_moments, state_bytes


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 24), nn.ReLU(), nn.Linear(24, 10))


@pytest.mark.parametrize("side", ["output", "input"])
def test_fixed_basis_equals_adam_on_subspace_coordinates(fmnist_batch, side):
    """With the basis fixed, W_t = W_0 + E Z_t where Z follows torch.optim.Adam on R_t = E^T G_t."""
    x, y = fmnist_batch
    net = _net()
    lin = net[1]
    W0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    opt = SubspaceAdam(net, lr=1e-2, weight_decay=0.0, rank=5, interval=10**6, side=side,
                       sharpness=0.0)
    assert opt.is_subspace(lin.weight) and not opt.is_subspace(lin.bias)
    grads, bgrads = [], []
    for t in range(6):
        opt.zero_grad()
        F.cross_entropy(net(x[16 * t: 16 * t + 16]), y[16 * t: 16 * t + 16]).backward()
        grads.append(lin.weight.grad.clone())
        bgrads.append(lin.bias.grad.clone())
        opt.step()
    E = opt.projector.basis(lin)  # fixed: only step 0 refreshed
    assert opt.projector.num_refreshes(lin) == 1
    k = E.shape[1]
    Z = torch.zeros((k, 784) if side == "output" else (24, k), requires_grad=True)
    b = b0.clone().requires_grad_(True)
    ref = torch.optim.Adam([Z, b], lr=1e-2)
    for G, gb in zip(grads, bgrads, strict=True):
        Z.grad = E.T @ G if side == "output" else G @ E
        b.grad = gb
        ref.step()
    want = W0 + (E @ Z if side == "output" else Z @ E.T).detach()
    assert torch.allclose(lin.weight, want, rtol=1e-5, atol=1e-6)
    assert torch.allclose(lin.bias, b.detach(), rtol=1e-6, atol=1e-7)
    assert opt.state[lin.weight]["exp_avg"].shape == Z.shape  # the state lives in k dims
    assert not torch.allclose(lin.weight, W0)


def _orthonormal(d, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]


@pytest.mark.parametrize("side", ["output", "input"])
def test_reprojection_is_exact_for_a_rotation_within_the_span(side):
    E_old = _orthonormal(30, 4, 0)
    O = _orthonormal(4, 4, 1)  # a rotation of the coordinates
    E_new = E_old @ O
    g = torch.Generator().manual_seed(2)
    shape = (4, 7) if side == "output" else (7, 4)
    m = torch.randn(shape, generator=g, dtype=torch.float64)
    v = torch.ones(shape, dtype=torch.float64) * torch.rand(
        (1, 7) if side == "output" else (7, 1), generator=g, dtype=torch.float64)
    m_new, v_new = reproject_moments(m, v, E_old, E_new, side)
    if side == "output":  # the momentum as a full-space matrix is unchanged
        assert torch.allclose(E_new @ m_new, E_old @ m, atol=1e-12)
    else:
        assert torch.allclose(m_new @ E_new.T, m @ E_old.T, atol=1e-12)
    # an isotropic second moment (equal across basis coordinates) is rotation invariant
    assert torch.allclose(v_new, v, atol=1e-12)


def test_second_moment_is_exact_for_signed_permutations():
    E_old = _orthonormal(20, 3, 3)
    E_new = E_old[:, [2, 0, 1]] * torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    m = torch.randn(3, 5, dtype=torch.float64)
    v = torch.rand(3, 5, dtype=torch.float64)
    m_new, v_new = reproject_moments(m, v, E_old, E_new, "output")
    assert torch.allclose(v_new, v[[2, 0, 1]], rtol=0, atol=1e-12)
    assert torch.allclose(m_new, m[[2, 0, 1]] * torch.tensor([[1.0], [-1.0], [1.0]],
                                                              dtype=torch.float64))
    # a direction leaving the span takes its momentum with it (orthogonal projection)
    E_out = torch.cat([E_old[:, :2], _orthonormal(20, 1, 9)], 1)
    E_out[:, 2] -= E_old @ (E_old.T @ E_out[:, 2])
    E_out[:, 2] /= E_out[:, 2].norm()
    m_new, _ = reproject_moments(m, v, E_old, E_out, "output")
    assert torch.allclose(m_new[2], torch.zeros(5, dtype=torch.float64), atol=1e-12)
    with pytest.raises(ValueError, match="second_moment"):
        reproject_moments(m, v, E_old, E_new, "output", "bogus")


def test_refresh_reprojects_the_optimizer_state(fmnist_batch):
    """On a refresh step: m_t = b1 Q m_old + (1-b1) R_t, v_t = b2 (Q*Q) v_old + (1-b2) R_t^2."""
    x, y = fmnist_batch
    net = _net()
    lin = net[1]
    opt = SubspaceAdam(net, lr=1e-2, rank=4, interval=3, sharpness=0.0)
    for t in range(4):
        opt.zero_grad()
        F.cross_entropy(net(x[24 * t: 24 * t + 24]), y[24 * t: 24 * t + 24]).backward()
        if t == 3:  # the refresh step: record the state it starts from
            E_old = opt.projector.basis(lin).clone()
            m_old = opt.state[lin.weight]["exp_avg"].clone()
            v_old = opt.state[lin.weight]["exp_avg_sq"].clone()
        opt.step()
    assert opt.projector.num_refreshes(lin) == 2
    E_new = opt.projector.basis(lin)
    assert (E_new - E_old).abs().max() > 1e-4  # the basis really moved
    Q = E_new.T @ E_old
    R = E_new.T @ lin.weight.grad
    st = opt.state[lin.weight]
    assert torch.allclose(st["exp_avg"], 0.9 * (Q @ m_old) + 0.1 * R, rtol=1e-5, atol=1e-8)
    assert torch.allclose(st["exp_avg_sq"], 0.999 * ((Q * Q) @ v_old) + 0.001 * R * R,
                          rtol=1e-5, atol=1e-12)


def test_state_bytes_closed_form_and_ratio_vs_adamw():
    torch.manual_seed(0)
    d, k = 128, 8  # k = d / 16
    net = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
    net_ref = copy.deepcopy(net)
    x = torch.randn(64, d)  # shapes only: the point is the byte count, a closed form
    sub = SubspaceAdam(net, rank=k, projector_kwargs={"oversample": 0})
    adamw = torch.optim.AdamW(net_ref.parameters())
    for m, o in ((net, sub), (net_ref, adamw)):
        m(x).square().mean().backward()
        o.step()
    f = 4  # fp32 bytes
    step = 4  # one float32 scalar per parameter
    want_sub = 2 * (2 * k * d * f + step) + 2 * (2 * d * f + step)  # weights + biases
    want_sub += 2 * (d * k * f + k * f + f)  # projector block, eigenvalues, trace
    assert state_bytes(sub) == want_sub
    want_adamw = 2 * (2 * d * d * f + step) + 2 * (2 * d * f + step)
    assert state_bytes(adamw) == want_adamw
    assert want_adamw / want_sub > 4


def test_resume_is_bit_exact(fmnist_batch, tmp_path):
    x, y = fmnist_batch

    def run(net, opt, steps, start):
        for t in range(start, start + steps):
            opt.zero_grad()
            F.cross_entropy(net(x[8 * t: 8 * t + 8]), y[8 * t: 8 * t + 8]).backward()
            opt.step()

    net = _net()
    opt = SubspaceAdam(net, rank=4, interval=2)
    run(net, opt, 3, 0)
    torch.save({"m": net.state_dict(), "o": opt.state_dict()}, tmp_path / "c.pt")
    run(net, opt, 3, 3)
    net2 = _net()
    opt2 = SubspaceAdam(net2, rank=4, interval=2)
    ck = torch.load(tmp_path / "c.pt", weights_only=True)
    net2.load_state_dict(ck["m"])
    opt2.load_state_dict(ck["o"])
    run(net2, opt2, 3, 3)
    for a, b in zip(net.parameters(), net2.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kw, match", [({"second_moment": "x"}, "second_moment"),
                                       ({"lr": -1.0}, "lr"), ({"betas": (1.0, 0.9)}, "betas"),
                                       ({"eps": 0.0}, "eps")])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        SubspaceAdam(_net(), **kw)


def test_state_bytes_counts_wrapped_base_optimizers():
    """DSBP and SAM keep their momentum in a base optimizer: it is counted, once."""
    from dsbp import DSBP
    from dsbp.baselines.sam import SAM

    torch.manual_seed(0)
    d, k = 32, 4
    x = torch.randn(16, d)  # shapes only: the point is the byte count
    lin = nn.Linear(d, d)
    dsbp = DSBP(lin, torch.optim.SGD, rank=k, lr=0.1, momentum=0.9,
                projector_kwargs={"oversample": 2})
    lin(x).square().mean().backward()
    dsbp.step()
    momentum = (d * d + d) * 4
    assert state_bytes(dsbp) == momentum + (d * (k + 2) + (k + 2) + 1) * 4
    lin2 = nn.Linear(d, d)
    sam = SAM(lin2.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)

    def closure():
        loss = lin2(x).square().mean()
        loss.backward()
        return loss

    sam.step(closure)
    assert state_bytes(sam) == momentum


def test_conv_weights_keep_state_in_basis_coordinates(fmnist_batch):
    """Conv2d (viewed as C_out x C_in*kh*kw): fixed basis => W_t = W_0 + E Z_t, Z from Adam."""
    x, y = fmnist_batch
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                        nn.Flatten(), nn.Linear(128, 10))
    conv = net[0]
    W0 = conv.weight.detach().clone()
    opt = SubspaceAdam(net, lr=1e-2, weight_decay=0.0, rank=3, interval=10**6, sharpness=0.0)
    grads = []
    for t in range(4):
        opt.zero_grad()
        F.cross_entropy(net(x[16 * t: 16 * t + 16]), y[16 * t: 16 * t + 16]).backward()
        grads.append(conv.weight.grad.reshape(8, 9).clone())
        opt.step()
    E = opt.projector.basis(conv)  # (8, 3): output channels
    assert opt.state[conv.weight]["exp_avg"].shape == (3, 9)
    Z = torch.zeros(3, 9, requires_grad=True)
    ref = torch.optim.Adam([Z], lr=1e-2)
    for G in grads:
        Z.grad = E.T @ G
        ref.step()
    want = W0 + (E @ Z).detach().view_as(W0)
    assert torch.allclose(conv.weight, want, rtol=1e-5, atol=1e-6)
