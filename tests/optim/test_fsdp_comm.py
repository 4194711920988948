"""ProcessGroupCommunicator on 2 gloo CPU ranks, under FSDP2 (fully_shard) and DDP layouts.

The communicator's contract, checked against independent answers:

* FSDP2 projection through it: each rank projects its own rows ``G_r`` of a DTensor gradient
  with the rows ``E[row_slice]`` of the basis and ``sum_over_row_shards`` of the thin factor;
  the assembled gradient (``full_tensor()``, i.e. the edits reached the DTensor in place) equals
  the single-process DSBP direction ``E E^T G + s e1 e1^T W`` / ``G E E^T + s W e1 e1^T`` of
  the full gradient of the concatenated batch (computed in each process, without FSDP). Layers
  with 5, 3 and 1 output rows make the shards uneven (3 / 2, 2 / 1) and empty (1 / 0);
* ``row_slice`` tiles the rows of every weight exactly once across the ranks;
* ``all_reduce_sum`` sums, ``broadcast_`` copies rank 0's tensor, ``row_budget`` is
  ``ceil(max_rows / W)``; the byte counters add up each payload;
* DDP layout (plain tensors): ``local`` / ``row_slice`` / ``sum_over_row_shards`` are the
  identity and move no bytes;
* refusals: the single-process ``Communicator`` on FSDP2 weights (names DistributedDSBP), a mix
  of sharded and plain projected weights, a Replicate (tensor-parallel style) DTensor.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dsbp.core.projection import project, sharpness_term
from dsbp.optim.distributed import ProcessGroupCommunicator, launch

WORLD, K, SCALE = 2, 2, 0.3


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=g), torch.randn(8, 1, generator=g)


def _bases(W: torch.Tensor) -> dict[str, torch.Tensor]:
    """Orthonormal bases, the same on every rank (seeded by the weight's shape)."""
    g = torch.Generator().manual_seed(W.shape[0] * 100 + W.shape[1])
    out = {}
    for side, d in (("output", W.shape[0]), ("input", W.shape[1])):
        out[side] = torch.linalg.qr(torch.randn(d, min(K, d), generator=g))[0]
    return out


def _expected(G: torch.Tensor, W: torch.Tensor, E: torch.Tensor, side: str) -> torch.Tensor:
    return project(G, E, side) + sharpness_term(W, E[:, 0], SCALE, side)


def _project_shard(comm: ProcessGroupCommunicator, p: torch.Tensor, E: torch.Tensor, side: str
                   ) -> None:
    """The row-sharded DSBP direction, through the communicator only, into ``p.grad``."""
    G, W = comm.local(p.grad), comm.local(p.detach())
    if side == "output":
        Er = E[comm.row_slice(p)]  # the basis rows of this rank's output units
        M = torch.cat([Er.T @ G, Er[:, :1].T @ W])  # (k + 1, d_in): E^T G and e1^T W
        comm.sum_over_row_shards(M)
        M[:1] += SCALE * M[-1:]
        G.copy_(Er @ M[:-1])
    else:  # row-local
        G.copy_((G @ E) @ E.T + SCALE * torch.outer(W @ E[:, 0], E[:, 0]))


def _fsdp_rank(rank: int, world: int, out_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard

    from dsbp.optim.comm import Communicator

    torch.set_num_threads(1)
    x, y = _batch()
    ref = _net()  # one process, whole batch: the independent answer
    nn.functional.mse_loss(ref(x), y).backward()
    res: dict = {"cases": {}}
    for side in ("output", "input"):
        net = _net()
        for i in (0, 2, 4):
            fully_shard(net[i])
        fully_shard(net)
        weights = [net[i].weight for i in (0, 2, 4)]
        try:
            Communicator().check_params(weights)
            res["single_refused"] = ""
        except TypeError as err:
            res["single_refused"] = str(err)
        comm = ProcessGroupCommunicator()
        comm.check_params(weights)
        res["sharded"] = comm.sharded
        half = slice(rank * 4, (rank + 1) * 4)
        nn.functional.mse_loss(net(x[half]), y[half]).backward()  # FSDP2 averages over ranks
        comm.stats.reset()
        for i in (0, 2, 4):
            p, r = net[i].weight, ref[i].weight
            E = _bases(r.detach())[side]
            _project_shard(comm, p, E, side)
            sl = comm.row_slice(p)
            res["cases"][(side, i)] = {
                "got": p.grad.full_tensor(),
                "want": _expected(r.grad, r.detach(), E, side),
                "rows": (sl.start, sl.stop),
                "local_rows": comm.local(p.grad).shape[0],
            }
        res[f"stats_{side}"] = comm.stats.as_dict()
    # collectives and the DDP (plain tensor) layout
    comm = ProcessGroupCommunicator()
    comm.check_params([p for p in ref.parameters()])
    t = torch.full((3,), float(rank + 1))
    comm.all_reduce_sum(t)
    b = torch.full((2, 2), float(rank + 5))
    comm.broadcast_(b)
    m = torch.full((2,), float(rank))
    g = ref[0].weight.grad
    res["plain"] = {
        "sum": t, "bcast": b, "budget": comm.row_budget(7), "sharded": comm.sharded,
        "row_sum_is_identity": torch.equal(comm.sum_over_row_shards(m), m.new_full((2,), rank)),
        "local_is_same": comm.local(g) is g, "slice": comm.row_slice(g) == slice(None),
        "stats": comm.stats.as_dict(),
    }
    # refusals
    errors = {}
    net = _net()
    fully_shard(net[0])  # only the first layer sharded: a mix
    try:
        ProcessGroupCommunicator().check_params([net[i].weight for i in (0, 2, 4)])
    except TypeError as err:
        errors["mixed"] = str(err)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    rep = distribute_tensor(torch.ones(4, 4), mesh, [Replicate()])
    try:
        ProcessGroupCommunicator().check_params([rep])
    except TypeError as err:
        errors["replicate"] = str(err)
    res["errors"] = errors
    dist.barrier()
    torch.save(res, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.distributed
def test_communicator_under_fsdp2_and_ddp_layouts(tmp_path):
    launch(_fsdp_rank, WORLD, args=(str(tmp_path),), backend="gloo")
    r = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(WORLD)]
    for res in r:
        assert res["sharded"] is True
        assert "DistributedDSBP" in res["single_refused"]
        for (side, i), c in res["cases"].items():
            # the row-sharded projection reached the DTensor gradient and equals one process
            assert torch.allclose(c["got"], c["want"], rtol=1e-5, atol=1e-6), (side, i)
            assert not torch.allclose(c["want"], torch.zeros_like(c["want"]))
        # output side: one (k+1) x d_in factor per layer; input side: nothing per step
        so, si = res["stats_output"], res["stats_input"]
        assert so["calls"]["sum_over_row_shards"] == 3
        assert so["bytes"]["sum_over_row_shards"] == 4 * ((K + 1) * 6 + (K + 1) * 5 + 2 * 3)
        assert sum(si["bytes"].values()) == 0 and sum(si["calls"].values()) == 0
        p = res["plain"]
        assert torch.equal(p["sum"], torch.full((3,), 3.0))  # 1 + 2
        assert torch.equal(p["bcast"], torch.full((2, 2), 5.0))  # rank 0's
        assert p["budget"] == 4 and p["sharded"] is False
        assert p["row_sum_is_identity"] and p["local_is_same"] and p["slice"]
        assert p["stats"]["bytes"] == {"all_reduce_sum": 12, "broadcast_": 16,
                                       "sum_over_row_shards": 0}
        assert "fully_shard" in res["errors"]["mixed"]
        assert "Shard(0)" in res["errors"]["replicate"]
    # the shards tile each weight's rows: uneven (5 -> 3 + 2, 3 -> 2 + 1) and empty (1 -> 1 + 0)
    for key in r[0]["cases"]:
        spans = [res["cases"][key]["rows"] for res in r]
        n = r[0]["cases"][key]["want"].shape[0]
        assert spans[0][0] == 0 and spans[0][1] == spans[1][0] and spans[1][1] == n, (key, spans)
        assert [res["cases"][key]["local_rows"] for res in r] == [b - a for a, b in spans]
    assert [res["cases"][("output", 4)]["local_rows"] for res in r] == [1, 0]


def test_communicator_needs_an_initialised_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        ProcessGroupCommunicator()
