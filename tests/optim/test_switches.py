"""The accuracy switches of the projector (residual, rescale, warmup, energy rank, exclusion)
against closed forms, on both sides and on both the fast and the reference path."""

import pytest
import torch
import torch.nn.functional as F
from optim_models import ConvNet
from torch import nn

from dsbp import SpectralProjector


class Twin(nn.Module):
    """Two same-shaped Linear layers, so the batched (stacked) fast path is exercised."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(20, 20), nn.Linear(20, 20), nn.Linear(20, 5)

    def forward(self, x):
        return self.out(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _grads(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return {n: m.weight.grad.detach().clone().reshape(m.weight.shape[0], -1)
            for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


@pytest.mark.parametrize("side", ["output", "input"])
@pytest.mark.parametrize("path", ["stacked", "loop"])
@pytest.mark.parametrize("residual,rescale", [(0.3, False), (0.0, True), (0.25, True)])
def test_residual_and_rescale_closed_form(side, path, residual, rescale):
    torch.manual_seed(0)
    model = Twin()
    x, y = torch.randn(64, 20), torch.randint(0, 5, (64,))
    beta = 0.2
    proj = SpectralProjector(model, rank=3, interval=50, side=side, sharpness=beta,
                             residual=residual, rescale=rescale, eig_dtype=torch.float64,
                             path=path)
    G = _grads(model, x, y)
    proj.project_()
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        E = proj.basis(name)
        P = E @ E.T
        g = G[name].double()
        W = m.weight.detach().double()
        pg = P @ g if side == "output" else g @ P
        c = min(g.norm() / pg.norm(), 10.0) if rescale else 1.0
        st = proj.layer_state(name)
        e1 = E[:, :1]
        S = (e1 @ e1.T @ W) if side == "output" else (W @ e1 @ e1.T)
        expected = residual * g + (1 - residual) * c * pg + beta * st.eigenvalues[0] / st.trace * S
        torch.testing.assert_close(m.weight.grad.double(), expected, rtol=1e-5, atol=1e-7)


def test_rescale_keeps_the_gradient_norm():
    torch.manual_seed(1)
    model = Twin()
    x, y = torch.randn(64, 20), torch.randint(0, 5, (64,))
    proj = SpectralProjector(model, rank=4, sharpness=0.0, rescale=True)
    G = _grads(model, x, y)
    proj.project_()
    for name in proj.layer_names():
        m = proj.layer_state(name).module
        assert m.weight.grad.norm().item() == pytest.approx(G[name].norm().item(), rel=1e-5)


def test_warmup_leaves_gradients_but_refreshes_bases(fmnist_batch):
    x, y = fmnist_batch
    torch.manual_seed(0)
    model = ConvNet()
    proj = SpectralProjector(model, rank=2, interval=2, warmup=3)
    for step in range(5):
        G = _grads(model, x[:32], y[:32])
        proj.project_()
        changed = any(not torch.equal(proj.layer_state(n).module.weight.grad.reshape(G[n].shape),
                                      G[n]) for n in proj.layer_names())
        assert changed == (step >= 3), step
    assert proj.num_refreshes("fc1") == 3  # steps 0, 2, 4, warm-up or not


def test_energy_rank_is_smallest_r_reaching_the_target(fmnist_batch):
    x, y = fmnist_batch
    torch.manual_seed(0)
    model = ConvNet()
    tau = 0.9
    proj = SpectralProjector(model, rank=20, interval=10, energy=tau, max_rows=10**6,
                             eig_dtype=torch.float64)
    rows = {}

    def keep(m, i, o):
        rows["fc1"] = o.detach()

    hook = model.fc1.register_forward_hook(keep)
    _grads(model, x, y)
    hook.remove()
    proj.project_()
    A = rows["fc1"].double()
    lam = torch.linalg.eigvalsh(A.T @ A).flip(0)
    frac = torch.cumsum(lam, 0) / lam.sum()
    r = int((frac < tau - 1e-12).sum()) + 1  # the smallest r with frac[r-1] >= tau
    assert proj.basis("fc1").shape[1] == min(r, 20)
    assert proj.layer_state("fc1").k_active == min(r, 20)


def test_exclude_and_skip_first_last():
    model = ConvNet()
    assert SpectralProjector(model, skip_first_last=True).layer_names() == ["fc1"]
    assert SpectralProjector(model, exclude=["fc2"]).layer_names() == ["conv", "fc1"]
    with pytest.raises(ValueError, match="exclude"):
        SpectralProjector(model, exclude=["nope"])
    with pytest.raises(ValueError, match="excluded"):
        SpectralProjector(model, exclude=["conv", "fc1", "fc2"])


@pytest.mark.parametrize("kwargs,match", [({"residual": 1.5}, "residual"),
                                          ({"warmup": -1}, "warmup"),
                                          ({"energy": 0.0}, "energy"),
                                          ({"max_rescale": 0.5}, "max_rescale")])
def test_bad_switch_values_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpectralProjector(ConvNet(), **kwargs)
