"""MAML: closed-form inner step, second-order meta-gradient vs torch.func and finite differences."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from dsbp.baselines.maml import MAML


def _tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _tasks(n_tasks: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_tasks):
        sx, qx = (torch.randn(6, 3, generator=g, dtype=torch.float64) for _ in range(2))
        sy, qy = (torch.randint(0, 2, (6,), generator=g) for _ in range(2))
        out.append((sx, sy, qx, qy))
    return out


def test_one_inner_step_matches_closed_form_linear_regression():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    maml = MAML(model, inner_lr=0.3, inner_steps=1, loss_fn=F.mse_loss)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    fast = maml.adapt(maml.params(), x, y)
    W, b = model.weight.detach(), model.bias.detach()
    r = x @ W.T + b - y  # (5, 2) residual; mse = mean(r^2) over 10 entries
    gW, gb = 2.0 / r.numel() * r.T @ x, 2.0 / r.numel() * r.sum(0)
    torch.testing.assert_close(fast["weight"], W - 0.3 * gW)
    torch.testing.assert_close(fast["bias"], b - 0.3 * gb)


def _reference_meta_loss(model, theta, tasks, lr, steps):
    """Meta-loss as a pure function of theta with torch.func.grad for the inner gradient."""

    def loss(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    total = 0.0
    for sx, sy, qx, qy in tasks:
        phi = theta
        for _ in range(steps):
            g = grad(loss)(phi, sx, sy)
            phi = {k: phi[k] - lr * g[k] for k in phi}
        total = total + loss(phi, qx, qy)
    return total / len(tasks)


def _meta_grad(maml, tasks):
    maml.model.zero_grad()
    maml.meta_loss(tasks).backward()
    return {n: p.grad.clone() for n, p in maml.model.named_parameters()}


def test_second_order_meta_gradient_matches_torch_func_and_finite_differences():
    model, tasks, lr, steps = _tiny(), _tasks(), 0.5, 2
    maml = MAML(model, inner_lr=lr, inner_steps=steps, first_order=False)
    ours = _meta_grad(maml, tasks)

    theta = {n: p.detach() for n, p in model.named_parameters()}
    ref = grad(_reference_meta_loss, argnums=1)(model, theta, tasks, lr, steps)
    for n in ours:
        torch.testing.assert_close(ours[n], ref[n], rtol=1e-9, atol=1e-11)

    # Central finite differences on a few coordinates (float64, h = 1e-6).
    h = 1e-6
    for name, idx in (("0.weight", (1, 2)), ("0.bias", (3,)), ("2.weight", (0, 1))):
        p = dict(model.named_parameters())[name]
        with torch.no_grad():
            p[idx] += h
            up = float(maml.meta_loss(tasks))
            p[idx] -= 2 * h
            down = float(maml.meta_loss(tasks))
            p[idx] += h
        assert ours[name][idx].item() == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-8)


def test_first_order_has_no_second_order_terms():
    model, tasks, lr, steps = _tiny(), _tasks(), 0.5, 2
    second = _meta_grad(MAML(model, lr, steps, first_order=False), tasks)
    fo = MAML(model, lr, steps, first_order=True)
    first = _meta_grad(fo, tasks)

    # FOMAML gradient = mean over tasks of grad L_Q at the (constant) fast weights.
    expected = {n: torch.zeros_like(g) for n, g in first.items()}
    for sx, sy, qx, qy in tasks:
        fast = {
            k: v.detach().requires_grad_(True) for k, v in fo.adapt(fo.params(), sx, sy).items()
        }
        gs = torch.autograd.grad(fo.loss(fast, qx, qy), list(fast.values()))
        for n, g in zip(fast, gs, strict=True):
            expected[n] += g / len(tasks)
    for n in first:
        torch.testing.assert_close(first[n], expected[n], rtol=1e-12, atol=1e-14)
    assert any(not torch.allclose(first[n], second[n], rtol=1e-3) for n in first)


def test_inner_grad_transform_is_applied_every_step():
    model, (task,) = _tiny(), _tasks(1)
    sx, sy = task[0], task[1]
    mask = {n: (torch.rand_like(p) > 0.5).double() for n, p in model.named_parameters()}
    calls = []

    def transform(g):
        calls.append(1)
        return {n: gi * mask[n] for n, gi in g.items()}

    maml = MAML(model, inner_lr=0.2, inner_steps=1, inner_grad_transform=transform)
    fast = maml.adapt(maml.params(), sx, sy)
    g = torch.autograd.grad(maml.loss(maml.params(), sx, sy), list(maml.params().values()))
    for (n, p), gi in zip(maml.params().items(), g, strict=True):
        torch.testing.assert_close(fast[n], p - 0.2 * gi * mask[n])
    # A per-call transform overrides the default one; three steps call it three times.
    calls.clear()
    maml.inner_steps = 3
    fast = maml.adapt(maml.params(), sx, sy, inner_grad_transform=lambda g: transform(g))
    assert len(calls) == 3
    frozen = {n: m == 0 for n, m in mask.items()}
    for n, p in maml.params().items():  # masked coordinates never move
        assert torch.equal(fast[n][frozen[n]], p.detach()[frozen[n]])


def test_evaluate_and_bad_arguments():
    model, tasks = _tiny(), _tasks(3)
    loss, acc = MAML(model, 0.5, 1).evaluate(tasks)
    manual = sum(float((model(qx).argmax(-1) == qy).double().mean()) for _, _, qx, qy in tasks)
    assert 0.0 <= acc <= 1.0 and loss > 0
    zero_step_acc = MAML(model, 0.0, 1).evaluate(tasks)[1]  # lr 0: no adaptation
    assert zero_step_acc == pytest.approx(manual / 3)
    with pytest.raises(ValueError, match="inner_lr"):
        MAML(model, -1.0)
    with pytest.raises(ValueError, match="no tasks"):
        MAML(model).meta_loss([])


@pytest.mark.parametrize("first_order", [False, True])
def test_batched_fast_path_matches_the_loop(first_order):
    model, tasks = _tiny(), _tasks(3)
    maml = MAML(model, inner_lr=0.5, inner_steps=2, first_order=first_order)
    loop_loss = maml.meta_loss(tasks)
    loop_grad = torch.autograd.grad(loop_loss, list(model.parameters()))
    stacked = [torch.stack(t) for t in zip(*tasks, strict=True)]
    vmap_loss = maml.meta_loss_batched(*stacked)
    vmap_grad = torch.autograd.grad(vmap_loss, list(model.parameters()))
    torch.testing.assert_close(vmap_loss, loop_loss, rtol=1e-12, atol=1e-12)
    for a, b in zip(vmap_grad, loop_grad, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    with pytest.raises(ValueError, match="BatchNorm"):
        MAML(bn).meta_loss_batched(*stacked)
