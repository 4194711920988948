"""Dynamic spectral inference: drift-adaptive refresh vs fixed p, EMA closed form, spectral TTA."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dsbp import SpectralProjector
from dsbp.core.subspace import principal_angles
from dsbp.extensions.inference import (
    TENT,
    AdaptiveDSBP,
    AdaptiveSpectralProjector,
    SpectralTTA,
    entropy,
    shift_benchmark,
)
from dsbp.models.cnn import SmallCNN


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


D, K = 16, 3


def _cov(seed):
    """(Q, sqrt eigenvalues): known covariance with eigenvalues 9, 7, 5 then <= 1."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    ev = torch.cat([torch.tensor([9.0, 7.0, 5.0]), torch.linspace(1.0, 0.2, D - K)]).double()
    return Q, ev.sqrt()


def _top(cov):
    Q, s = cov
    return torch.linalg.eigh(Q @ torch.diag(s**2) @ Q.T).eigenvectors[:, -K:]


def _batch(cov, n, g):
    Q, s = cov
    return ((torch.randn(n, D, generator=g, dtype=torch.float64) * s) @ Q.T).float()


def _run(proj, model, cov_at, steps, seed=0, n=256, watch=None):
    """Drive a Linear layer (input side: its rows are the stream itself); record angles."""
    g = torch.Generator().manual_seed(seed)
    angles = []
    for t in range(steps):
        model.zero_grad()
        model(_batch(cov_at(t), n, g)).pow(2).sum().backward()
        proj.project_()
        if watch is not None:
            angles.append(float(principal_angles(proj.basis(model), watch).max()))
    return angles


def _layer():
    torch.manual_seed(0)
    return nn.Linear(D, 4, bias=False)


def test_abrupt_switch_shortens_interval_and_recovers_faster_than_fixed_p():
    a, b = _cov(1), _cov(2)
    switch, steps = 150, 230

    def cov_at(t):
        return a if t < switch else b

    target = _top(b)
    assert float(principal_angles(_top(a), target).max()) > 1.0  # a real change
    m1, m2 = _layer(), _layer()
    fixed = SpectralProjector(m1, rank=K, interval=64, side="input", sharpness=0.0)
    ada = AdaptiveSpectralProjector(
        m2, rank=K, interval=64, side="input", sharpness=0.0, p_min=4, p_max=256, tau=0.3, rho=0.9
    )
    ang_f = _run(fixed, m1, cov_at, steps, watch=target)
    interval_before = None
    ang_a, intervals = [], []
    g = torch.Generator().manual_seed(0)
    for t in range(steps):
        if t == switch:
            interval_before = ada.intervals()[""]
        m2.zero_grad()
        m2(_batch(cov_at(t), 256, g)).pow(2).sum().backward()
        ada.project_()
        ang_a.append(float(principal_angles(ada.basis(m2), target).max()))
        intervals.append(ada.intervals()[""])

    def recovery(angles):
        return next(t for t in range(switch, steps) if angles[t] < 0.2) - switch

    assert recovery(ang_a) <= 4  # detected at the next probe (every p_min = 4 steps)
    assert recovery(ang_f) >= 192 - switch  # fixed p waits for its next refresh at step 192
    early = [h for h in ada.history if h["event"] == "early"]
    assert early and switch <= early[0]["step"] <= switch + 4
    assert interval_before == 128  # it had grown on the stationary part (64 -> 128)
    assert min(intervals[switch : switch + 5]) < interval_before  # shortened at the switch


def test_stationary_stream_grows_interval_to_p_max_without_early_refreshes():
    a = _cov(3)
    m = _layer()
    ada = AdaptiveSpectralProjector(
        m, rank=K, interval=32, side="input", sharpness=0.0, p_min=8, p_max=128, tau=0.3, rho=0.9
    )
    _run(ada, m, lambda t: a, steps=260)
    assert ada.intervals()[""] == 128
    assert not [h for h in ada.history if h["event"] == "early"]
    assert [h for h in ada.history if h["event"] == "probe"]  # probes did run
    assert float(principal_angles(ada.basis(m), _top(a)).max()) < 0.2


def test_dense_ema_covariance_matches_closed_form():
    a = _cov(4)
    m = _layer()
    rho = 0.7
    ada = AdaptiveSpectralProjector(
        m, rank=K, interval=1, side="input", sharpness=0.0, p_min=1, p_max=1, tau=1.0, rho=rho
    )
    g = torch.Generator().manual_seed(7)
    xs = [_batch(a, 64 + 32 * t, g) for t in range(4)]  # batches of different sizes
    for x in xs:
        m.zero_grad()
        m(x).pow(2).sum().backward()
        ada.project_()
    covs = [(x.double().T @ x.double()) / x.shape[0] for x in xs]
    ref = covs[0]
    for c in covs[1:]:
        ref = rho * ref + (1 - rho) * c
    assert torch.allclose(ada.ema_covariance(m).double(), ref, rtol=1e-4, atol=1e-4)
    # the basis is the EMA covariance's top-k (5 warm-started iterations from a good start)
    top = torch.linalg.eigh(ref).eigenvectors[:, -K:]
    assert float(principal_angles(ada.basis(m), top).max()) < 1e-2
    lam_hat = ada.eigenvalues(m)[0] / ada.layer_state(m).trace
    assert abs(float(lam_hat) - float(torch.linalg.eigvalsh(ref)[-1] / ref.trace())) < 1e-3


