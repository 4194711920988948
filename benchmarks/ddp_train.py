"""Data-parallel DSBP training: ``torchrun --nproc_per_node=N benchmarks/ddp_train.py``.

Also runs without torchrun: ``python benchmarks/ddp_train.py --nproc 2`` (spawns the processes
with ``dsbp.optim.distributed.launch``). SmallCNN on the bundled Fashion-MNIST subset (real
images); each global batch is split evenly across ranks, DDP averages the gradients and
:class:`~dsbp.optim.distributed.DistributedDSBP` keeps the bases bit-identical. At the end every
rank hashes its bases and parameters (BatchNorm running statistics are rank-local
under DDP, so they are left out) and rank 0 checks that all hashes agree.
GPU: ``torchrun --nproc_per_node=8 benchmarks/ddp_train.py --device cuda`` (nccl).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from dsbp.optim.distributed import DistributedDSBP, launch


def digest(tensors: list[torch.Tensor]) -> int:
    """A 63-bit hash of the exact bytes of ``tensors`` (for the cross-rank identity check)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little") >> 1


def train(rank: int, world: int, args: argparse.Namespace) -> None:
    from dsbp.data import load_dataset
    from dsbp.models.cnn import SmallCNN

    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
                          if args.device == "cuda" else "cpu")
    torch.set_num_threads(max(1, args.threads))
    ds = load_dataset("bundled")
    x = ((ds.x_train.float() / 255.0 - ds.mean[0]) / ds.std[0]).to(device)
    y = ds.y_train.to(device)
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
    model = SmallCNN().to(device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = DistributedDSBP(model, torch.optim.SGD, rank=args.rank, interval=args.interval,
                          lr=args.lr, momentum=0.9)
    g = torch.Generator().manual_seed(1)  # same global batch order on every rank
    local = args.batch // world
    t0 = time.perf_counter()
    for step in range(args.steps):
        idx = torch.randint(0, x.shape[0], (local * world,), generator=g)
        idx = idx[rank * local:(rank + 1) * local].to(device)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(ddp(x[idx]), y[idx])
        loss.backward()
        opt.step()
        if rank == 0 and (step % 20 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}", flush=True)
    p = opt.projector
    h = torch.tensor([digest([p.basis(n) for n in p.layer_names()]),
                      digest(list(model.parameters()))], device=device)
    hs = [torch.zeros_like(h) for _ in range(world)]
    dist.all_gather(hs, h)
    if rank == 0:
        same = all(torch.equal(hs[0], o) for o in hs)
        print(f"{world} ranks, {args.steps} steps in {time.perf_counter() - t0:.1f}s; "
              f"bases and weights bit-identical across ranks: {same}; "
              f"refreshes per layer: {p.num_refreshes(p.layer_names()[0])}")
        if not same:
            raise SystemExit("ranks disagree")


def _launched(rank: int, world: int, args: argparse.Namespace) -> None:
    train(rank, world, args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nproc", type=int, default=2, help="processes when not under torchrun")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=128, help="global batch (split across ranks)")
    ap.add_argument("--rank", type=int, default=10)
    ap.add_argument("--interval", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        try:
            train(dist.get_rank(), dist.get_world_size(), args)
        finally:
            dist.destroy_process_group()
    else:
        launch(_launched, args.nproc, args=(args,),
               backend="nccl" if args.device == "cuda" else "gloo")


if __name__ == "__main__":
    main()
