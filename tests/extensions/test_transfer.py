"""Spectral transfer regularisation: penalty against its closed form, adapter properties."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsbp.extensions.transfer import (
    SpectralAdapter,
    SpectralTransferPenalty,
    activation_bases,
    apply_spectral_adapter,
    spectral_adapter_param_count,
    transfer_penalty,
)
from dsbp.models.cnn import SmallCNN


def _orth(d: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64)).Q


@pytest.mark.parametrize("side", ["output", "input"])
def test_penalty_matches_dense_closed_form_and_vanishes_inside_span(side):
    g = torch.Generator().manual_seed(0)
    d_out, d_in, k, mu = 7, 5, 3, 0.37
    W0 = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    d = d_out if side == "output" else d_in
    E = _orth(d, k, 1)
    P_perp = torch.eye(d, dtype=torch.float64) - E @ E.T  # the explicit d x d projector
    D = W - W0
    expected = mu * ((P_perp @ D) if side == "output" else (D @ P_perp)).pow(2).sum()
    torch.testing.assert_close(transfer_penalty(W, W0, E, mu, side), expected)

    M = torch.randn(k, d_in if side == "output" else d_out, generator=g, dtype=torch.float64)
    inside = W0 + (E @ M if side == "output" else M.T @ E.T)  # update in span(E_src)
    assert transfer_penalty(inside, W0, E, mu, side).abs() < 1e-24
    assert expected > 1e-3  # the generic update is charged


def test_penalty_conv_weight_viewed_as_matrix():
    g = torch.Generator().manual_seed(2)
    W0 = torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64)
    W = torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64)
    E = _orth(6, 2, 3)
    D = (W - W0).reshape(6, 18)
    expected = 2.0 * ((torch.eye(6, dtype=torch.float64) - E @ E.T) @ D).pow(2).sum()
    torch.testing.assert_close(transfer_penalty(W, W0, E, 2.0, "output"), expected)


@pytest.mark.parametrize("side", ["output", "input"])
def test_penalty_hook_gradient_equals_autograd_of_penalty(side):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    x = torch.randn(32, 6)
    bases = activation_bases(model, [x], rank=3, side=side)
    reg = SpectralTransferPenalty(model, bases, mu=0.5, side=side)
    with torch.no_grad():  # move away from W0 so the penalty is non-zero
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    reg.penalty().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    reg.add_grad_()
    assert set(want) == {"0.weight", "2.weight"}  # biases are not penalised
    for n, p in model.named_parameters():
        if n in want:
            torch.testing.assert_close(p.grad, want[n])
        else:
            assert p.grad is None


def test_penalty_attach_adds_gradient_before_step():
    torch.manual_seed(0)
    model = nn.Linear(5, 4, bias=False)
    E = _orth(4, 2, 0).float()
    net = nn.Sequential(model)
    reg = SpectralTransferPenalty(net, {"0": E}, mu=1.0)
    with torch.no_grad():
        model.weight.add_(torch.randn_like(model.weight))
    W_before = model.weight.detach().clone()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    handle = reg.attach(opt)
    model.weight.grad = torch.zeros_like(model.weight)
    opt.step()
    D = W_before - reg.W0["0"]
    expected = W_before - 0.1 * 2.0 * (D - E @ (E.T @ D))
    torch.testing.assert_close(model.weight.detach(), expected)
    handle.remove()


def test_activation_bases_are_eigh_of_output_covariance_and_leave_model_untouched():
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=3, width=4, hidden=6)
    x = torch.randn(5, 1, 12, 12)
    before = copy.deepcopy(model.state_dict())
    model.eval()
    bases = activation_bases(model, [x], rank=2, side="output")
    assert not model.training  # mode restored
    for k, v in model.state_dict().items():  # BatchNorm running stats restored
        assert torch.equal(v, before[k]), k
    # independent answer: conv1 outputs, one row per (sample, position), eigh of A^T A
    out = model.features[0](x).detach().permute(0, 2, 3, 1).reshape(-1, 4).double()
    evals, vecs = torch.linalg.eigh(out.T @ out)
    E_ref = vecs[:, -2:]
    E = bases["features.0"].double()
    assert E.shape == (4, 2)
    # same span: projector onto it agrees
    torch.testing.assert_close(E @ E.T, E_ref @ E_ref.T, atol=1e-4, rtol=0)
    assert bases["head.3"].shape == (3, 2)


@pytest.mark.parametrize("side", ["output", "input"])
def test_adapter_linear_identity_at_init_param_count_and_merged_weight(side):
    torch.manual_seed(0)
    base = nn.Linear(9, 6)
    k = 4
    E = _orth(6 if side == "output" else 9, k, 0).float()
    ad = SpectralAdapter(copy.deepcopy(base), E, side)
    x = torch.randn(11, 9)
    torch.testing.assert_close(ad(x), base(x), rtol=0, atol=0)
    n_train = sum(p.numel() for p in ad.parameters() if p.requires_grad)
    assert n_train == k * (9 if side == "output" else 6)
    with torch.no_grad():
        ad.K.normal_()
    W = base.weight + (E @ ad.K if side == "output" else ad.K @ E.T)  # W0 + E K by hand
    torch.testing.assert_close(ad(x), F.linear(x, W, base.bias), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side", ["output", "input"])
def test_adapter_conv_matches_conv_with_merged_weight(side):
    torch.manual_seed(0)
    base = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    d = 5 if side == "output" else 27
    E = _orth(d, 2, 1).float()
    ad = SpectralAdapter(copy.deepcopy(base), E, side)
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(ad(x), base(x), rtol=0, atol=0)
    with torch.no_grad():
        ad.K.normal_()
    D = (E @ ad.K) if side == "output" else (ad.K @ E.T)  # (5, 27)
    ref = F.conv2d(x, base.weight + D.view(5, 3, 3, 3), base.bias, stride=2, padding=1)
    torch.testing.assert_close(ad(x), ref, atol=1e-5, rtol=1e-5)
    assert ad.K.numel() == 2 * (27 if side == "output" else 5)


def test_adapter_gradient_reaches_only_K_and_update_stays_in_span():
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=3, width=4, hidden=6)
    x, y = torch.randn(6, 1, 12, 12), torch.randint(0, 3, (6,))
    bases = activation_bases(model, [x], rank=2)
    bases.pop("head.3")  # the head trains in full, as a new task's classifier would
    W0 = {n: m.weight.detach().clone() for n, m in model.named_modules()
          if isinstance(m, (nn.Linear, nn.Conv2d))}
    apply_spectral_adapter(model, bases, trainable=("head.3",))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.K" for n in bases} | {"head.3.weight", "head.3.bias"}
    assert sum(model.get_parameter(n).numel() for n in trainable if n.endswith(".K")) == \
        spectral_adapter_param_count(SmallCNN(1, 3, 4, 6), 2, layers=list(bases))
    assert all("E" not in dict(m.named_parameters()) for m in model.modules())
    F.cross_entropy(model(x), y).backward()
    for n, p in model.named_parameters():
        if n in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    opt.step()
    for n, E in bases.items():
        ad = model.get_submodule(n)
        torch.testing.assert_close(ad.base.weight, W0[n], rtol=0, atol=0)  # frozen
        delta = (ad.merged_weight() - W0[n]).reshape(E.shape[0], -1).detach()
        assert delta.abs().sum() > 0
        torch.testing.assert_close(delta - E @ (E.T @ delta), torch.zeros_like(delta),
                                   atol=1e-6, rtol=0)  # in span(E_src): zero penalty
        assert transfer_penalty(ad.merged_weight(), W0[n], E, 1.0).item() < 1e-10


def test_bad_input_errors():
    with pytest.raises(ValueError, match="basis E"):
        SpectralAdapter(nn.Linear(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="groups"):
        SpectralAdapter(nn.Conv2d(4, 4, 3, groups=2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="side"):
        transfer_penalty(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3, 1), 1.0, "left")
    with pytest.raises(ValueError, match="mu"):
        SpectralTransferPenalty(nn.Sequential(nn.Linear(2, 3)), {}, mu=-1.0)
    with pytest.raises(ValueError, match="not a Linear/Conv2d"):
        SpectralTransferPenalty(nn.Sequential(nn.Linear(2, 3)), {"5": torch.zeros(3, 1)}, mu=1.0)
    with pytest.raises(ValueError, match="batch"):
        activation_bases(nn.Sequential(nn.Linear(2, 3)), [], rank=1)
