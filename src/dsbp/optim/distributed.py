"""Multi-process DSBP: bit-identical bases on every rank, O(k d) communication per refresh.

Data-parallel training (``DistributedDataParallel``) already averages the gradients, so every
rank projects the same gradient; what must agree is the basis. Each rank only sees its own
activations ``A_r`` (n_r, d), and the covariance of the global batch is ``C = sum_r A_r^T A_r``.
:class:`DistributedSpectralProjector` therefore

* all-reduces (SUM) the matrix-free products ``A_r^T (A_r V)`` (d, b) inside the block power
  iteration and the Rayleigh-Ritz step, which is ``C V`` for the concatenated batch: O(k d)
  numbers per iteration and layer, never the d x d covariance;
* on a layer's first refresh with ``d <= exact_threshold`` all-reduces the explicit covariance
  (O(d^2), once, only while d is small); above it, cold starts use power iterations from a
  random block drawn from the same seeded generator on every rank;
* all-reduces ``trace(C)`` and the health flags (missing rows, non-finite activations or
  gradients, zero activations), so every rank takes the same branch (no rank skips a collective
  another one enters);
* broadcasts the resulting block and eigenvalues from group rank 0, so the bases are
  bit-identical on every rank whatever the backend's reduction order (O(k d) once per refresh).

Row budget [ours]: each rank keeps at most ``ceil(max_rows / world_size)`` rows, so the global
budget is the single-process ``max_rows``. Without subsampling (rows <= budget) the result equals
a single process on the concatenated batch up to floating-point summation order; with
subsampling the two draw different (equally distributed) rows.

``launch(fn, nproc)`` starts ``nproc`` local processes with a process group (gloo on CPU),
for tests, examples and ``dsbp bench --nproc``. Under ``torchrun`` no launcher is needed: call
``torch.distributed.init_process_group`` and build :class:`DistributedDSBP`.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dsbp.core.covariance import covariance, trace_of_covariance
from dsbp.core.eigen import block_power_iteration, top_eigh
from dsbp.layers.state import LayerState
from dsbp.optim.dsbp import DSBP
from dsbp.optim.projector import SpectralProjector

__all__ = ["DistributedDSBP", "DistributedSpectralProjector", "free_port", "launch"]


class DistributedSpectralProjector(SpectralProjector):
    """A :class:`~dsbp.SpectralProjector` whose bases are those of the global (all-rank) batch.

    Args:
        model: the network (or its ``DistributedDataParallel`` wrapper).
        *args, **kwargs: as for :class:`~dsbp.SpectralProjector`; ``max_rows`` is the *global*
            row budget, split evenly across ranks.
        process_group: the group to synchronise over (default: the world group).

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised.
    """

    def __init__(self, model: nn.Module, *args: Any, process_group=None, **kwargs: Any) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("DistributedSpectralProjector needs torch.distributed to be "
                               "initialised (init_process_group, torchrun, or dsbp launch)")
        super().__init__(model, *args, **kwargs)
        self.group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.global_max_rows = self.max_rows
        self.max_rows = math.ceil(self.global_max_rows / self.world_size)  # per-rank budget
        self._src = dist.get_global_rank(process_group, 0) if process_group is not None else 0

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def _eigensolve(self, st: LayerState, A: torch.Tensor, b: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-b eigenpairs of ``sum_r A_r^T A_r``; same branch logic as the single process."""

        def matvec(V: torch.Tensor) -> torch.Tensor:
            return self._all_reduce(A.T @ (A @ V))  # (d, b): the O(k d) message

        d = A.shape[1]
        if st.block is not None and st.block.shape == (d, b):
            return block_power_iteration(matvec, st.block.to(A.dtype), self.power_iters)
        if d <= self.exact_threshold:
            return top_eigh(self._all_reduce(covariance(A)), b)
        V0 = torch.randn(d, b, generator=self._generator(st, 0), dtype=A.dtype).to(A.device)
        return block_power_iteration(matvec, V0, self.cold_iters)

    def _checked_trace(self, st: LayerState, A: torch.Tensor, grad: torch.Tensor | None
                       ) -> torch.Tensor | None:
        """The single-process checks, agreed across ranks in one collective.

        Every rank sees the same flags and the same summed trace, so no rank skips a
        collective that the others enter.
        """
        flags = torch.stack([
            torch.tensor(float(A.shape[0] == 0), device=A.device, dtype=torch.float64),
            (~torch.isfinite(A)).sum().to(torch.float64),
            (torch.zeros((), device=A.device) if grad is None
             else (~torch.isfinite(grad)).sum()).to(torch.float64),
            trace_of_covariance(A).to(torch.float64),
        ])
        missing, bad_a, bad_g, tr = self._all_reduce(flags).tolist()
        if missing > 0:
            self._warn(st, "refresh due but some rank captured no activations (was the "
                       "forward pass run in train mode with grad enabled?); keeping the old basis")
            return None
        if bad_a > 0:
            self._warn(st, "non-finite activations on some rank; refresh skipped, old basis kept")
            return None
        if bad_g > 0:
            self._warn(st, "non-finite gradient; refresh skipped, old basis kept")
            return None
        if not tr > 0:
            self._warn(st, "all captured activations are zero; refresh skipped")
            return None
        return torch.tensor(tr, dtype=self.eig_dtype, device=A.device)

    def _commit(self, st: LayerState, V: torch.Tensor, evals: torch.Tensor, tr: torch.Tensor
                ) -> None:
        """Broadcast rank 0's basis (bit-identical bases everywhere), then the usual bookkeeping."""
        V, evals = V.contiguous(), evals.contiguous()
        dist.broadcast(V, src=self._src, group=self.group)
        dist.broadcast(evals, src=self._src, group=self.group)
        super()._commit(st, V, evals, tr)


