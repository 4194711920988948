"""Alignment diagnostics against direct computations on a tiny MLP with a SpectralProjector."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsbp import SpectralProjector
from dsbp.diagnostics.alignment import (
    AlignmentTracker,
    gradient_energy_kept,
    hessian_basis_overlap,
)


def _refresh(model, proj, batches):
    model.train()
    for x, y in batches:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        proj.project_()


def _setup(helpers, rank=2, side="output"):
    model, batches = helpers.tiny_mlp(), helpers.tiny_batches(sizes=(12,))
    proj = SpectralProjector(model, rank=rank, interval=1, side=side, sharpness=0.0)
    _refresh(model, proj, batches)
    return model, batches, proj


def test_energy_kept_matches_direct_projection(helpers):
    model, batches, proj = _setup(helpers, rank=2)
    got = gradient_energy_kept(model, F.cross_entropy, batches, proj)
    assert set(got) == {"0", "2"}
    model.eval()
    x, y = batches[0]
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), [model[0].weight, model[2].weight])
    for name, G in zip(["0", "2"], grads, strict=True):
        E = proj.basis(name).double()
        expected = torch.linalg.norm(E @ E.T @ G) / torch.linalg.norm(G)
        assert abs(got[name] - expected.item()) < 1e-9
        assert 0.0 < got[name] < 1.0
    # Full rank on the output side keeps everything.
    model, batches, proj = _setup(helpers, rank=5)
    full = gradient_energy_kept(model, F.cross_entropy, batches, proj, ["0"])["0"]
    assert abs(full - 1) < 1e-6  # the basis is fp32


def test_hessian_overlap_against_exact_block(helpers):
    for side in ("output", "input"):
        model, batches, proj = _setup(helpers, rank=2, side=side)
        H = helpers.exact_hessian(model, batches, ["0.weight"])  # (20, 20)
        vals, vecs = torch.linalg.eigh(H)
        top = vecs[:, -3:]
        E = proj.basis("0").double()
        cos2 = []
        for i in range(3):
            M = top[:, i].reshape(5, 4)
            P = E @ E.T @ M if side == "output" else M @ E @ E.T
            cos2.append((P.norm() ** 2).item())
        r = hessian_basis_overlap(model, F.cross_entropy, batches, proj, "0", k=3, iters=20,
                                  generator=torch.Generator().manual_seed(0))
        assert abs(r["overlap"] - sum(cos2) / 3) < 1e-6
        assert abs(r["top_eigenvalue"] - vals[-1].item()) < 1e-8
        assert r["chance"] == 2 / (5 if side == "output" else 4)


def test_tracker_logs_drift_between_refreshes(helpers):
    model, batches, proj = _setup(helpers, rank=2)
    tracker = AlignmentTracker(proj, hessian_k=1, hessian_iters=10)
    first = tracker(model, F.cross_entropy, batches)
    assert "drift/mean" not in first and "energy_kept/mean" in first
    assert {"hessian_overlap/0", "hessian_chance/2", "hessian_top/0"} <= set(first)
    E_old = proj.basis("0").double().clone()
    other = helpers.tiny_batches(seed=5, sizes=(12,))
    _refresh(model, proj, other)
    second = tracker(model, F.cross_entropy, batches)
    E_new = proj.basis("0").double()
    expected = (1 - (E_old.T @ E_new).pow(2).sum() / 2).clamp(min=0).sqrt().item()
    assert abs(second["drift/0"] - expected) < 1e-9
    assert second["refreshes/0"] == 1.0
    assert all(isinstance(v, float) for v in second.values())
