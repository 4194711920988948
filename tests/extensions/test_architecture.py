"""Spectral factorisation and pruning: closed forms, full-rank reproduction, hand FLOP counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dsbp.extensions.architecture import (
    choose_ranks,
    count_flops,
    count_params,
    factorize,
    factorize_layer,
    leverage,
    output_spectra,
    prune,
    sequential_couplings,
)
from dsbp.models.cnn import SmallCNN


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _orth(d, r, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64)).Q


def test_factorised_linear_is_the_projected_layer():
    torch.manual_seed(0)
    lin = nn.Linear(12, 8).double()
    E = _orth(8, 3, 1)
    fac = factorize_layer(lin, E)
    assert fac[0].weight.shape == (3, 12) and fac[1].weight.shape == (8, 3)
    P = E @ E.T
    W = lin.weight.detach()
    assert torch.allclose(fac[1].weight @ fac[0].weight, P @ W, atol=1e-12)
    x = torch.randn(5, 12, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(fac(x), lin(x) @ P, atol=1e-12)  # E E^T (W x + b), P symmetric


def test_factorised_conv_is_the_channel_projected_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=True).double()
    E = _orth(6, 2, 2)
    fac = factorize_layer(conv, E)
    assert isinstance(fac[1], nn.Conv2d) and fac[1].kernel_size == (1, 1)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        ref = torch.einsum("ij,njhw->nihw", E @ E.T, conv(x))
        assert torch.allclose(fac(x), ref, atol=1e-12)
    with pytest.raises(ValueError, match="d_out"):
        factorize_layer(conv, _orth(5, 2, 3))


def test_threshold_one_reproduces_the_original_outputs():
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, width=4, hidden=16).eval()
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(16, 1, 28, 28, generator=g) for _ in range(2)]
    spectra = output_spectra(model, batches)
    ranks = choose_ranks(spectra, 1.0)
    assert ranks == {n: s.eigenvalues.numel() for n, s in spectra.items()}  # full rank
    new, info = factorize(model, spectra, 1.0, (1, 28, 28), min_saving=None)
    assert all(v["factorised"] for v in info.values())
    with torch.no_grad():
        assert torch.allclose(new(batches[0]), model(batches[0]), atol=1e-4, rtol=1e-4)
    # a lower threshold gives lower ranks and fewer FLOPs where it factorises
    low, info_low = factorize(model, spectra, 0.8, (1, 28, 28))
    assert all(v["rank"] <= ranks[n] for n, v in info_low.items())
    assert sum(v["flops_after"] for v in info_low.values()) <= sum(
        v["flops_before"] for v in info_low.values()
    )


def test_flop_count_matches_hand_count():
    w, h = 4, 16
    model = SmallCNN(in_channels=1, width=w, hidden=h)
    f = count_flops(model, (1, 28, 28))
    hand = {
        "features.0": 2 * w * 1 * 9 * 28 * 28,
        "features.4": 2 * (2 * w) * w * 9 * 14 * 14,
        "head.1": 2 * (2 * w * 16) * h,
        "head.3": 2 * h * 10,
    }
    assert {n: v["flops"] for n, v in f.items()} == hand
    # factorised conv at rank r: (C_in*9 -> r) conv plus (r -> C_out) 1x1 conv, same positions
    r = 2
    fac = factorize_layer(model.features[0], _orth(w, r, 0).float())
    model.features[0] = fac
    f2 = count_flops(model, (1, 28, 28))
    assert f2["features.0.0"]["flops"] == 2 * r * 9 * 784
    assert f2["features.0.1"]["flops"] == 2 * w * r * 784
    assert count_params(nn.Linear(3, 2)) == 8


def test_pruning_removes_the_lowest_leverage_units():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 5)).double()
    with torch.no_grad():  # make four units weak so the energy threshold drops some units
        net[0].weight[[1, 4, 7, 9]] *= 0.05
        net[0].bias[[1, 4, 7, 9]] *= 0.05
    g = torch.Generator().manual_seed(4)
    x = torch.randn(256, 10, generator=g, dtype=torch.float64)
    spectra = output_spectra(net, [x])
    tau = 0.95
    new, info = prune(net, spectra, tau, check_input=x)
    # Independent answer: eigh of the layer's output covariance, leverage of its top-r rows.
    with torch.no_grad():
        A = net[0](x)
    evals, vecs = torch.linalg.eigh(A.T @ A)
    evals, vecs = evals.flip(0), vecs.flip(1)
    r = int((torch.cumsum(evals, 0) / evals.sum() < tau).sum()) + 1
    lev = vecs[:, :r].pow(2).sum(1)
    expected = sorted(torch.argsort(lev, descending=True)[:r].tolist())
    assert info["0"]["rank"] == r < 12
    assert info["0"]["kept"] == expected
    dropped = sorted(set(range(12)) - set(expected))
    assert float(lev[dropped].max()) <= float(lev[expected].min())
    assert torch.allclose(leverage(spectra["0"].basis(r)), lev, atol=1e-8)
    # closed form: the pruned net equals the original with the dropped units' rows zeroed
    ref = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 5)).double()
    ref.load_state_dict(net.state_dict())
    with torch.no_grad():
        ref[0].weight[dropped] = 0
        ref[0].bias[dropped] = 0
        assert torch.allclose(new(x), ref(x), atol=1e-12)
    assert new[0].out_features == r and new[2].in_features == r


def test_pruning_a_cnn_with_batchnorm_and_flatten():
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, width=6, hidden=16).eval()
    cps = sequential_couplings(model)
    assert [(c.producer, c.norm, c.consumer, c.expand) for c in cps] == [
        ("features.0", "features.1", "features.4", 1),
        ("features.4", "features.5", "head.1", 16),
        ("head.1", None, "head.3", 1),
    ]
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    spectra = output_spectra(model, [x])
    new, info = prune(model, spectra, 0.8, check_input=x)  # raises if not the masked network
    assert count_params(new) < count_params(model)
    assert new.features[4].in_channels == len(info["features.0"]["kept"])
    assert new.head[1].in_features == 16 * len(info["features.4"]["kept"])


def test_centred_spectrum_is_the_covariance_of_centred_outputs():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5).double()
    g = torch.Generator().manual_seed(6)
    xs = [torch.randn(40, 6, generator=g, dtype=torch.float64) + 3.0 for _ in range(2)]
    with torch.no_grad():
        A = torch.cat([lin(x) for x in xs])
    for center, M in ((False, A), (True, A - A.mean(0))):
        s = output_spectra(lin, xs, center=center)[""]
        ref = torch.linalg.eigvalsh(M.T @ M).flip(0)
        # rows come through the fp32 adapter, hence the fp32 tolerance
        assert torch.allclose(s.eigenvalues, ref, rtol=1e-5, atol=1e-4), center
