"""Spectral MAML: equals MAML at k = d, inner steps in span(E) (closed form), no gradient
into the bases (against a torch.func reference that treats them as constants)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from dsbp.baselines.maml import MAML
from dsbp.extensions.meta import SpectralMAML, projected_grad_transform


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
    )


def _tasks(n: int, shape=(1, 8, 8), ways=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        sy = torch.arange(ways).repeat_interleave(2)
        qy = torch.arange(ways).repeat_interleave(3)
        out.append((torch.randn(len(sy), *shape, generator=g), sy,
                    torch.randn(len(qy), *shape, generator=g), qy))
    return out


@pytest.mark.parametrize("first_order", [True, False])
def test_full_rank_equals_maml(first_order):
    base = _conv_net()
    m1, m2 = copy.deepcopy(base), copy.deepcopy(base)
    maml = MAML(m1, inner_lr=0.3, inner_steps=2, first_order=first_order)
    smaml = SpectralMAML(m2, rank=64, inner_lr=0.3, inner_steps=2, first_order=first_order)
    tasks = _tasks(2)
    maml.meta_loss(tasks).backward()
    smaml.meta_loss(tasks).backward()
    for (n, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters(), strict=True):
        torch.testing.assert_close(p2.grad, p1.grad, atol=2e-6, rtol=1e-5, msg=n)
    # the extra support forward pass for the bases leaves BatchNorm statistics alone
    for (n, b1), (_, b2) in zip(m1.named_buffers(), m2.named_buffers(), strict=True):
        torch.testing.assert_close(b2, b1, rtol=1e-6, atol=1e-6, msg=n)
    l1, a1 = maml.evaluate(tasks)
    l2, a2 = smaml.evaluate(tasks)
    assert abs(l1 - l2) < 1e-5 and a1 == a2


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))


def _reference_bases(model: nn.Module, params, x, k: int, side: str) -> dict[str, torch.Tensor]:
    """Top-k eigenvectors of A^T A of each Linear, by eigh, from a hand-written forward pass."""
    W0, b0, W2 = params["0.weight"], params["0.bias"], params["2.weight"]
    h_out0 = x @ W0.T + b0
    h_in2 = torch.tanh(h_out0)
    h_out2 = h_in2 @ W2.T + params["2.bias"]
    acts = {"0": h_out0, "2": h_out2} if side == "output" else {"0": x, "2": h_in2}
    out = {}
    for n, A in acts.items():
        A = A.detach().double()
        _, vecs = torch.linalg.eigh(A.T @ A)
        out[n] = vecs[:, -min(k, A.shape[1]):].float()
    return out


def _proj(G, E, side):
    return E @ (E.T @ G) if side == "output" else (G @ E) @ E.T


@pytest.mark.parametrize("side", ["output", "input"])
def test_inner_steps_follow_closed_form_in_span_of_support_bases(side):
    model = _mlp()
    k, alpha = 2, 0.2
    smaml = SpectralMAML(model, rank=k, side=side, inner_lr=alpha, inner_steps=2)
    sx, sy, _, _ = _tasks(1, shape=(6,), ways=5, seed=3)[0]
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    fast = smaml.adapt(smaml.params(), sx, sy)

    # independent answer: bases from theta (held fixed for both steps), gradients by torch.func
    E = _reference_bases(model, theta, sx, k, side)

    def support_loss(p):
        return F.cross_entropy(functional_call(model, p, (sx,)), sy)

    phi = dict(theta)
    for _ in range(2):
        g = torch.func.grad(support_loss)(phi)
        phi = {n: phi[n] - alpha * (_proj(g[n], E[n[0]], side) if n.endswith("weight") else g[n])
               for n in phi}
    for n in phi:
        torch.testing.assert_close(fast[n].detach(), phi[n], atol=1e-5, rtol=1e-4, msg=n)
    for layer in ("0", "2"):
        step = (fast[f"{layer}.weight"] - theta[f"{layer}.weight"]).detach()
        Eref = E[layer]
        assert step.abs().max() > 1e-4  # the step is not trivially zero
        off_span = step - _proj(step, Eref, side)
        assert off_span.abs().max() < 1e-5, layer


def test_second_order_meta_gradient_treats_bases_as_constants():
    model = _mlp()
    k, alpha = 3, 0.3
    smaml = SpectralMAML(model, rank=k, inner_lr=alpha, inner_steps=1, first_order=False)
    sx, sy, qx, qy = _tasks(1, shape=(6,), ways=5, seed=4)[0]
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}

    bases = smaml.support_bases(smaml.params(), sx)
    assert all(not E.requires_grad and E.grad_fn is None for E in bases.values())

    smaml.meta_loss([(sx, sy, qx, qy)]).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}

    E = _reference_bases(model, theta, sx, k, "output")  # constants for torch.func

    def meta_objective(p):
        g = torch.func.grad(
            lambda q: F.cross_entropy(functional_call(model, q, (sx,)), sy))(p)
        fast = {n: p[n] - alpha * (_proj(g[n], E[n[0]], "output") if n.endswith("weight")
                                   else g[n]) for n in p}
        return F.cross_entropy(functional_call(model, fast, (qx,)), qy)

    want = torch.func.grad(meta_objective)(theta)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-4, msg=n)
    # and it is genuinely second order: first-order MAML's gradient differs
    model.zero_grad()
    SpectralMAML(model, rank=k, inner_lr=alpha, inner_steps=1).meta_loss(
        [(sx, sy, qx, qy)]).backward()
    assert any((p.grad - got[n]).abs().max() > 1e-4 for n, p in model.named_parameters())


def test_transform_passes_other_parameters_and_rejects_bad_side():
    E = torch.linalg.qr(torch.randn(4, 2)).Q
    T = projected_grad_transform({"lin": E})
    G, b = torch.randn(4, 3), torch.randn(4)
    out = T({"lin.weight": G, "lin.bias": b})
    torch.testing.assert_close(out["lin.weight"], E @ E.T @ G)
    assert out["lin.bias"] is b
    with pytest.raises(ValueError, match="side"):
        projected_grad_transform({"lin": E}, side="both")
    with pytest.raises(ValueError, match="rank"):
        SpectralMAML(_mlp(), rank=0)
