"""Every execution path of the projection against the reference per-weight loop.

``SpectralProjector(path=...)`` picks how a step's projections run: ``"loop"`` (one weight at a
time, the reference and the CPU default), ``"stacked"`` (same-shaped weights in batched products,
batched warm refreshes) and, on a GPU, ``"graph"`` (stacked, replayed as a CUDA graph). All call
the one update function; they must produce the same gradients and the same trajectory (the
torch.optim foreach-vs-for-loop pattern).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsbp import DSBP, SpectralProjector


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one thread is faster, and immune to oversubscription on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Repeated(nn.Module):
    """Groups of same-shaped layers (3 convs 8->8, 2 Linear 32->32) plus singletons."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(3))
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc_in = nn.Linear(8 * 16, 32)
        self.fcs = nn.ModuleList(nn.Linear(32, 32) for _ in range(2))
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        for c in self.convs:
            h = torch.relu(c(h)) + h
        h = torch.relu(self.fc_in(self.pool(h).flatten(1)))
        for f in self.fcs:
            h = torch.relu(f(h))
        return self.out(h)


PATHS = ["stacked", "auto"] + (["graph"] if torch.cuda.is_available() else [])


def _pair(side, sharpness, path="stacked", ref_path="loop", **kw):
    torch.manual_seed(0)
    m_ref = Repeated()
    m_fast = copy.deepcopy(m_ref)
    kwargs = dict(rank=4, interval=2, side=side, sharpness=sharpness, **kw)
    p_ref = SpectralProjector(m_ref, path=ref_path, **kwargs)
    p_fast = SpectralProjector(m_fast, path=path, **kwargs)
    return (m_ref, p_ref), (m_fast, p_fast)


@pytest.mark.parametrize("side", ["output", "input"])
@pytest.mark.parametrize("sharpness", [0.0, 0.5])
@pytest.mark.parametrize("residual,rescale", [(0.0, False), (0.3, True)])
@pytest.mark.parametrize("path", PATHS)
def test_every_path_equals_reference_loop(fmnist_batch, side, sharpness, residual, rescale,
                                          path):
    x, y = fmnist_batch
    (m_ref, p_ref), (m_fast, p_fast) = _pair(side, sharpness, path, residual=residual,
                                             rescale=rescale)
    if path == "graph":
        x, y = x.cuda(), y.cuda()
        m_ref.cuda(), m_fast.cuda()
    for step in range(3):  # step 0 and 2 refresh, step 1 uses the cached stacked basis
        xb, yb = x[32 * step: 32 * step + 32], y[32 * step: 32 * step + 32]
        # same weights and bases in both arms, so only the projection itself is compared
        m_fast.load_state_dict(m_ref.state_dict())
        if step:
            p_fast.load_state_dict(p_ref.state_dict())
        for m, p in ((m_ref, p_ref), (m_fast, p_fast)):
            m.zero_grad()
            F.cross_entropy(m(xb), yb).backward()
            p.project_()
        for (n, a), (_, b) in zip(m_ref.named_parameters(), m_fast.named_parameters(),
                                  strict=True):
            assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), (n, step)
        # not trivially equal: the projection changed the gradient's rank
        E = p_ref.basis("fcs.0")
        if residual == 0.0:
            assert torch.linalg.matrix_rank(m_fast.fcs[0].weight.grad) <= 4 + (sharpness > 0)
        assert m_fast.fcs[0].weight.grad.abs().sum() > 0
        assert E.shape == (32, 4)
        with torch.no_grad():
            for a in m_ref.parameters():
                a.sub_(0.1 * a.grad)
    # the stacked branch ran exactly on the stacked paths (auto is the loop on a CPU)
    assert (len(p_fast._stack_cache) >= 2) == (path == "stacked")


def test_fast_path_matches_closed_form_on_a_group(fmnist_batch):
    """Independent answer: E E^T G + beta * lam1/tr * e1 e1^T W for each layer of a group."""
    x, y = fmnist_batch
    torch.manual_seed(1)
    m = Repeated()
    p = SpectralProjector(m, rank=3, interval=5, sharpness=0.3, path="stacked")
    F.cross_entropy(m(x[:64]), y[:64]).backward()
    raw = {n: mod.weight.grad.clone() for n, mod in m.named_modules()
           if isinstance(mod, (nn.Linear, nn.Conv2d))}
    p.project_()
    for name in ("convs.0", "convs.1", "convs.2", "fcs.0", "fcs.1"):
        mod = dict(m.named_modules())[name]
        E = p.basis(name).double()
        st = p.layer_state(name)
        G = raw[name].reshape(raw[name].shape[0], -1).double()
        W = mod.weight.detach().reshape(G.shape).double()
        lam = (st.eigenvalues[0] / st.trace).double()
        want = E @ (E.T @ G) + 0.3 * lam * torch.outer(E[:, 0], E[:, 0] @ W)
        got = mod.weight.grad.reshape(G.shape).double()
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), name


