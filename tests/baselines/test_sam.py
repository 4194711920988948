"""SAM: the closed-form step on a quadratic, BatchNorm statistics, AMP, state_dict."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from dsbp.baselines.sam import SAM


def _quadratic(n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = M @ M.T + torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    w0 = torch.randn(n, generator=g, dtype=torch.float64)
    return A, b, w0


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_step_matches_closed_form_on_quadratic(adaptive):
    A, b, w0 = _quadratic()
    lr, rho = 0.1, 0.3
    w = nn.Parameter(w0.clone())
    opt = SAM([w], torch.optim.SGD, rho=rho, adaptive=adaptive, lr=lr)

    def closure():
        loss = 0.5 * w @ A @ w - b @ w
        loss.backward()
        return loss

    loss = opt.step(closure)
    grad = lambda v: A @ v - b  # noqa: E731
    g = grad(w0)
    if adaptive:  # ASAM: e = rho T^2 g / ||T g||, T = |w|
        e = rho * w0**2 * g / torch.linalg.vector_norm(w0.abs() * g)
    else:
        e = rho * g / torch.linalg.vector_norm(g)
    expected = w0 - lr * grad(w0 + e)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss.detach(), 0.5 * w0 @ A @ w0 - b @ w0)
    # Not plain SGD: the ascent changed the gradient used.
    assert not torch.allclose(w.detach(), w0 - lr * g)


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 3),
        nn.BatchNorm1d(3),
    )


@pytest.mark.parametrize("momentum", [0.1, None])
def test_sam_leaves_bn_running_stats_as_one_plain_forward(momentum):
    net = _bn_net()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum
    ref, unguarded = copy.deepcopy(net), copy.deepcopy(net)
    x, y = torch.randn(8, 2, 5, 5), torch.randint(0, 3, (8,))

    def make_closure(model):
        def closure():
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        return closure

    SAM(net.parameters(), rho=0.5, model=net, lr=0.1).step(make_closure(net))
    SAM(unguarded.parameters(), rho=0.5, lr=0.1).step(make_closure(unguarded))
    ref(x)  # one plain forward in train mode at the unperturbed weights
    buffers = dict(net.named_buffers())
    for name, buf in ref.named_buffers():
        torch.testing.assert_close(buffers[name], buf, rtol=0, atol=0, msg=name)
    assert net[1].momentum == momentum  # restored after the second pass
    # Without model=..., the second pass moves the stats again (the test can fail).
    assert not torch.equal(dict(unguarded.named_buffers())["1.running_mean"], ref[1].running_mean)


def _sgd_momentum_model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _closure(model, x, y):
    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def test_sam_state_dict_round_trip_and_shared_groups():
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    a = _sgd_momentum_model()
    opt_a = SAM(a.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9)
    opt_a.step(_closure(a, x, y))
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)  # tensors-only state
    assert any("momentum_buffer" in s for s in sd["state"].values())

    b = copy.deepcopy(a)
    opt_b = SAM(b.parameters(), torch.optim.SGD, rho=0.7, lr=1.0, momentum=0.9)
    opt_b.load_state_dict(sd)
    assert opt_b.param_groups[0]["rho"] == 0.1 and opt_b.param_groups[0]["lr"] == 0.05
    assert opt_b.param_groups is opt_b.base_optimizer.param_groups
    sched = torch.optim.lr_scheduler.StepLR(opt_b, step_size=1, gamma=0.5)
    for opt, model in ((opt_a, a), (opt_b, b)):
        opt.step(_closure(model, x, y))
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)

    # A scheduler on SAM drives the base optimizer through the shared groups.
    sched.step()
    assert opt_b.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.025)


def test_sam_under_bf16_autocast_close_to_fp32():
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    a = _sgd_momentum_model()
    b = copy.deepcopy(a)
    SAM(a.parameters(), rho=0.1, lr=0.5).step(_closure(a, x, y))

    def amp_closure():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(b(x), y)
        loss.backward()
        return loss

    b0 = copy.deepcopy(b)
    SAM(b.parameters(), rho=0.1, lr=0.5).step(amp_closure)
    for pa, pb, p0 in zip(a.parameters(), b.parameters(), b0.parameters(), strict=True):
        assert pb.dtype == torch.float32
        # bf16 has ~3 significant digits: the update agrees with fp32's to a few percent.
        step_a, step_b = pa - p0, pb - p0
        assert torch.linalg.vector_norm(step_a - step_b) < 0.05 * torch.linalg.vector_norm(step_a)


def _scaled_sam_step(model, opt, scaler, x, y, poison_first=False):
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    if poison_first:
        loss = loss * float("inf")
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    moved = opt.first_step(zero_grad=True)
    if moved:
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        opt.second_step(scaler=scaler)
    scaler.update()
    return moved


def test_sam_with_grad_scaler_matches_unscaled_and_skips_on_inf():
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    a = _sgd_momentum_model()
    b, c = copy.deepcopy(a), copy.deepcopy(a)
    SAM(a.parameters(), rho=0.1, lr=0.5).step(_closure(a, x, y))

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    opt_b = SAM(b.parameters(), rho=0.1, lr=0.5)
    assert _scaled_sam_step(b, opt_b, scaler, x, y)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)

    scaler_c = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    opt_c = SAM(c.parameters(), rho=0.1, lr=0.5)
    c0 = copy.deepcopy(c)
    assert not _scaled_sam_step(c, opt_c, scaler_c, x, y, poison_first=True)
    for pc, p0 in zip(c.parameters(), c0.parameters(), strict=True):
        assert torch.equal(pc, p0)  # overflow: no ascent, no step
    assert scaler_c.get_scale() < 2.0**12

    # The closure form with scaler=... runs the same sequence.
    d = copy.deepcopy(c0)
    scaler_d = torch.amp.GradScaler("cpu", init_scale=2.0**12)

    def scaled_closure():
        loss = nn.functional.cross_entropy(d(x), y)
        scaler_d.scale(loss).backward()
        return loss

    SAM(d.parameters(), rho=0.1, lr=0.5).step(scaled_closure, scaler=scaler_d)
    scaler_d.update()
    for pa, pd in zip(a.parameters(), d.parameters(), strict=True):
        torch.testing.assert_close(pa, pd, rtol=1e-6, atol=1e-7)


def test_sam_rejects_bad_arguments():
    p = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="rho"):
        SAM(p, rho=-1.0, lr=0.1)
    with pytest.raises(ValueError, match="base_optimizer"):
        SAM(p, base_optimizer=torch.optim.SGD(p, lr=0.1), lr=0.1)
    with pytest.raises(ValueError, match="closure"):
        SAM(p, lr=0.1).step()


def test_sam_failed_second_pass_restores_weights_and_bn():
    net = _bn_net()
    w0 = [p.detach().clone() for p in net.parameters()]
    x, y = torch.randn(8, 2, 5, 5), torch.randint(0, 3, (8,))
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom in the second pass")
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss

    opt = SAM(net.parameters(), rho=0.5, model=net, lr=0.1)
    with pytest.raises(RuntimeError, match="boom"):
        opt.step(closure)
    for p, p0 in zip(net.parameters(), w0, strict=True):
        assert torch.equal(p, p0)
    assert net[1].momentum == 0.1
    opt.step(_closure(net, x, y))  # usable afterwards (no stale backup)
