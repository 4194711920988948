"""Checkpoints of DistributedDSBP with torch.distributed.checkpoint (DCP), on 2 gloo ranks.

``save_checkpoint`` after 3 steps, a fresh model and optimizer, ``load_checkpoint``, 2 more
steps: bit-identical weights and bases to the uninterrupted 5-step run on the same ranks (steps
2 and 4 refresh, so the resumed run refreshes from the restored bases and step counter). Then a
different world size: the 2-rank checkpoint loaded by one process without a process group (DCP
reshards the FSDP2 shards into whole tensors) continues like the 2-rank run within fp32
round-off. Under DDP and FSDP2 (fully_shard per layer and at the root).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fsdp_models import LOCAL, STEPS, WORLD, Net, data, shard

from dsbp import DSBP
from dsbp.core.subspace import principal_angles
from dsbp.optim.comm import is_dtensor
from dsbp.optim.distributed import launch, load_checkpoint, save_checkpoint

SPLIT = 3  # steps before the checkpoint
LAYOUTS = ("ddp", "fsdp2")


def _opt(net, distributed: bool):
    kw = dict(rank=3, interval=2, max_rows=10**6, sharpness=0.1, lr=0.05, momentum=0.9,
              projector_kwargs={"oversample": 3})
    if distributed:
        from dsbp.optim.distributed import DistributedDSBP

        return DistributedDSBP(net, torch.optim.SGD, **kw)
    return DSBP(net, torch.optim.SGD, **kw)


def _steps(model, opt, x, y, rank, world, steps):
    for t in steps:
        g = slice(t * LOCAL * WORLD, (t + 1) * LOCAL * WORLD)
        xb, yb = x[g], y[g]
        if world > 1:
            xb, yb = xb[rank * LOCAL:(rank + 1) * LOCAL], yb[rank * LOCAL:(rank + 1) * LOCAL]
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()


def _build(layout):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    net = Net()
    if layout == "fsdp2":
        shard(net)
        return net, net
    return net, DDP(net)


def _full(t):
    return t.full_tensor() if is_dtensor(t) else t


def _rank_fn(rank, world, out_dir, layout):
    torch.set_num_threads(1)
    x, y = data()
    net, model = _build(layout)  # uninterrupted
    opt = _opt(net, True)
    _steps(model, opt, x, y, rank, world, range(STEPS))
    straight = {k: _full(v).clone() for k, v in net.state_dict().items()}
    net, model = _build(layout)  # interrupted after SPLIT steps
    opt = _opt(net, True)
    _steps(model, opt, x, y, rank, world, range(SPLIT))
    save_checkpoint(Path(out_dir) / "ck", net, opt)
    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    net, model = _build(layout)
    opt = _opt(net, True)
    load_checkpoint(Path(out_dir) / "ck", net, opt)
    assert opt.projector.step == SPLIT
    _steps(model, opt, x, y, rank, world, range(SPLIT, STEPS))
    torch.save({"straight": straight,
                "resumed": {k: _full(v).clone() for k, v in net.state_dict().items()},
                "bases": {n: opt.projector.basis(n).clone() for n in opt.projector.layer_names()}},
               Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.distributed
@pytest.mark.parametrize("layout", LAYOUTS)
def test_dcp_checkpoint_resumes_identically_and_on_another_world_size(tmp_path, layout):
    launch(_rank_fn, WORLD, args=(str(tmp_path), layout), backend="gloo")
    r = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(WORLD)]
    for k, v in r[0]["straight"].items():
        assert torch.equal(r[0]["resumed"][k], v), k  # resumed == uninterrupted, bit for bit
        assert torch.equal(r[1]["resumed"][k], v), k
    # another world size: one process, no process group, plain model, from the 2-rank files
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, y = data()
        torch.manual_seed(123)
        net = Net()
        opt = _opt(net, False)
        load_checkpoint(tmp_path / "ck", net, opt)
        assert opt.projector.step == SPLIT
        _steps(net, opt, x, y, 0, 1, range(SPLIT, STEPS))
        for k, v in net.state_dict().items():
            assert torch.allclose(v, r[0]["straight"][k], rtol=1e-4, atol=1e-5), k
        for n, E in r[0]["bases"].items():
            assert principal_angles(opt.projector.basis(n), E).max() < 1e-3, n
    finally:
        torch.set_num_threads(n_threads)


def test_checkpoint_helpers_refuse_subspace_adam_clearly(tmp_path):
    from dsbp.optim.subspace_state import SubspaceAdam

    net = Net()
    with pytest.raises(NotImplementedError, match="SubspaceAdam"):
        save_checkpoint(tmp_path / "ck", net, SubspaceAdam(net, rank=2, interval=2))
    assert not (tmp_path / "ck").exists()
