"""What DSBP projects on today's layers, checked against independent answers.

Each basis is compared with ``torch.linalg.eigh`` of the rows the layer really sees (computed
here from the layer's own inputs and outputs, not through the adapter), each projected gradient
with ``E E^T G``, and each unprojected weight with the plain base optimizer.
"""

from __future__ import annotations

import copy
import gc
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

from dsbp import DSBP, SpectralProjector
from dsbp.core.subspace import principal_angles


def _top(rows: torch.Tensor, k: int) -> torch.Tensor:
    rows = rows.double()
    _, vecs = torch.linalg.eigh(rows.T @ rows)
    return vecs.flip(1)[:, :k]


def _exact(model: nn.Module, k: int, **kw) -> SpectralProjector:
    """A projector whose first refresh is an exact eigh in float64 (no subsampling)."""
    kw = {"rank": k, "interval": 1, "sharpness": 0.0, "max_rows": 10**6,
          "eig_dtype": torch.float64, **kw}
    return SpectralProjector(model, **kw)


def _angle(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(principal_angles(a.double(), b.double()).max())


# ----------------------------------------------------------------------- MultiheadAttention
@pytest.mark.parametrize("side", ["output", "input"])
def test_mha_self_attention_bases_equal_eigh_of_its_rows(side):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(12, 3, batch_first=True)
    x = torch.randn(4, 7, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no per-step warning about out_proj
        p = _exact(mha, 3, side=side)
        out, _ = mha(x, x, x)
        out.sum().backward()
        p.project_()
    W, b = mha.in_proj_weight.detach(), mha.in_proj_bias.detach()
    rows_in = x.reshape(-1, 12) if side == "input" else F.linear(x, W, b).reshape(-1, 36)
    assert _angle(p.basis("in_proj_weight"),
                  _top(rows_in, 3)) < 1e-6
    if side == "output":  # out_proj: its rows are MHA's output (its own forward never runs)
        assert _angle(p.basis("out_proj"), _top(out.detach().reshape(-1, 12), 3)) < 1e-6
        assert p.num_refreshes("out_proj") == 1
    else:
        assert "out_proj" in p.skipped and "out_proj's input" in p.skipped["out_proj"]


def test_mha_cross_attention_output_rows_are_blocks_and_keyword_inputs_work():
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(8, 2)
    q, kv = torch.randn(5, 3, 8), torch.randn(6, 3, 8)
    p = _exact(mha, 4)
    out, _ = mha(query=q, key=kv, value=kv)  # keyword inputs reach the hooks
    out.sum().backward()
    p.project_()
    W, b = mha.in_proj_weight.detach(), mha.in_proj_bias.detach()
    blocks = []
    for i, x in enumerate((q, kv, kv)):
        y = F.linear(x, W[8 * i: 8 * i + 8], b[8 * i: 8 * i + 8]).reshape(-1, 8)
        full = torch.zeros(y.shape[0], 24)
        full[:, 8 * i: 8 * i + 8] = y
        blocks.append(full)
    assert _angle(p.basis("in_proj_weight"), _top(torch.cat(blocks), 4)) < 1e-6


def test_mha_separate_q_k_v_weights_use_their_own_inputs():
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(8, 2, kdim=5, vdim=6, batch_first=True)
    q, k, v = torch.randn(2, 4, 8), torch.randn(2, 3, 5), torch.randn(2, 3, 6)
    p = _exact(mha, 2, side="input")
    mha(q, k, v)[0].sum().backward()
    p.project_()
    for name, x in (("q_proj_weight", q), ("k_proj_weight", k), ("v_proj_weight", v)):
        assert _angle(p.basis(name), _top(x.reshape(-1, x.shape[-1]), 2)) < 1e-6, name


def test_transformer_encoder_layer_projects_every_matrix():
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    opt = DSBP(layer, rank=3, interval=1)
    assert set(opt.projector.layer_names()) == {
        "self_attn.in_proj_weight", "self_attn.out_proj", "linear1", "linear2"}
    layer(torch.randn(2, 5, 16)).sum().backward()
    opt.step()
    assert opt.projector.num_refreshes() == 4


# ----------------------------------------------------------------------- transformers GPT-2
def test_gpt2_conv1d_weights_are_projected_and_the_tied_embedding_is_reported():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=2000, n_positions=16, n_embd=32, n_layer=2,
                                  n_head=2, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    with pytest.warns(UserWarning, match="transformer.wte.*unprojected.*tied"):
        opt = DSBP(model, torch.optim.SGD, rank=4, interval=1, sharpness=0.0, lr=0.0,
                   max_rows=10**6, eig_dtype=torch.float64)
    names = opt.projector.layer_names()
    assert "transformer.h.0.attn.c_attn" in names and len(names) == 8  # 4 Conv1D per block
    summary = opt.summary()
    assert "transformer.wte" in summary and "tied" in summary and "lm_head" in summary
    c_attn = model.transformer.h[0].attn.c_attn
    seen = []
    h = c_attn.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    ids = torch.randint(0, 2000, (3, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    h.remove()
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    E = _top(torch.cat(seen).reshape(-1, 96), 4)  # c_attn's outputs: 3 * n_embd wide
    assert _angle(opt.projector.basis("transformer.h.0.attn.c_attn"), E) < 1e-6
    G = raw["transformer.h.0.attn.c_attn.weight"].double().T  # Conv1D stores (in, out)
    got = c_attn.weight.grad.double().T
    Eb = opt.projector.basis("transformer.h.0.attn.c_attn").double()
    torch.testing.assert_close(got, Eb @ (Eb.T @ G), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(model.transformer.wte.weight.grad,
                               raw["transformer.wte.weight"])  # tied: left as it was


# ----------------------------------------------------------------------- convolutions, Linear
def test_conv1d_both_sides_and_conv3d_output_side_equal_eigh():
    torch.manual_seed(3)
    c1 = nn.Conv1d(3, 5, 3, padding=1, stride=2)
    x = torch.randn(4, 3, 11)
    for side in ("output", "input"):
        c = copy.deepcopy(c1)
        p = _exact(c, 2, side=side)
        y = c(x)
        y.sum().backward()
        p.project_()
        rows = (y.detach().permute(0, 2, 1).reshape(-1, 5) if side == "output" else
                F.unfold(x.unsqueeze(2), (1, 3), padding=(0, 1), stride=(1, 2))
                .transpose(1, 2).reshape(-1, 9))
        assert _angle(p.basis(""), _top(rows, 2)) < 1e-6, side
    c3 = nn.Conv3d(2, 4, 2)
    p = _exact(c3, 2)
    y = c3(torch.randn(2, 2, 3, 3, 3))
    y.sum().backward()
    p.project_()
    assert _angle(p.basis(""), _top(y.detach().permute(0, 2, 3, 4, 1).reshape(-1, 4), 2)) < 1e-6
    with pytest.raises(ValueError, match="Conv3d.*im2col"):
        SpectralProjector(nn.Sequential(nn.Conv3d(2, 4, 2)), side="input", layers=["0"])


def test_linear_with_leading_dims_and_keyword_input():
    torch.manual_seed(4)
    lin = nn.Linear(6, 4)
    p = _exact(lin, 2, side="input")
    x = torch.randn(2, 3, 5, 6)
    lin(input=x).sum().backward()  # was an IndexError inside the hook
    p.project_()
    assert _angle(p.basis(""), _top(x.reshape(-1, 6), 2)) < 1e-6


def test_parametrized_weights_are_refused_clearly():
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    parametrizations.weight_norm(net[0])
    parametrizations.orthogonal(net[1])
    p = SpectralProjector(net, rank=2)
    assert p.layer_names() == ["2"]
    text = p.summary()
    assert text.count("parametrized weight") >= 2 and "original" in text
    with pytest.raises(ValueError, match="parametrized"):
        SpectralProjector(net, rank=2, layers=["0"])


def test_unsupported_layers_are_named_not_silently_skipped():
    net = nn.Sequential(nn.ConvTranspose2d(3, 4, 2), nn.Flatten(), nn.Linear(36, 2))
    p = SpectralProjector(net, rank=2)
    assert p.layer_names() == ["2"]
    assert "ConvTranspose2d, which no weight adapter handles" in p.skipped["0"]


# ----------------------------------------------------------------------- shared weights
class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6, bias=False)
        self.b = nn.Linear(6, 6, bias=False)
        self.b.weight = self.a.weight  # one Parameter, two modules

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_a_shared_weight_has_one_basis_from_the_pooled_rows_and_is_projected_once():
    torch.manual_seed(5)
    m = Shared()
    p = _exact(m, 2)
    assert p.layer_names() == ["a"] and len(p.layer_state("a").uses) == 2
    x = torch.randn(20, 6)
    h = m.a(x)
    out = m.b(torch.tanh(h))
    out.pow(2).sum().backward()
    G = m.a.weight.grad.clone().double()
    p.project_()
    E = _top(torch.cat([h.detach(), out.detach()]), 2)
    assert _angle(p.basis("a"), E) < 1e-6
    Eb = p.basis("a").double()  # once: E E^T G, not P_b P_a G
    torch.testing.assert_close(m.a.weight.grad.double(), Eb @ (Eb.T @ G), rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------- ownership
def test_only_the_optimizers_parameters_are_projected():
    torch.manual_seed(6)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    ref = copy.deepcopy(net)
    opt = DSBP(net, torch.optim.SGD, rank=2, interval=1, params=net[2].parameters(), lr=0.1)
    other = torch.optim.SGD(net[0].parameters(), lr=0.1)
    assert opt.projector.layer_names() == ["2"]
    assert all(line.split()[0] != "0" for line in opt.summary().splitlines())  # not its weight
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    F.cross_entropy(net(x), y).backward()
    F.cross_entropy(ref(x), y).backward()
    opt.step()
    other.step()
    # net[0] belongs to a plain SGD: exactly what SGD does on the same gradient
    torch.testing.assert_close(net[0].weight.grad, ref[0].weight.grad)
    with torch.no_grad():
        torch.testing.assert_close(net[0].weight, ref[0].weight - 0.1 * ref[0].weight.grad)
        # unprojected parameters of DSBP itself (the bias) step as plain SGD
        torch.testing.assert_close(net[2].bias, ref[2].bias - 0.1 * ref[2].bias.grad)
    assert not torch.allclose(net[2].weight.grad, ref[2].weight.grad)


def test_dead_layer_warns_once_not_every_step():
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].bias.zero_()
    p = SpectralProjector(net, rank=2, interval=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            net.zero_grad()
            net(torch.randn(8, 4)).sum().backward()
            p.project_()
    msgs = [str(w.message) for w in caught if "zero" in str(w.message)]
    assert len(msgs) == 1 and "'0'" in msgs[0]


# ----------------------------------------------------------------------- lifecycle
def _mlp():
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 2))


def _hooks(net):
    return sum(len(m._forward_hooks) for m in net.modules())


def test_remove_and_deletion_leave_no_hooks():
    net = _mlp()
    opt = DSBP(net, rank=2)
    assert _hooks(net) == 2
    net(torch.randn(3, 5))  # captures rows (a refresh is due)
    assert opt.projector.layer_state("0").rows
    opt.remove()
    assert _hooks(net) == 0 and not opt.projector.layer_state("0").rows
    opt2 = DSBP(net, rank=2)
    assert _hooks(net) == 2
    del opt2
    gc.collect()
    assert _hooks(net) == 0  # hooks hold the projector weakly and go with it
    net(torch.randn(3, 5))  # and nothing fails afterwards


def test_copy_and_pickle_refuse_at_copy_time():
    opt = DSBP(_mlp(), rank=2)
    with pytest.raises(TypeError, match="cannot be copied"):
        copy.deepcopy(opt)
    with pytest.raises(TypeError, match="pickled"):
        pickle.dumps(opt)
    with pytest.raises(TypeError, match="copied"):
        copy.deepcopy(opt.projector)


def test_state_dict_hooks_fire():
    net = _mlp()
    opt = DSBP(net, rank=2, lr=0.1)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("post"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    assert calls == ["pre", "post", "load_pre", "load_post"]


def test_every_projector_option_is_accepted_by_dsbp():
    net = nn.Sequential(nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 2))
    opt = DSBP(net, torch.optim.SGD, rank=2, exclude=["1"], skip_first_last=True, residual=0.5,
               warmup=3, rescale=True, path="loop", seed=3, lr=0.1, momentum=0.9)
    p = opt.projector
    assert p.layer_names() == ["2"]
    assert (p.residual, p.warmup, p.rescale, p.path, p.seed) == (0.5, 3, True, "loop", 3)
    assert opt.param_groups[0]["momentum"] == 0.9
    assert "excluded" in p.skipped["1"] and "skip_first_last" in p.skipped["0"]


def test_an_optimizer_that_needs_a_closure_is_refused():
    with pytest.raises(TypeError, match="closure"):
        DSBP(_mlp(), torch.optim.LBFGS, rank=2)


# ----------------------------------------------------------------------- state validation
def _trained(rank=2, width=6):
    torch.manual_seed(8)
    net = nn.Sequential(nn.Linear(5, width), nn.ReLU(), nn.Linear(width, 2))
    opt = DSBP(net, rank=rank, interval=1, lr=0.1)
    net(torch.randn(4, 5)).sum().backward()
    opt.step()
    return net, opt


def test_load_state_dict_refuses_bad_states_naming_the_weight():
    _, good = _trained()
    sd = good.state_dict()
    _, wide = _trained(width=9)
    with pytest.raises(ValueError, match="'0'.*d=9|'0'.*d=6"):
        wide.load_state_dict(sd)
    _, rank6 = _trained(rank=6)
    with pytest.raises(ValueError, match="rank 2.*rank 6"):
        rank6.load_state_dict(sd)
    for key, value, pattern in (("block", float("nan"), "not finite"),
                                ("trace", 0.0, "trace must be > 0")):
        bad = copy.deepcopy(sd)
        bad["projector"]["layers"]["0"][key] = torch.full_like(
            bad["projector"]["layers"]["0"][key], value)
        with pytest.raises(ValueError, match=f"'0'.*{pattern}"):
            good.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    del bad["projector"]["step"]
    with pytest.raises(ValueError, match="'step'"):
        good.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    del bad["projector"]["layers"]["2"]["eigenvalues"]
    with pytest.raises(ValueError, match="'2'.*missing.*eigenvalues"):
        good.load_state_dict(bad)
    before = good.projector.basis("0").clone()
    good.load_state_dict(sd)  # the good state still loads, and nothing above changed it
    torch.testing.assert_close(good.projector.basis("0"), before)


def test_a_non_finite_gradient_is_reported_and_not_spread():
    net, opt = _trained()
    net.zero_grad()
    net(torch.randn(4, 5)).sum().backward()
    net[2].weight.grad[0, 3] = float("nan")
    sgd_like = net[2].weight.grad.clone()
    with pytest.warns(RuntimeWarning, match="'2'.*non-finite gradient"):
        opt.projector.project_()
    g = net[2].weight.grad
    assert int((~torch.isfinite(g)).sum()) == 1  # one entry, as the base optimizer sees it
    torch.testing.assert_close(g, sgd_like, equal_nan=True)
    assert torch.isfinite(net[0].weight.grad).all()


# ----------------------------------------------------------------------- user adapters
class Gated(nn.Module):
    """A layer no built-in adapter knows: y = (x W^T) * sigmoid(x V^T)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 6) / 3)
        self.v = nn.Parameter(torch.randn(4, 6) / 3)

    def forward(self, x):
        return (x @ self.w.T) * torch.sigmoid(x @ self.v.T)


def test_a_registered_adapter_makes_a_custom_layer_projectable():
    from dsbp.layers import adapters

    class GatedAdapter(adapters.WeightAdapter):
        def weights(self, module):
            return ["w"]  # project w on its inputs; v stays unprojected

        def rows(self, module, attr, args, kwargs, output, side, max_rows, gen):
            return args[0].detach().reshape(-1, 6).float()

    torch.manual_seed(9)
    layer = Gated()
    assert SpectralProjector(nn.Sequential(layer, nn.Linear(4, 2)), rank=2).layer_names() == ["1"]
    adapters.register_adapter(Gated, GatedAdapter())
    try:
        p = _exact(layer, 2, side="input")
        assert p.layer_names() == ["w"] and "v" in p.skipped
        x = torch.randn(30, 6)
        layer(x).sum().backward()
        G = layer.w.grad.clone().double()
        p.project_()
        E = p.basis("w").double()
        assert _angle(E, _top(x, 2)) < 1e-6
        torch.testing.assert_close(layer.w.grad.double(), (G @ E) @ E.T, rtol=1e-6, atol=1e-9)
    finally:
        adapters.unregister_adapter(Gated)


def test_unread_nonfinite_counts_add_up_until_they_are_read():
    """The GPU reporting path (flags summed on the device, read on refresh steps), driven on the
    CPU: two unread steps with a bad gradient on weight '2' give one warning counting 2."""
    _, opt = _trained()
    p = opt.projector
    sts = p.states()
    flags = [torch.tensor(True), torch.tensor(False)]  # weight '0' fine, weight '2' not
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p._report_nonfinite(sts, flags, read_now=False)
        p._report_nonfinite(sts, flags, read_now=False)
        assert not caught  # nothing read yet
        p._report_nonfinite(sts, [torch.tensor(True)] * 2, read_now=True)
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "'2'" in msgs[0] and "on 2 step(s)" in msgs[0]
