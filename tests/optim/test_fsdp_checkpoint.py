"""Checkpoints of DistributedDSBP and SubspaceAdam with torch.distributed.checkpoint (DCP), on
2 gloo ranks.

``save_checkpoint`` after 3 steps, a fresh model and optimizer, ``load_checkpoint``, 2 more
steps: bit-identical weights and bases to the uninterrupted 5-step run on the same ranks (steps
2 and 4 refresh, so the resumed run refreshes from the restored bases and step counter). Then a
different world size: the 2-rank checkpoint loaded by one process without a process group (DCP
reshards the FSDP2 shards into whole tensors) continues like the 2-rank run within fp32
round-off. Under DDP (DSBP) and FSDP2 (fully_shard per layer and at the root: DSBP, and
SubspaceAdam on both sides, whose input-side moments are saved as row-sharded DTensors and
resharded on load).
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


def _opt(net, distributed: bool, kind: str = "dsbp"):
    if kind.startswith("subspace"):
        from dsbp.optim.subspace_state import SubspaceAdam

        return SubspaceAdam(net, lr=0.01, rank=3, interval=2, max_rows=10**6, sharpness=0.1,
                            side=kind.rsplit("_", 1)[1], projector_kwargs={"oversample": 3},
                            distributed=distributed)
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


def _rank_fn(rank, world, out_dir, layout, kinds):
    torch.set_num_threads(1)
    x, y = data()
    out = {}
    for kind in kinds:
        net, model = _build(layout)  # uninterrupted
        opt = _opt(net, True, kind)
        _steps(model, opt, x, y, rank, world, range(STEPS))
        straight = {k: _full(v).clone() for k, v in net.state_dict().items()}
        net, model = _build(layout)  # interrupted after SPLIT steps
        opt = _opt(net, True, kind)
        _steps(model, opt, x, y, rank, world, range(SPLIT))
        save_checkpoint(Path(out_dir) / kind, net, opt)
        torch.manual_seed(123)  # a different init: everything must come from the checkpoint
        net, model = _build(layout)
        opt = _opt(net, True, kind)
        load_checkpoint(Path(out_dir) / kind, net, opt)
        assert opt.projector.step == SPLIT
        _steps(model, opt, x, y, rank, world, range(SPLIT, STEPS))
        out[kind] = {
            "straight": straight,
            "resumed": {k: _full(v).clone() for k, v in net.state_dict().items()},
            "bases": {n: opt.projector.basis(n).clone() for n in opt.projector.layer_names()}}
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.distributed
@pytest.mark.parametrize("layout,kinds", [
    ("ddp", ("dsbp",)),
    ("fsdp2", ("dsbp", "subspace_input", "subspace_output")),
])
def test_dcp_checkpoint_resumes_identically_and_on_another_world_size(tmp_path, layout, kinds):
    launch(_rank_fn, WORLD, args=(str(tmp_path), layout, kinds), backend="gloo")
    r = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(WORLD)]
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, y = data()
        for kind in kinds:
            a, b = r[0][kind], r[1][kind]
            for k, v in a["straight"].items():  # resumed == uninterrupted, bit for bit
                assert torch.equal(a["resumed"][k], v), (kind, k)
                assert torch.equal(b["resumed"][k], v), (kind, k)
            # another world size: one process, no process group, plain model, 2-rank files
            torch.manual_seed(123)
            net = Net()
            opt = _opt(net, False, kind)
            load_checkpoint(tmp_path / kind, net, opt)
            assert opt.projector.step == SPLIT
            _steps(net, opt, x, y, 0, 1, range(SPLIT, STEPS))
            for k, v in net.state_dict().items():
                got = a["straight"][k]
                if kind == "dsbp":
                    assert torch.allclose(v, got, rtol=1e-4, atol=1e-5), (kind, k)
                else:  # Adam-type: relative Frobenius error (see tests/optim/test_fsdp.py)
                    assert (v - got).norm() <= 1e-4 * v.norm(), (kind, k)
            for n, E in a["bases"].items():
                assert principal_angles(opt.projector.basis(n), E).max() < 1e-3, (kind, n)
    finally:
        torch.set_num_threads(n_threads)


def test_checkpoint_helpers_refuse_an_unknown_projector_optimizer(tmp_path):
    class Odd(torch.optim.SGD):  # a projector, but neither a base optimizer nor SubspaceAdam's
        projector = object()

    net = Net()
    with pytest.raises(NotImplementedError, match="Odd"):
        save_checkpoint(tmp_path / "ck", net, Odd(net.parameters(), lr=0.1))
    assert not (tmp_path / "ck").exists()