def test_adaptive_dsbp_is_a_drop_in_optimizer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = AdaptiveDSBP(net, torch.optim.SGD, rank=4, interval=4, p_min=2, p_max=16, lr=0.1)
    assert isinstance(opt.projector, AdaptiveSpectralProjector)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        first = float(loss.detach()) if first is None else first
        opt.step()
    with torch.no_grad():
        assert float(nn.functional.cross_entropy(net(x), y)) < first
    assert opt.projector.num_refreshes() > 0
    with pytest.raises(ValueError, match="rho"):
        AdaptiveSpectralProjector(net, rho=1.0)
    with pytest.raises(ValueError, match="p_min"):
        AdaptiveSpectralProjector(net, p_min=10, p_max=5)


def _bundled_batch(n=64):
    from dsbp.data import load_dataset

    ds = load_dataset("bundled")
    m = torch.tensor(ds.mean).view(1, -1, 1, 1)
    s = torch.tensor(ds.std).view(1, -1, 1, 1)
    return ds, (ds.x_test[:n].float() / 255 - m) / s


def test_spectral_tta_updates_stay_in_the_tracked_subspace_and_lower_entropy():
    ds, x = _bundled_batch()
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, width=8, hidden=16)
    spec = SpectralTTA(copy.deepcopy(model), rank=3, steps=1, lr=0.05, optimizer="sgd")
    tent = TENT(copy.deepcopy(model), rank=3, steps=1, lr=0.05, optimizer="sgd")
    bn_s, bn_t = spec.model.features[1], tent.model.features[1]
    g0_s, g0_t = bn_s.weight.detach().clone(), bn_t.weight.detach().clone()
    x8 = x[:8]  # 8 x 28 x 28 = 6272 conv-output rows: under max_rows, so none are subsampled
    spec(x8)
    tent(x8)
    # The basis is the top-3 eigenvectors of this batch's conv-output covariance (eigh).
    rows = []
    conv = spec.model.features[0]
    h = conv.register_forward_hook(lambda m, i, o: rows.append(o.detach()))
    with torch.no_grad():
        spec.model(x8)
    h.remove()
    A = rows[0].permute(0, 2, 3, 1).reshape(-1, 8).double()
    top = torch.linalg.eigh(A.T @ A).eigenvectors[:, -3:]
    E = spec.projector.basis(conv)
    assert float(principal_angles(E, top).max()) < 1e-3
    # Same start, same batch: TENT's gradient is the raw one, and the spectral gradient must be
    # exactly E E^T of it (closed form), for gamma and beta of the BN after the conv.
    E64 = E.double()
    for p_s, p_t in ((bn_s.weight, bn_t.weight), (bn_s.bias, bn_t.bias)):
        g_s, g_t = p_s.grad.double(), p_t.grad.double()
        assert float(g_t.norm()) > 0
        assert torch.allclose(g_s, E64 @ (E64.T @ g_t), atol=1e-6 * float(g_t.norm()))
        assert float((g_t - E64 @ (E64.T @ g_t)).norm()) > 1e-2 * float(g_t.norm())
    # and the parameter moved (SGD, first step: delta = -lr * projected gradient)
    d_s = (bn_s.weight.detach() - g0_s).double()
    assert torch.allclose(d_s, -0.05 * bn_s.weight.grad.double(), atol=1e-6)
    assert not torch.equal(bn_t.weight.detach(), g0_t)
    # A few steps on the same batch lower the mean prediction entropy, projected or not.
    for runner in (spec, tent):
        with torch.no_grad():
            before = float(entropy(runner.model(x)).mean())
        for _ in range(5):
            runner(x)
        with torch.no_grad():
            after = float(entropy(runner.model(x)).mean())
        assert after < before
        runner.remove()


def test_shift_benchmark_rows_and_clean_no_adaptation_equals_eval_accuracy():
    from dsbp.data.shifts import apply_shift

    ds, x = _bundled_batch(96)
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, width=4, hidden=8).eval()
    xt, yt = ds.x_test[:96], ds.y_test[:96]
    rows = shift_benchmark(
        model,
        apply_shift,
        xt,
        yt,
        ds.mean,
        ds.std,
        kinds=("rotate",),
        severities=(0, 3),
        methods=("none", "tent"),
        batch_size=32,
    )
    assert [(r["severity"], r["method"]) for r in rows] == [
        (0, "none"),
        (0, "tent"),
        (3, "none"),
        (3, "tent"),
    ]
    with torch.no_grad():
        acc = float((model(x).argmax(1) == yt).float().mean())
    assert abs(rows[0]["accuracy"] - acc) < 1e-9
    with pytest.raises(ValueError, match="unknown test-time"):
        shift_benchmark(model, apply_shift, xt, yt, ds.mean, ds.std, methods=("nope",))
