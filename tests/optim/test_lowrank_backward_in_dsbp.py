"""DSBP(backward="lowrank"): Linear weights get their projected gradient from the backward pass.

Independent answer: the same DSBP with the ordinary backward (autograd's full gradient, then
the projection), step for step through refreshes; and a flop count showing the full
weight-gradient product is not done on a non-refresh step.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dsbp import DSBP


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 3)).double()


@pytest.mark.parametrize("side", ["output", "input"])
def test_lowrank_backward_trains_exactly_like_the_full_backward(side):
    ref, low = _mlp(), None
    low = copy.deepcopy(ref)
    kw = dict(rank=3, interval=3, side=side, sharpness=0.2, eig_dtype=torch.float64, lr=0.05,
              momentum=0.9, warmup=1)
    o_ref = DSBP(ref, torch.optim.SGD, **kw)
    o_low = DSBP(low, torch.optim.SGD, backward="lowrank", **kw)
    g = torch.Generator().manual_seed(1)
    in_span_steps = []
    for step in range(8):  # warm-up step 0, refreshes at 0, 3, 6
        x, y = torch.randn(20, 12, generator=g, dtype=torch.float64), torch.randint(0, 3, (20,),
                                                                                  generator=g)
        for m, o in ((ref, o_ref), (low, o_low)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
        in_span_steps.append(o_low.projector.layer_state("2").in_span_step == step)
    assert in_span_steps == [False, True, True, False, True, True, False, True]
    for a, b in zip(ref.parameters(), low.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    o_low.remove()
    assert "forward" not in vars(low[0])  # the layer's own forward is back


def test_the_full_weight_gradient_product_is_skipped_off_refresh_steps():
    d, n = 256, 64
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 4))
    opt = DSBP(net, torch.optim.SGD, rank=4, interval=100, backward="lowrank", lr=0.01)
    x, y = torch.randn(n, d), torch.randint(0, 4, (n,))
    F.cross_entropy(net(x), y).backward()
    opt.step()  # the refresh step: full gradient
    opt.zero_grad()
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(net(x), y).backward()
    low = counter.get_total_flops()
    opt.remove()
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(net(x), y).backward()
    full = counter.get_total_flops()
    # the d x d layer's dY^T X (2 n d^2 flops) is replaced by thin products with k = 4
    assert full - low > 2 * n * d * d * 0.9


def test_lowrank_backward_refuses_a_residual():
    with pytest.raises(ValueError, match="lowrank.*residual"):
        DSBP(_mlp(), torch.optim.SGD, backward="lowrank", residual=0.5)