def test_dsbp_training_trajectory_matches_reference(fmnist_batch):
    """Ten DSBP(SGD, momentum) steps with refreshes: fast and reference weights agree."""
    x, y = fmnist_batch
    torch.manual_seed(2)
    m_ref = Repeated()
    m_fast = copy.deepcopy(m_ref)
    o_ref = DSBP(m_ref, torch.optim.SGD, rank=4, interval=3, lr=0.05, momentum=0.9,
                 path="loop")
    o_fast = DSBP(m_fast, torch.optim.SGD, rank=4, interval=3, lr=0.05, momentum=0.9,
                  path="stacked")
    for step in range(10):
        xb, yb = x[(12 * step) % 96:][:32], y[(12 * step) % 96:][:32]
        for m, o in ((m_ref, o_ref), (m_fast, o_fast)):
            o.zero_grad()
            F.cross_entropy(m(xb), yb).backward()
            o.step()
    for a, b in zip(m_ref.parameters(), m_fast.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert not torch.equal(m_fast.out.weight, Repeated().out.weight)


def test_channels_last_and_missing_grads(fmnist_batch):
    """Non-contiguous (channels_last) conv grads and a layer without grad take the copy path."""
    x, y = fmnist_batch
    (m_ref, p_ref), (m_fast, p_fast) = _pair("output", 0.1)
    for m, p in ((m_ref, p_ref), (m_fast, p_fast)):
        m.to(memory_format=torch.channels_last)
        m.fcs[1].weight.requires_grad_(False)
        F.cross_entropy(m(x[:32].contiguous(memory_format=torch.channels_last)), y[:32]).backward()
        p.project_()
    assert m_fast.fcs[1].weight.grad is None
    for a, b in zip(m_ref.parameters(), m_fast.parameters(), strict=True):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_float64_bases(fmnist_batch):
    x, y = fmnist_batch
    (m_ref, p_ref), (m_fast, p_fast) = _pair("input", 0.1, eig_dtype=torch.float64)
    for m, p in ((m_ref, p_ref), (m_fast, p_fast)):
        F.cross_entropy(m(x[:32]), y[:32]).backward()
        p.project_()
    for a, b in zip(m_ref.parameters(), m_fast.parameters(), strict=True):
        assert a.grad.dtype == torch.float32
        assert torch.allclose(a.grad, b.grad, rtol=1e-6, atol=1e-8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("side", ["output", "input"])
@pytest.mark.parametrize("graph", [True, False])
def test_cuda_stacked_path_matches_reference_loop(fmnist_batch, side, graph):
    """On a GPU the stacked (bmm) path is the default policy, replayed as a CUDA graph unless
    ``cuda_graph=False``; under bf16 autocast and channels_last both must give the reference
    loop's gradients, over three steps with two refreshes."""
    x, y = (t.cuda() for t in fmnist_batch)
    x = x.contiguous(memory_format=torch.channels_last)
    (m_ref, p_ref), (m_fast, p_fast) = _pair(side, 0.1, "graph" if graph else "stacked")
    for m in (m_ref, m_fast):
        m.cuda().to(memory_format=torch.channels_last)
    for step in range(3):
        xb, yb = x[32 * step: 32 * step + 32], y[32 * step: 32 * step + 32]
        m_fast.load_state_dict(m_ref.state_dict())
        if step:
            p_fast.load_state_dict(p_ref.state_dict())
        for m, p in ((m_ref, p_ref), (m_fast, p_fast)):
            m.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(m(xb), yb)
            loss.backward()
            p.project_()
        for (n, a), (_, b) in zip(m_ref.named_parameters(), m_fast.named_parameters(),
                                  strict=True):
            assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), (n, step)
        with torch.no_grad():
            for a in m_ref.parameters():
                a.sub_(0.1 * a.grad)
    if graph:
        assert p_fast._graph is not None and p_fast._graph_builds == 3  # new bases each step
    else:
        assert len(p_fast._stack_cache) >= 2  # the stacked path grouped weights


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("residual,rescale", [(0.0, False), (0.5, True)])
def test_cuda_graph_trajectory_matches_reference(fmnist_batch, residual, rescale):
    """Twelve DSBP(SGD) steps with refreshes every 4 steps: the graph is captured once and
    replayed, with the bases refilled after each refresh; weights agree with the loop's."""
    x, y = (t.cuda() for t in fmnist_batch)
    torch.manual_seed(3)
    m_ref = Repeated().cuda()
    m_fast = copy.deepcopy(m_ref)
    kw = dict(rank=4, interval=4, lr=0.05, momentum=0.9,
              residual=residual, rescale=rescale)
    o_ref = DSBP(m_ref, torch.optim.SGD, path="loop", **kw)
    o_fast = DSBP(m_fast, torch.optim.SGD, path="graph", **kw)
    for step in range(12):
        xb, yb = x[(12 * step) % 96:][:32], y[(12 * step) % 96:][:32]
        for m, o in ((m_ref, o_ref), (m_fast, o_fast)):
            o.zero_grad(set_to_none=True)
            F.cross_entropy(m(xb), yb).backward()
            o.step()
    assert o_fast.projector._graph_builds == 1
    assert o_fast.projector.num_refreshes("fcs.0") == 3
    # Twelve momentum steps amplify rounding differences (bmm vs mm, TF32 convolutions):
    # compare each tensor in relative norm; per-step gradients are compared tightly above.
    for a, b in zip(m_ref.parameters(), m_fast.parameters(), strict=True):
        assert torch.linalg.vector_norm(a - b) <= 1e-4 * torch.linalg.vector_norm(a)


def test_batched_refresh_equals_per_layer_refresh(fmnist_batch):
    """The GPU policy (warm-started layers of equal shapes refreshed in one stacked power
    iteration, one host sync for all health checks), forced on the CPU, gives the per-layer
    refresh's bases and eigenvalues."""
    x, y = fmnist_batch
    (m_ref, p_ref), (m_fast, p_fast) = _pair("output", 0.1, "stacked", power_iters=30)
    calls = []
    orig = p_fast._refresh_stacked
    p_fast._refresh_stacked = lambda warm: (calls.append(len(warm)), orig(warm))[1]
    for step in range(5):  # refreshes at steps 0 (cold: eigh), 2 and 4 (warm: batched)
        xb, yb = x[16 * step: 16 * step + 32], y[16 * step: 16 * step + 32]
        m_fast.load_state_dict(m_ref.state_dict())
        for m, p in ((m_ref, p_ref), (m_fast, p_fast)):
            m.zero_grad()
            F.cross_entropy(m(xb), yb).backward()
            p.project_()
    assert calls == [8, 8]  # all 8 layers warm at steps 2 and 4; the cold step 0 is eigh
    for name in p_ref.layer_names():
        a, b = p_ref.layer_state(name), p_fast.layer_state(name)
        assert a.refreshes == b.refreshes == 3
        k = a.k
        assert torch.allclose(a.eigenvalues[:k], b.eigenvalues[:k], rtol=1e-4, atol=1e-6)
        # same subspace: principal angles ~ 0 (signs may differ)
        overlap = torch.linalg.matrix_norm(a.block[:, :k].T @ b.block[:, :k]) ** 2 / k
        assert overlap > 1 - 1e-4, (name, float(overlap))


def test_stacked_basis_cache_follows_replaced_and_edited_bases(fmnist_batch):
    """The stacked-basis cache (and the CUDA graph's static buffers, which use the same tags)
    must see a basis that was replaced by a new tensor or edited in place without a refresh
    (as the Lie tracker does): the projection then equals the closed form with the new E."""
    x, y = fmnist_batch
    torch.manual_seed(4)
    m = Repeated()
    p = SpectralProjector(m, rank=3, interval=100, sharpness=0.0, path="stacked")
    F.cross_entropy(m(x[:32]), y[:32]).backward()
    p.project_()  # refresh + first stacked projection: the cache holds the first bases
    st = p.layer_state("convs.1")
    for edit in ("replace", "in_place"):
        Q, _ = torch.linalg.qr(torch.randn(st.block.shape, generator=torch.Generator()
                                           .manual_seed(len(edit))))
        if edit == "replace":
            st.block = Q.clone()
        else:
            st.block.copy_(Q)
        m.zero_grad()
        F.cross_entropy(m(x[32:64]), y[32:64]).backward()
        G = m.convs[1].weight.grad.reshape(8, -1).clone()
        p.project_()
        E = Q[:, : st.k]
        got = m.convs[1].weight.grad.reshape(8, -1)
        assert torch.allclose(got, E @ (E.T @ G), rtol=1e-5, atol=1e-6), edit