class DistributedDSBP(DSBP):
    """:class:`~dsbp.DSBP` with a :class:`DistributedSpectralProjector` (same arguments).

    Use with ``DistributedDataParallel`` (which averages the gradients)::

        dist.init_process_group("nccl")            # torchrun sets the environment
        ddp = DistributedDataParallel(model.cuda())
        opt = DistributedDSBP(ddp.module, torch.optim.SGD, rank=10, lr=0.1, momentum=0.9)

    Args:
        model, base_optimizer, rank, interval, power_iters, side, sharpness, max_rows, layers,
            params, projector_kwargs, **base_kwargs: as for :class:`~dsbp.DSBP`.
        process_group: the group the bases are synchronised over (default: world).
    """

    projector_class = DistributedSpectralProjector

    def __init__(self, model: nn.Module, *args: Any, process_group=None,
                 projector_kwargs: dict | None = None, **kwargs: Any) -> None:
        super().__init__(model, *args, projector_kwargs={**(projector_kwargs or {}),
                                                         "process_group": process_group},
                         **kwargs)


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn: Callable, nproc: int, backend: str, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank))
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=nproc)
    try:
        fn(rank, nproc, *args)
    finally:
        dist.destroy_process_group()


def launch(fn: Callable[..., Any], nproc: int, args: tuple = (), backend: str | None = None
           ) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``nproc`` local processes with a process group.

    Args:
        fn: a picklable (module-level) function; it runs with ``torch.distributed`` initialised
            and ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` set.
        nproc: number of processes (>= 1). With CUDA and the nccl backend, process i uses
            GPU i.
        args: extra positional arguments for ``fn`` (picklable).
        backend: ``"gloo"`` (default without CUDA) or ``"nccl"`` (default with
            ``torch.cuda.device_count() >= nproc``).

    Raises:
        ValueError: nproc < 1, or nccl asked with fewer GPUs than processes.
        torch.multiprocessing.ProcessRaisedException: a worker raised (its traceback is shown).
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive integer, got {nproc!r}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= nproc \
            else "gloo"
    if backend == "nccl" and torch.cuda.device_count() < nproc:
        raise ValueError(f"nccl with nproc={nproc} needs {nproc} GPUs, found "
                         f"{torch.cuda.device_count()}")
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(fn, nproc, backend, free_port(), args), nprocs=nproc, join=True)
