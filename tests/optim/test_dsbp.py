"""DSBP as a torch.optim drop-in: resume, schedulers, AMP, accumulation, per-group settings."""

import io

import pytest
import torch
import torch.nn.functional as F
from optim_models import ConvNet
from torch import nn

from dsbp import DSBP, SpectralProjector


def batches(x, y, n, bs=32):
    for i in range(n):
        j = (i * bs) % (len(x) - bs)
        yield x[j:j + bs], y[j:j + bs]


def make(seed=0, **kw):
    torch.manual_seed(seed)
    model = ConvNet()
    opt = DSBP(model, torch.optim.SGD, rank=3, interval=4, lr=0.05, momentum=0.9, **kw)
    return model, opt


def train(model, opt, data):
    for xb, yb in data:
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()


def test_is_an_optimizer_sharing_base_param_groups():
    model, opt = make()
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is opt.base_optimizer.param_groups
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step()  # no grads yet: a no-op step keeps schedulers from warning
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.025)


def test_step_equals_projector_then_base(fmnist_batch):
    x, y = fmnist_batch
    m1, opt = make()
    m2 = ConvNet()
    m2.load_state_dict(m1.state_dict())
    proj = SpectralProjector(m2, rank=3, interval=4)
    base = torch.optim.SGD(m2.parameters(), lr=0.05, momentum=0.9)
    for xb, yb in batches(x, y, 6):
        for m, o in ((m1, opt), (m2, base)):
            o.zero_grad()
            F.cross_entropy(m(xb), yb).backward()
            if o is base:
                proj.project_()
            o.step()
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_resume_is_bit_identical(fmnist_batch, tmp_path):
    x, y = fmnist_batch
    data = list(batches(x, y, 11))
    ref_model, ref_opt = make()
    train(ref_model, ref_opt, data)

    model, opt = make()
    train(model, opt, data[:6])  # stop mid-interval (refreshes at 0, 4, 8)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    del model, opt
    model, opt = make(seed=123)  # a different init: everything must come from the checkpoint
    ck = torch.load(path, weights_only=True)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    train(model, opt, data[6:])
    for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(a, b)
    for n in opt.projector.layer_names():
        assert torch.equal(opt.projector.basis(n), ref_opt.projector.basis(n))


def test_load_state_dict_rejects_foreign_state():
    _, opt = make()
    with pytest.raises(ValueError, match="DSBP state dict"):
        opt.load_state_dict(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1).state_dict())


def test_per_group_overrides_reach_the_projector(fmnist_batch):
    x, y = fmnist_batch
    torch.manual_seed(0)
    model = ConvNet()
    fc1 = [model.fc1.weight, model.fc1.bias]
    rest = [p for p in model.parameters() if all(p is not q for q in fc1)]
    opt = DSBP(model, torch.optim.SGD, rank=3, interval=4, lr=0.1,
               params=[{"params": rest}, {"params": fc1, "rank": 7, "sharpness": 0.0}])
    train(model, opt, batches(x, y, 1))
    assert opt.projector.basis("fc1").shape[1] == 7
    assert opt.projector.basis("fc2").shape[1] == 3
    assert opt.projector.layer_state("fc1").sharpness == 0.0
    opt.param_groups[1]["rank"] = 2  # changes are re-read every step, used at the next refresh
    train(model, opt, batches(x, y, 4))
    assert opt.projector.basis("fc1").shape[1] == 2


def test_base_optimizer_instance_is_rejected():
    model = ConvNet()
    with pytest.raises(TypeError, match="class"):
        DSBP(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_autocast_bf16_cpu(fmnist_batch):
    x, y = fmnist_batch
    model, opt = make()
    for xb, yb in batches(x, y, 5):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    for n in opt.projector.layer_names():
        E = opt.projector.basis(n)
        assert E.dtype == torch.float32  # eigensolve ran in fp32 despite bf16 activations
        torch.testing.assert_close(E.T @ E, torch.eye(E.shape[1]), atol=1e-5, rtol=0)


def test_gradscaler_unscales_before_the_sharpness_term(fmnist_batch):
    # A power-of-two loss scale is exact in floating point, so the scaled run must match the
    # unscaled one bit for bit -- which fails if the sharpness term is added to scaled grads.
    x, y = fmnist_batch
    data = list(batches(x, y, 6))
    m_ref, o_ref = make(sharpness=0.5)
    train(m_ref, o_ref, data)
    m, o = make(sharpness=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=10**6)
    for xb, yb in data:
        o.zero_grad()
        scaler.scale(F.cross_entropy(m(xb), yb)).backward()
        scaler.step(o)
        scaler.update()
    for a, b in zip(m.parameters(), m_ref.parameters(), strict=True):
        assert torch.equal(a, b)


def test_gradient_accumulation_matches_one_big_batch(fmnist_batch):
    x, y = fmnist_batch
    xb, yb = x[:64], y[:64]
    m1, o1 = make(max_rows=10**6, projector_kwargs={"eig_dtype": torch.float64})
    m2, o2 = make(max_rows=10**6, projector_kwargs={"eig_dtype": torch.float64})
    o1.zero_grad()
    F.cross_entropy(m1(xb), yb).backward()
    o1.step()
    o2.zero_grad()
    for i in range(4):  # 4 micro-batches of 16, loss scaled by 1/4
        (F.cross_entropy(m2(xb[16 * i:16 * i + 16]), yb[16 * i:16 * i + 16]) / 4).backward()
    o2.step()
    for n in o1.projector.layer_names():
        E1, E2 = o1.projector.basis(n), o2.projector.basis(n)
        torch.testing.assert_close(E1 @ E1.T, E2 @ E2.T, atol=1e-6, rtol=0)
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_state_dict_loads_with_weights_only(fmnist_batch):
    x, y = fmnist_batch
    model, opt = make()
    train(model, opt, batches(x, y, 2))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert sd["projector"]["step"] == 2
    assert set(sd["projector"]["layers"]) == set(opt.projector.layer_names())
