"""Hessian-vector products against the exact Hessian from torch.func."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsbp.diagnostics.hvp import flat_params, make_grad, make_hvp, named_selected_params


def _dense(matvec, dim):
    return torch.stack([matvec(e) for e in torch.eye(dim, dtype=torch.float64)], dim=1)


def test_hvp_matches_exact_hessian_whole_model(helpers):
    model, batches = helpers.tiny_mlp(), helpers.tiny_batches()
    matvec, dim = make_hvp(model, F.cross_entropy, batches)
    names = [n for n, _ in model.named_parameters()]
    H = helpers.exact_hessian(model, batches, names)
    assert dim == H.shape[0] == flat_params(model).numel()
    torch.testing.assert_close(_dense(matvec, dim), H, atol=1e-10, rtol=1e-8)


def test_hvp_per_layer_block(helpers):
    model, batches = helpers.tiny_mlp(), helpers.tiny_batches()
    matvec, dim = make_hvp(model, F.cross_entropy, batches, params=["0.weight"])
    assert dim == 20
    H = helpers.exact_hessian(model, batches, ["0.weight"])
    torch.testing.assert_close(_dense(matvec, dim), H, atol=1e-10, rtol=1e-8)
    # Selecting by tensor and by submodule gives the same parameters.
    assert [n for n, _ in named_selected_params(model, [model[0].weight])] == ["0.weight"]
    assert [n for n, _ in named_selected_params(model, model[2])] == ["2.weight", "2.bias"]


def test_batchnorm_uses_running_stats_and_restores_mode(helpers):
    model, batches = helpers.tiny_mlp(bn=True), helpers.tiny_batches()
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
    H = helpers.exact_hessian(model, batches, names)  # eval-mode (running statistics) Hessian
    torch.testing.assert_close(Hv, H, atol=1e-10, rtol=1e-8)


def test_grad_matches_autograd(helpers):
    model, batches = helpers.tiny_mlp(), helpers.tiny_batches()
    g = make_grad(model, F.cross_entropy, batches)()
    N = sum(len(y) for _, y in batches)
    loss = sum(len(y) / N * F.cross_entropy(model(x), y) for x, y in batches)
    ref = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(model.parameters()))])
    torch.testing.assert_close(g, ref)


def test_bad_selection(helpers):
    model = helpers.tiny_mlp()
    with pytest.raises(ValueError, match="unknown parameter"):
        make_hvp(model, F.cross_entropy, helpers.tiny_batches(), params=["nope"])
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="do not require grad"):
        make_hvp(model, F.cross_entropy, helpers.tiny_batches(), params=["0.weight"])
    with pytest.raises(ValueError, match="empty"):
        make_hvp(model, F.cross_entropy, [])
