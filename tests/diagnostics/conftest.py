"""Shared fixtures: a quadratic "model" with a known Hessian, a tiny MLP, the exact Hessian."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian


class QuadraticModel(nn.Module):
    """loss(W) = 0.5 (w - c)^T A (w - c) with w = vec(W), W the weight of a bias-free Linear.

    The forward ignores x and returns w; ``quadratic_loss(A)`` is the matching loss_fn, with the
    centre c passed as the batch's target. Hessian = A exactly.
    """

    def __init__(self, d_out: int, d_in: int):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out, bias=False).double()

    def forward(self, x):
        return self.lin.weight.reshape(-1)


def quadratic_loss(A: torch.Tensor):
    def loss(out, c):
        r = out - c
        return 0.5 * r @ (A @ r)

    return loss


def known_spectrum(eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = eigs.numel()
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return U @ torch.diag(eigs.double()) @ U.T


def tiny_mlp(seed: int = 0, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(4, 5)]
    if bn:
        layers.append(nn.BatchNorm1d(5))
    layers += [nn.Tanh(), nn.Linear(5, 3)]
    return nn.Sequential(*layers).double()


def tiny_batches(seed: int = 1, sizes=(8, 4)):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 4, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (n,), generator=g)) for n in sizes]


def exact_hessian(model: nn.Module, batches, names: list[str]) -> torch.Tensor:
    """Exact Hessian (dim, dim) of the sample-weighted mean cross-entropy over ``names``."""
    was = model.training
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

    H = hessian(loss)(torch.cat([base[n].reshape(-1) for n in names]))
    model.train(was)
    return H


@pytest.fixture
def helpers():
    class H:
        pass

    h = H()
    h.QuadraticModel = QuadraticModel
    h.quadratic_loss = quadratic_loss
    h.known_spectrum = known_spectrum
    h.tiny_mlp = tiny_mlp
    h.tiny_batches = tiny_batches
    h.exact_hessian = exact_hessian
    return h
