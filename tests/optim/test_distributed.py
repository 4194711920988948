"""DDP with DistributedDSBP: 2 gloo CPU processes against one process on the concatenated batch.

Checks (a) bases and weights are bit-identical on both ranks, and (b) they equal a single
process that sees the concatenated batch (the ranks' halves, in rank order) within fp32
round-off, for the exact cold start (all-reduced covariance) and the matrix-free power
iteration (all-reduced A^T A V), with warm-started refreshes in between; and the same for
SubspaceAdam(distributed=True) (memory mode: Adam moments in the synchronised bases).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsbp import DSBP
from dsbp.core.subspace import principal_angles
from dsbp.optim.distributed import launch

BUNDLED = Path(__file__).resolve().parents[2] / "src/dsbp/data/bundled/fashion_mnist_small.npz"
STEPS, LOCAL, WORLD = 5, 16, 2
CONFIGS = {  # name -> projector kwargs
    "exact_cold_start": {},
    "power_cold_start": {"exact_threshold": 0, "cold_iters": 40},
    "energy_rank": {"energy": 0.9},  # rank chosen per layer from the (global) spectrum
}


class Net(nn.Module):
    """Conv + Linear layers, no BatchNorm (per-rank BN statistics differ from the global ones)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc1 = nn.Linear(96, 24)
        self.fc2 = nn.Linear(24, 10)

    def forward(self, x):
        h = self.pool(torch.relu(self.conv(x))).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


def _data():
    d = np.load(BUNDLED)
    x = torch.from_numpy(d["x_train"][::31][: STEPS * LOCAL * WORLD]).permute(0, 3, 1, 2)
    y = torch.from_numpy(d["y_train"][::31][: STEPS * LOCAL * WORLD])
    return (x.float() / 255.0 - 0.286) / 0.353, y


def _make(cls, model, kw):
    return cls(model, torch.optim.SGD, rank=3, interval=2, max_rows=10**6, sharpness=0.1,
               lr=0.05, momentum=0.9, projector_kwargs={"oversample": 3, **kw})


def _make_subspace(cls, model, **kw):
    return cls(model, lr=0.01, rank=3, interval=2, max_rows=10**6, sharpness=0.1,
               projector_kwargs={"oversample": 3}, **kw)


def _train(model, opt, x, y, rank, world):
    for t in range(STEPS):
        g = slice(t * LOCAL * WORLD, (t + 1) * LOCAL * WORLD)  # the global batch of step t
        xb, yb = x[g][rank * LOCAL:(rank + 1) * LOCAL], y[g][rank * LOCAL:(rank + 1) * LOCAL]
        if world == 1:  # single process: the whole concatenated batch
            xb, yb = x[g], y[g]
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()


def _rank_fn(rank, world, out_dir):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dsbp.optim.distributed import DistributedDSBP

    torch.set_num_threads(1)
    x, y = _data()
    result = {}
    for name, kw in CONFIGS.items():
        torch.manual_seed(0)
        net = Net()
        ddp = DDP(net)
        opt = _make(DistributedDSBP, net, kw)
        _train(ddp, opt, x, y, rank, world)
        result[name] = {
            "weights": {k: v.clone() for k, v in net.state_dict().items()},
            "bases": {n: opt.projector.basis(n).clone() for n in opt.projector.layer_names()},
            "refreshes": opt.projector.num_refreshes(),
        }
    # memory mode under DDP: SubspaceAdam with the synchronised projector
    from dsbp.optim.subspace_state import SubspaceAdam

    torch.manual_seed(0)
    net = Net()
    ddp = DDP(net)
    opt = _make_subspace(SubspaceAdam, net, distributed=True)
    _train(ddp, opt, x, y, rank, world)
    result["subspace_adam"] = {
        "weights": {k: v.clone() for k, v in net.state_dict().items()},
        "bases": {n: opt.projector.basis(n).clone() for n in opt.projector.layer_names()},
        "refreshes": opt.projector.num_refreshes(),
    }
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.slow
def test_two_gloo_ranks_match_each_other_and_the_concatenated_batch(tmp_path):
    launch(_rank_fn, WORLD, args=(str(tmp_path),), backend="gloo")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, y = _data()
        for name in [*CONFIGS, "subspace_adam"]:
            a, b = r0[name], r1[name]
            for n in a["bases"]:  # (a) bit-identical across ranks
                assert torch.equal(a["bases"][n], b["bases"][n]), (name, n)
            for k in a["weights"]:
                assert torch.equal(a["weights"][k], b["weights"][k]), (name, k)
            assert a["refreshes"] == 3 * 3  # 3 layers x refreshes at steps 0, 2, 4
            if name == "energy_rank":  # the energy rule really picked ranks below k = 3
                assert min(E.shape[1] for E in a["bases"].values()) < 3
            torch.manual_seed(0)
            net = Net()
            init = {k: v.clone() for k, v in net.state_dict().items()}
            if name == "subspace_adam":
                from dsbp.optim.subspace_state import SubspaceAdam

                opt = _make_subspace(SubspaceAdam, net)
            else:
                opt = _make(DSBP, net, CONFIGS[name])
            _train(net, opt, x, y, 0, 1)
            for n in a["bases"]:  # (b) same subspace as the single process on the full batch
                ang = principal_angles(opt.projector.basis(n), a["bases"][n])
                assert ang.max() < 1e-3, (name, n, ang)
            for k, v in net.state_dict().items():
                assert torch.allclose(v, a["weights"][k], rtol=1e-4, atol=1e-5), (name, k)
                assert not torch.equal(v, init[k])  # training moved every tensor
    finally:
        torch.set_num_threads(n_threads)


def test_projector_needs_an_initialised_process_group():
    from dsbp.optim.distributed import DistributedSpectralProjector

    with pytest.raises(RuntimeError, match="init_process_group"):
        DistributedSpectralProjector(Net())


def test_launch_rejects_bad_nproc():
    with pytest.raises(ValueError, match="nproc"):
        launch(_rank_fn, 0)
