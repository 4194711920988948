"""Hessian-vector products against the exact Hessian from torch.func."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian

from dsbp.diagnostics.hvp import flat_params, make_grad, make_hvp, named_selected_params


def _mlp(seed: int = 0, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(4, 5)]
    if bn:
        layers.append(nn.BatchNorm1d(5))
    layers += [nn.Tanh(), nn.Linear(5, 3)]
    return nn.Sequential(*layers).double()


def _batches(seed: int = 1, sizes=(8, 4)):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 4, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (n,), generator=g)) for n in sizes]


def exact_hessian(model: nn.Module, batches, names: list[str]) -> torch.Tensor:
    """Exact Hessian (dim, dim) of the sample-weighted mean loss over ``names``, eval mode."""
    model.eval()
    base = {n: p.detach() for n, p in model.named_parameters()}
    shapes = [base[n].shape for n in names]
    sizes = [base[n].numel() for n in names]
    N = sum(len(y) for _, y in batches)

    def loss(flat):
        ps = dict(base)
        for n, c, s in zip(names, torch.split(flat, sizes), shapes, strict=True):
            ps[n] = c.view(s)
        return sum(len(y) / N * F.cross_entropy(functional_call(model, ps, (x,)), y)
                   for x, y in batches)

    flat = torch.cat([base[n].reshape(-1) for n in names])
    return hessian(loss)(flat)


def _dense(matvec, dim):
    return torch.stack([matvec(e) for e in torch.eye(dim, dtype=torch.float64)], dim=1)


def test_hvp_matches_exact_hessian_whole_model():
    model, batches = _mlp(), _batches()
    matvec, dim = make_hvp(model, F.cross_entropy, batches)
    names = [n for n, _ in model.named_parameters()]
    H = exact_hessian(model, batches, names)
    assert dim == H.shape[0] == flat_params(model).numel()
    torch.testing.assert_close(_dense(matvec, dim), H, atol=1e-10, rtol=1e-8)


def test_hvp_per_layer_block():
    model, batches = _mlp(), _batches()
    matvec, dim = make_hvp(model, F.cross_entropy, batches, params=["0.weight"])
    assert dim == 20
    H = exact_hessian(model, batches, ["0.weight"])
    torch.testing.assert_close(_dense(matvec, dim), H, atol=1e-10, rtol=1e-8)
    # Selecting by tensor and by submodule gives the same parameters.
    assert [n for n, _ in named_selected_params(model, [model[0].weight])] == ["0.weight"]
    assert [n for n, _ in named_selected_params(model, model[2])] == ["2.weight", "2.bias"]


def test_batchnorm_uses_running_stats_and_restores_mode():
    model, batches = _mlp(bn=True), _batches()
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    model.train()
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    matvec, dim = make_hvp(model, F.cross_entropy, batches)
    Hv = _dense(matvec, dim)
    assert model.training and bn.training  # mode restored
    torch.testing.assert_close(bn.running_mean, stats[0])  # stats not updated
    torch.testing.assert_close(bn.running_var, stats[1])
    assert bn.num_batches_tracked == stats[2]
    names = [n for n, _ in model.named_parameters()]
    H = exact_hessian(model, batches, names)  # eval-mode (running statistics) Hessian
    torch.testing.assert_close(Hv, H, atol=1e-10, rtol=1e-8)


def test_grad_matches_autograd():
    model, batches = _mlp(), _batches()
    g = make_grad(model, F.cross_entropy, batches)()
    N = sum(len(y) for _, y in batches)
    loss = sum(len(y) / N * F.cross_entropy(model(x), y) for x, y in batches)
    ref = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(model.parameters()))])
    torch.testing.assert_close(g, ref)


def test_bad_selection():
    model = _mlp()
    with pytest.raises(ValueError, match="unknown parameter"):
        make_hvp(model, F.cross_entropy, _batches(), params=["nope"])
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="do not require grad"):
        make_hvp(model, F.cross_entropy, _batches(), params=["0.weight"])
    with pytest.raises(ValueError, match="empty"):
        make_hvp(model, F.cross_entropy, [])
