"""DistributedDSBP and SubspaceAdam(distributed=True) under FSDP2: 2 gloo CPU ranks against one
process on the concatenated batch.

The model is wrapped with ``fully_shard`` per layer and at the root, so every weight and
gradient is a DTensor sharded by rows (fc1 has 25 output rows: an uneven 13 / 12 split). The
training loop is the plain one. Checked against one process that sees the concatenated batch
(the ranks' halves in rank order), with refreshes at steps 0, 2 and 4:

* bases bit-identical on both ranks, and within 1e-3 rad (largest principal angle) of the
  single process's;
* weights (assembled with ``full_tensor()``) equal to the single process's within fp32
  round-off (SGD: rtol 1e-4 / atol 1e-5; Adam-type: relative Frobenius error < 1e-4, see
  tests/optim/test_distributed.py for why Adam amplifies summation-order round-off);
* optimizer state per rank: the two ranks' local state adds up to the single process's, and
  each holds about half of it (SGD momentum and Adam moments of sharded weights are DTensor
  shards; input-side subspace moments (rows, k) follow the row shards; output-side subspace
  moments (k, d_in) and the bases (d, k) are replicated, which is why SubspaceAdam's check is on
  the input side);
* output side and input side for DSBP (and the output side again through the stacked path,
  `path="stacked"`), both sides for SubspaceAdam.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fsdp_models import WORLD, Net, data, local_state_bytes, shard, train
from torch import nn

from dsbp import DSBP
from dsbp.core.subspace import principal_angles
from dsbp.optim.comm import is_dtensor
from dsbp.optim.distributed import launch

pytestmark = pytest.mark.distributed


def _optimizer(case: str, net: nn.Module, distributed: bool) -> torch.optim.Optimizer:
    side = "input" if "input" in case else "output"
    path = "stacked" if case.endswith("stacked") else "loop"
    kw = dict(rank=3, interval=2, max_rows=10**6, sharpness=0.1, side=side,
              projector_kwargs={"oversample": 3, "path": path})
    if case.startswith("dsbp"):
        if distributed:
            from dsbp.optim.distributed import DistributedDSBP

            return DistributedDSBP(net, torch.optim.SGD, lr=0.05, momentum=0.9, **kw)
        return DSBP(net, torch.optim.SGD, lr=0.05, momentum=0.9, **kw)
    from dsbp.optim.subspace_state import SubspaceAdam

    return SubspaceAdam(net, lr=0.01, distributed=distributed, **kw)


def _rank_fn(rank: int, world: int, out_dir: str, cases: tuple[str, ...]) -> None:
    torch.set_num_threads(1)
    x, y = data()
    result = {}
    for case in cases:
        torch.manual_seed(0)
        net = Net()
        shard(net)
        assert all(is_dtensor(p) for p in net.parameters())
        opt = _optimizer(case, net, distributed=True)
        train(net, opt, x, y, rank, world)
        proj = opt.projector
        result[case] = {
            "weights": {k: v.full_tensor().clone() for k, v in net.state_dict().items()},
            "bases": {n: proj.basis(n).clone() for n in proj.layer_names()},
            "refreshes": proj.num_refreshes(),
            "state_bytes": local_state_bytes(opt),
        }
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def _check(tmp_path: Path, cases: tuple[str, ...]) -> None:
    launch(_rank_fn, WORLD, args=(str(tmp_path), cases), backend="gloo")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, y = data()
        for case in cases:
            a, b = r0[case], r1[case]
            for n in a["bases"]:  # bit-identical across ranks
                assert torch.equal(a["bases"][n], b["bases"][n]), (case, n)
            for k in a["weights"]:
                assert torch.equal(a["weights"][k], b["weights"][k]), (case, k)
            assert a["refreshes"] == 3 * 3, case  # 3 layers x refreshes at steps 0, 2, 4
            torch.manual_seed(0)
            net = Net()
            init = {k: v.clone() for k, v in net.state_dict().items()}
            opt = _optimizer(case, net, distributed=False)
            train(net, opt, x, y, 0, 1)
            for n in a["bases"]:
                ang = principal_angles(opt.projector.basis(n), a["bases"][n])
                assert ang.max() < 1e-3, (case, n, ang)
            for k, v in net.state_dict().items():
                got = a["weights"][k]
                if case.startswith("dsbp"):
                    assert torch.allclose(v, got, rtol=1e-4, atol=1e-5), (case, k)
                else:
                    assert (v - got).norm() <= 1e-4 * v.norm(), (case, k)
                assert not torch.equal(v, init[k]), (case, k)  # training moved every tensor
            single = local_state_bytes(opt)
            per_rank = (a["state_bytes"], b["state_bytes"])
            if case != "subspace_output":  # everything sharded: the shards add up exactly
                assert sum(per_rank) == single, (case, per_rank, single)
                assert max(per_rank) <= 0.55 * single, (case, per_rank, single)
            else:  # (k, d_in) moments replicated: more than half, less than the whole
                assert 0.5 * single < max(per_rank) < single, (case, per_rank, single)
    finally:
        torch.set_num_threads(n_threads)


def test_dsbp_under_fsdp2_matches_one_process_on_the_concatenated_batch(tmp_path):
    _check(tmp_path, ("dsbp_output", "dsbp_input", "dsbp_output_stacked"))


def test_subspace_adam_under_fsdp2_matches_one_process_on_the_concatenated_batch(tmp_path):
    _check(tmp_path, ("subspace_output", "subspace_input"))
