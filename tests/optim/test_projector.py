"""SpectralProjector against independent answers: eigh of the explicit covariance, E E^T G."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dsbp.optim.projector as projector_mod
from dsbp import SpectralProjector
from dsbp.core.subspace import principal_angles


def explicit_rows(model, x, side):
    """Full activation rows per layer, computed independently of dsbp.layers.adapters."""
    out = {}

    def hook(name):
        def f(m, inp, o):
            if isinstance(m, nn.Conv2d):
                if side == "output":
                    out[name] = o.detach().permute(0, 2, 3, 1).reshape(-1, o.shape[1])
                else:
                    cols = F.unfold(inp[0].detach(), m.kernel_size, m.dilation, m.padding, m.stride)
                    out[name] = cols.transpose(1, 2).reshape(-1, cols.shape[1])
            else:
                a = o if side == "output" else inp[0]
                out[name] = a.detach().reshape(-1, a.shape[-1])
        return f

    hs = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
          if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return {n: a.double() for n, a in out.items()}


def one_step(model, proj, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = {n: m.weight.grad.clone() for n, m in model.named_modules()
             if isinstance(m, (nn.Linear, nn.Conv2d))}
    proj.project_()
    return grads


def _structured_inputs(n=256, seed=0):
    # random images whose pixels have a decaying spectrum (a clear eigengap at every k)
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -2, 28 * 28)
    z = torch.randn(n, 28 * 28, generator=g) * scales
    Q = torch.linalg.qr(torch.randn(28 * 28, 28 * 28, generator=g)).Q
    return (z @ Q.T).reshape(n, 1, 28, 28) * 10, torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("side", ["output", "input"])
@pytest.mark.parametrize("data", ["random", "real"])
@pytest.mark.parametrize("path", ["exact", "power"])
def test_bases_match_eigh_of_explicit_covariance(convnet, fmnist_batch, side, data, path):
    x, y = fmnist_batch if data == "real" else _structured_inputs()
    k = 4
    # "exact": first refresh by eigh; "power": cold power iteration, then warm-started refreshes
    # float64 eigensolves: the check is about the algorithm, not fp32 round-off (see the fp32 test)
    proj = SpectralProjector(convnet, rank=k, interval=1, side=side, sharpness=0.0,
                             max_rows=10**6, exact_threshold=10**6 if path == "exact" else 0,
                             eig_dtype=torch.float64)
    ref = explicit_rows(convnet, x, side)
    lr = 0.0  # keep the weights (and so the activations) fixed across refreshes
    for _ in range(1 if path == "exact" else 8):
        one_step(convnet, proj, x, y)
        with torch.no_grad():
            for p in convnet.parameters():
                p.add_(p.grad, alpha=-lr)
    for name, A in ref.items():
        C = A.T @ A
        evals, vecs = torch.linalg.eigh(C)
        top = vecs[:, -k:]
        ang = principal_angles(proj.basis(name), top).max().item()
        assert ang < 1e-3, f"{name} ({side}, {data}, {path}): largest principal angle {ang:.2e}"
        lam = proj.eigenvalues(name).double()
        torch.testing.assert_close(lam, evals.flip(0)[:k], rtol=1e-3, atol=1e-3 * evals[-1].item())


@pytest.mark.parametrize("side", ["output", "input"])
def test_default_fp32_bases_are_close_to_eigh_on_real_activations(convnet, fmnist_batch, side):
    # fp32 covariance products over ~1e5 rows carry ~1e-5 relative error; with relative eigengaps
    # of ~1e-2 at k=4 (measured on these layers) Davis-Kahan allows angles of order 1e-3.
    x, y = fmnist_batch
    proj = SpectralProjector(convnet, rank=4, interval=1, side=side, sharpness=0.0, max_rows=10**6)
    ref = explicit_rows(convnet, x, side)
    one_step(convnet, proj, x, y)
    for name, A in ref.items():
        top = torch.linalg.eigh(A.T @ A)[1][:, -4:]
        assert principal_angles(proj.basis(name), top).max().item() < 1e-2, name


@pytest.mark.parametrize("side", ["output", "input"])
def test_project_rewrites_grad_as_EEtG_plus_sharpness(convnet, fmnist_batch, side):
    x, y = fmnist_batch
    beta = 0.3
    proj = SpectralProjector(convnet, rank=3, interval=10, side=side, sharpness=beta,
                             max_rows=10**6)
    ref = explicit_rows(convnet, x, side)
    G0 = one_step(convnet, proj, x, y)
    for name, m in convnet.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        E = proj.basis(name).double()
        G = G0[name].reshape(G0[name].shape[0], -1).double()
        W = m.weight.detach().reshape(m.weight.shape[0], -1).double()
        A = ref[name]
        lam1, tr = torch.linalg.eigvalsh(A.T @ A)[-1], (A * A).sum()
        e1 = E[:, 0:1]
        if side == "output":
            expected = E @ E.T @ G + beta * (lam1 / tr) * e1 @ e1.T @ W
        else:
            expected = G @ E @ E.T + beta * (lam1 / tr) * W @ e1 @ e1.T
        got = m.weight.grad.reshape(expected.shape).double()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_projection_without_sharpness_is_idempotent_on_grads(convnet, fmnist_batch):
    x, y = fmnist_batch
    proj = SpectralProjector(convnet, rank=3, interval=100, sharpness=0.0)
    one_step(convnet, proj, x, y)
    once = {n: p.grad.clone() for n, p in convnet.named_parameters()}
    proj.project_()  # project the already-projected gradient again
    for n, p in convnet.named_parameters():
        torch.testing.assert_close(p.grad, once[n], rtol=1e-5, atol=1e-7)


def test_refresh_happens_exactly_every_interval(convnet, fmnist_batch, monkeypatch):
    x, y = fmnist_batch
    calls = {"n": 0}
    real_bpi, real_eigh = projector_mod.block_power_iteration, projector_mod.top_eigh

    def count(fn):
        def wrapped(*a, **kw):
            calls["n"] += 1
            return fn(*a, **kw)
        return wrapped

    monkeypatch.setattr(projector_mod, "block_power_iteration", count(real_bpi))
    monkeypatch.setattr(projector_mod, "top_eigh", count(real_eigh))
    proj = SpectralProjector(convnet, rank=2, interval=3)
    n_layers = len(proj.layer_names())
    captured = []
    for step in range(10):
        convnet.zero_grad()
        F.cross_entropy(convnet(x[:32]), y[:32]).backward()
        captured.append(all(len(proj.layer_state(n).rows) > 0 for n in proj.layer_names()))
        assert not any(len(proj.layer_state(n).rows) > 0 for n in proj.layer_names()) or \
            step % 3 == 0, f"activations captured on non-refresh step {step}"
        proj.project_()
    assert captured == [s % 3 == 0 for s in range(10)]
    assert calls["n"] == 4 * n_layers  # steps 0, 3, 6, 9
    assert proj.num_refreshes() == 4 * n_layers


def test_eval_and_no_grad_forwards_capture_nothing(convnet, fmnist_batch):
    x, _ = fmnist_batch
    proj = SpectralProjector(convnet, rank=2, interval=1)
    with torch.no_grad():
        convnet(x)
    convnet.eval()
    convnet(x)
    assert all(not proj.layer_state(n).rows for n in proj.layer_names())


def test_hooks_are_removable(convnet, fmnist_batch):
    proj = SpectralProjector(convnet, rank=2, interval=1)
    proj.remove()
    convnet(fmnist_batch[0])
    assert all(not proj.layer_state(n).rows for n in proj.layer_names())


def test_layers_selects_named_modules_only(convnet, fmnist_batch):
    x, y = fmnist_batch
    proj = SpectralProjector(convnet, rank=2, layers=["fc1"])
    assert proj.layer_names() == ["fc1"]
    G = one_step(convnet, proj, x, y)
    torch.testing.assert_close(convnet.conv.weight.grad, G["conv"])  # untouched
    assert not torch.allclose(convnet.fc1.weight.grad, G["fc1"])


def test_rank_is_clipped_to_layer_width(convnet, fmnist_batch):
    x, y = fmnist_batch
    proj = SpectralProjector(convnet, rank=50, interval=1, sharpness=0.0)
    G = one_step(convnet, proj, x, y)
    assert proj.basis("conv").shape == (6, 6)
    # a full-rank basis on the output side leaves the gradient unchanged
    torch.testing.assert_close(convnet.conv.weight.grad, G["conv"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"rank": 0}, "rank"), ({"rank": -3}, "rank"), ({"interval": 0}, "interval"),
     ({"side": "left"}, "side"), ({"layers": ["nope"]}, "nope"), ({"layers": ["pool"]}, "pool"),
     ({"power_iters": 0}, "power_iters"), ({"sharpness": -1.0}, "sharpness"),
     ({"max_rows": 0}, "max_rows"), ({"rank": 2.5}, "rank")],
)
def test_bad_arguments_raise_named_errors(convnet, kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpectralProjector(convnet, **kwargs)


def test_model_without_supported_layers_raises():
    with pytest.raises(ValueError, match="no weight DSBP can project"):
        SpectralProjector(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))


def test_nonfinite_activations_keep_old_basis_and_warn(convnet, fmnist_batch):
    x, y = fmnist_batch
    proj = SpectralProjector(convnet, rank=2, interval=1, sharpness=0.0)
    one_step(convnet, proj, x, y)
    old = {n: proj.basis(n).clone() for n in proj.layer_names()}
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    convnet.zero_grad()
    out = convnet(bad)
    F.cross_entropy(out[1:], y[1:]).backward()  # the NaN sample's loss is left out
    with pytest.warns(RuntimeWarning, match="non-finite"):
        proj.project_()
    for n in proj.layer_names():
        assert torch.equal(proj.basis(n), old[n])


def test_nonfinite_gradient_skips_refresh(convnet, fmnist_batch):
    x, y = fmnist_batch
    proj = SpectralProjector(convnet, rank=2, interval=1, sharpness=0.0)
    one_step(convnet, proj, x, y)
    before = proj.num_refreshes("fc2")
    old = proj.basis("fc2").clone()
    convnet.zero_grad()
    F.cross_entropy(convnet(x), y).backward()
    convnet.fc2.weight.grad[0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        proj.project_()
    assert proj.num_refreshes("fc2") == before
    assert torch.equal(proj.basis("fc2"), old)


def test_missing_capture_warns_instead_of_failing(convnet, fmnist_batch):
    x, y = fmnist_batch
    proj = SpectralProjector(convnet, rank=2, interval=1)
    loss = F.cross_entropy(convnet(x), y)
    for n in proj.layer_names():  # simulate a refresh step whose rows were dropped
        proj.layer_state(n).rows.clear()
    loss.backward()
    with pytest.warns(RuntimeWarning, match="no activations"):
        proj.project_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one_step(convnet, proj, x, y)  # next step captures and refreshes normally
    assert proj.num_refreshes() == len(proj.layer_names())


def test_refresh_now_computes_bases_without_projecting_or_stepping(convnet, fmnist_batch):
    x, _ = fmnist_batch
    proj = SpectralProjector(convnet, rank=3, max_rows=10**6, eig_dtype=torch.float64)
    ref = explicit_rows(convnet, x, "output")
    convnet(x)  # no backward: no gradients at all
    proj.refresh_now()
    assert proj.step == 0
    assert all(p.grad is None for p in convnet.parameters())
    for name, A in ref.items():
        top = torch.linalg.eigh(A.T @ A)[1][:, -3:]
        assert principal_angles(proj.basis(name), top).max().item() < 1e-6
