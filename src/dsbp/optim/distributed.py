"""Multi-process DSBP: the process-group distribution policy, for DDP and FSDP2.

The projector never calls ``torch.distributed`` itself: it asks a
:class:`~dsbp.optim.comm.Communicator` (see :mod:`dsbp.optim.comm`). This module implements the
multi-process one, :class:`ProcessGroupCommunicator`, and :class:`DistributedDSBP`, which is
:class:`~dsbp.DSBP` with that communicator.

**DDP** (parameters and averaged gradients replicated on every rank). Every rank projects the
same gradient; what must agree is the basis. Each rank only sees its own activations ``A_r``
(n_r, d), and the covariance of the global batch is ``C = sum_r A_r^T A_r``, so a refresh

* all-reduces (SUM) the matrix-free products ``A_r^T (A_r V)`` (d, b) inside the block power
  iteration and the Rayleigh-Ritz step: ``C V`` for the concatenated batch, O(k d) numbers per
  iteration and layer, never the d x d covariance (except an exact cold start while
  ``d <= exact_threshold``, once);
* all-reduces ``trace(C)`` and the health counts, so every rank takes the same branch;
* broadcasts the resulting block and eigenvalues from the group's rank 0, so the bases are
  bit-identical on every rank whatever the backend's reduction order.

**FSDP2** (``torch.distributed.fsdp.fully_shard``: parameters and gradients are ``DTensor``\\ s
sharded ``Shard(0)``, i.e. by rows, on a 1-D device mesh). Activations are not sharded (each
rank runs the whole layer on its own data), so the refresh is the DDP one. The projection runs
on this rank's rows ``G_r`` of each gradient (:meth:`ProcessGroupCommunicator.local`, an
in-place view of the DTensor's local shard) with the matching rows ``E_r`` of an output-side
basis (:meth:`~ProcessGroupCommunicator.row_slice`):

* input side ``G_r E E^T`` (and the sharpness term ``W_r e1 e1^T``) is row-local: no
  communication at all per step;
* output side ``E E^T G`` needs ``E^T G = sum_r E_r^T G_r`` (and ``e1^T W``): one all-reduce of
  a (k + 1, d_in) matrix per layer and step over the shard group
  (:meth:`~ProcessGroupCommunicator.sum_over_row_shards`), then ``G_r <- E_r (E^T G)`` locally.

Nothing is ever gathered: the all-gather alternative (assemble each full gradient, project it,
keep the own rows) moves ``(W - 1) / W`` of every weight per step instead.

Row budget [ours]: each rank keeps at most ``ceil(max_rows / world_size)`` rows, so the global
budget is the single-process ``max_rows``. Without subsampling (rows <= budget) the bases equal a
single process on the concatenated batch up to floating-point summation order.

Every collective's payload is counted (:attr:`ProcessGroupCommunicator.stats`), which is how
``benchmarks/communication.py`` measures bytes per refresh and per step.

``launch(fn, nproc)`` starts ``nproc`` local processes with a process group (gloo on CPU),
for tests, examples and ``dsbp bench --nproc``. Under ``torchrun`` no launcher is needed: call
``torch.distributed.init_process_group`` and build :class:`DistributedDSBP`.
"""

from __future__ import annotations

import io
import math
import os
import socket
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dsbp.optim.comm import Communicator, is_dtensor
from dsbp.optim.dsbp import DSBP
from dsbp.optim.projector import SpectralProjector

__all__ = ["CommStats", "DistributedDSBP", "DistributedSpectralProjector",
           "ProcessGroupCommunicator", "free_port", "launch", "load_checkpoint",
           "save_checkpoint", "shard_model"]


class CommStats:
    """Calls and payload bytes per collective kind, as a :class:`ProcessGroupCommunicator`
    issued them (this rank's tensors; the bytes a backend puts on the wire differ by its
    algorithm, e.g. a ring all-reduce sends ``2 (W - 1) / W`` times the payload per rank)."""

    KINDS = ("all_reduce_sum", "broadcast_", "sum_over_row_shards")

    def __init__(self) -> None:
        self.calls: dict[str, int] = dict.fromkeys(self.KINDS, 0)
        self.bytes: dict[str, int] = dict.fromkeys(self.KINDS, 0)

    def add(self, kind: str, t: torch.Tensor) -> None:
        self.calls[kind] += 1
        self.bytes[kind] += t.numel() * t.element_size()

    def reset(self) -> None:
        for k in self.KINDS:
            self.calls[k] = self.bytes[k] = 0

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {"calls": dict(self.calls), "bytes": dict(self.bytes)}

    def total_bytes(self) -> int:
        return sum(self.bytes.values())


def _shard_rows(param: torch.Tensor) -> slice:
    """Rows (dim 0) of the global parameter that this rank's shard of DTensor ``param`` holds.

    Uneven shards (FSDP2 gives the first ranks ``ceil(n / W)`` rows) and empty shards (a rank
    past the last row: an empty slice) included.
    """
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(
        param.shape, param.device_mesh, param.placements)  # type: ignore[attr-defined]
    start = int(offset[0]) if shape[0] > 0 else int(param.shape[0])
    return slice(start, start + int(shape[0]))


def _check_row_sharded(p: torch.Tensor, name: str) -> None:
    """Raise unless DTensor ``p`` is sharded by rows on a 1-D mesh (FSDP2's layout)."""
    from torch.distributed.tensor import Shard

    mesh, placements = p.device_mesh, p.placements  # type: ignore[attr-defined]
    if mesh.ndim != 1 or len(placements) != 1 or not (
            isinstance(placements[0], Shard) and placements[0].dim == 0):
        raise TypeError(
            f"{name} is a DTensor with placements {tuple(placements)} on a {mesh.ndim}-D mesh; "
            "DSBP's distributed projection supports FSDP2's layout only: Shard(0) on a 1-D "
            "mesh (fully_shard over one data-parallel group). Tensor parallelism (other "
            "placements) and HSDP (2-D meshes) are not supported")


class ProcessGroupCommunicator(Communicator):
    """The distribution policy for data parallelism over a process group: DDP and FSDP2.

    * ``all_reduce_sum`` / ``broadcast_``: collectives over ``process_group`` (the
      data-parallel group; ``broadcast_`` from its rank 0), used by the refresh;
    * ``row_budget``: ``ceil(max_rows / world_size)`` rows per rank;
    * ``local`` / ``row_slice``: identity for plain tensors (DDP); for FSDP2's DTensors the
      local shard (``to_local()``, whose in-place edits reach the parameter / gradient) and the
      global rows it holds;
    * ``sum_over_row_shards``: identity for replicated weights (DDP); an all-reduce over the
      shard group for row-sharded ones (FSDP2);
    * ``check_params``: accepts plain tensors and ``Shard(0)`` DTensors on a 1-D mesh over the
      same ranks as ``process_group``; refuses other layouts (tensor parallelism, HSDP) and a
      mix of sharded and replicated projected weights.

    Args:
        process_group: the data-parallel group (default: the world group).

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised.
    """

    def __init__(self, process_group: Any = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("a distributed DSBP needs torch.distributed to be initialised "
                               "(init_process_group, torchrun, or dsbp.optim.distributed.launch)")
        self.group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self._src = dist.get_global_rank(process_group, 0) if process_group is not None else 0
        self.sharded: bool | None = None  # set by check_params: FSDP2 (True) or DDP (False)
        self._shard_group: Any = None
        self.stats = CommStats()

    # ---------------------------------------------------------------- refresh
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            self.stats.add("all_reduce_sum", t)
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def broadcast_(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            self.stats.add("broadcast_", t)
            dist.broadcast(t, src=self._src, group=self.group)
        return t

    def row_budget(self, max_rows: int) -> int:
        return math.ceil(max_rows / self.world_size)

    # ---------------------------------------------------------------- projection
    def local(self, t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]

    def row_slice(self, param: torch.Tensor) -> slice:
        return _shard_rows(param) if is_dtensor(param) else slice(None)

    def sum_over_row_shards(self, t: torch.Tensor, param: torch.Tensor | None = None
                            ) -> torch.Tensor:
        """Sum ``t`` over the ranks holding the other row shards, in place (FSDP2); the
        identity for replicated weights (DDP). ``param``, when given, decides which of the two
        applies; without it, the layout :meth:`check_params` found."""
        sharded = is_dtensor(param) if param is not None else self.sharded
        if sharded is None:
            raise RuntimeError("sum_over_row_shards before check_params: the communicator does "
                               "not know whether the weights are sharded")
        if sharded and self.world_size > 1:
            self.stats.add("sum_over_row_shards", t)
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self._shard_group)
        return t

    def check_params(self, params: Iterable[torch.Tensor]) -> None:
        params = list(params)
        sharded = [is_dtensor(p) for p in params]
        if any(sharded) and not all(sharded):
            raise TypeError(
                f"{sum(sharded)} of the {len(params)} projected weights are FSDP2 DTensors and "
                "the others plain tensors: wrap every projected layer with fully_shard (e.g. "
                "call fully_shard on the root module too), or leave the plain ones out with "
                "layers= / exclude=")
        if any(sharded):
            groups = set()
            for i, p in enumerate(params):
                _check_row_sharded(p, f"projected weight {i} {tuple(p.shape)}")
                groups.add(p.device_mesh.get_group(0))  # type: ignore[attr-defined]
            if len(groups) != 1:
                raise TypeError("the projected weights are sharded over different device "
                                "meshes; DSBP expects one fully_shard mesh")
            group = groups.pop()
            mine = dist.get_process_group_ranks(
                self.group if self.group is not None else dist.group.WORLD)
            if sorted(dist.get_process_group_ranks(group)) != sorted(mine):
                raise TypeError(
                    "the weights are sharded over a device mesh whose ranks "
                    f"{sorted(dist.get_process_group_ranks(group))} differ from the process "
                    f"group's {sorted(mine)}: pass the FSDP2 mesh's group as process_group")
            self._shard_group = group
        self.sharded = any(sharded)

    def __repr__(self) -> str:
        layout = {None: "unchecked", True: "FSDP2 row shards", False: "replicated (DDP)"}
        return (f"ProcessGroupCommunicator(world_size={self.world_size}, rank={self.rank}, "
                f"weights={layout[self.sharded]})")


class DistributedSpectralProjector(SpectralProjector):
    """A :class:`~dsbp.SpectralProjector` with ``comm=ProcessGroupCommunicator(process_group)``:
    for driving your own optimizer under DDP or FSDP2 (and what ``SubspaceAdam(...,
    distributed=True)`` builds). Same arguments as the projector, plus ``process_group``;
    ``max_rows`` is the global row budget.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised.
    """

    def __init__(self, model: nn.Module, *args: Any, process_group: Any = None,
                 **kwargs: Any) -> None:
        super().__init__(model, *args, comm=ProcessGroupCommunicator(process_group), **kwargs)


class DistributedDSBP(DSBP):
    """:class:`~dsbp.DSBP` whose projector synchronises over a process group (DDP or FSDP2).

    The same arguments as :class:`~dsbp.DSBP`, plus ``process_group``; ``max_rows`` is the
    global row budget. Build it *after* wrapping the model (``fully_shard`` replaces the
    parameters by DTensors), on the unwrapped module for DDP::

        dist.init_process_group("nccl")            # torchrun sets the environment
        ddp = DistributedDataParallel(model.cuda())
        opt = DistributedDSBP(ddp.module, torch.optim.SGD, rank=10, lr=0.1, momentum=0.9)

        for block in model.blocks: fully_shard(block)   # FSDP2: per block and at the root
        fully_shard(model)
        opt = DistributedDSBP(model, torch.optim.AdamW, rank=16, lr=1e-3)

    The training loop is the plain one (``loss.backward(); opt.step(); opt.zero_grad()``).

    Args:
        model, base_optimizer, rank, interval, power_iters, side, sharpness, max_rows, layers,
            params, projector_kwargs, **base_kwargs: as for :class:`~dsbp.DSBP`.
        process_group: the data-parallel group (default: world). Under FSDP2 it must span the
            ranks of the ``fully_shard`` mesh.

    Attributes:
        comm: the :class:`ProcessGroupCommunicator` (its ``stats`` count the bytes moved).
    """

    def __init__(self, model: nn.Module, *args: Any, process_group=None,
                 projector_kwargs: dict | None = None, **kwargs: Any) -> None:
        kwargs["projector_kwargs"] = {**(projector_kwargs or {}),
                                      "comm": ProcessGroupCommunicator(process_group)}
        super().__init__(model, *args, **kwargs)

    @property
    def comm(self) -> ProcessGroupCommunicator:
        comm = self.projector.comm
        assert isinstance(comm, ProcessGroupCommunicator)
        return comm


def shard_model(model: nn.Module, units: Iterable[nn.Module] | None = None) -> list[str]:
    """Wrap ``model`` with FSDP2's ``fully_shard``: each unit, then the root.

    Args:
        model: the model (on its device; build the optimizer afterwards).
        units: the modules to shard as their own units (all-gathered one at a time). Default:
            the elements of every ``nn.ModuleList`` (transformer blocks), else every direct
            child of the root that has parameters.

    Returns:
        The names of the units (the root, ``""``, last).
    """
    from torch.distributed.fsdp import fully_shard

    names = {id(m): n for n, m in model.named_modules()}
    if units is None:
        units = [m for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst]
        if not units:
            units = [m for m in model.children() if any(True for _ in m.parameters())]
    done = []
    for m in units:
        fully_shard(m)
        done.append(names.get(id(m), type(m).__name__))
    fully_shard(model)
    return [*done, ""]


# ---------------------------------------------------------------------------- checkpoints
def _blob(obj: Any) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def _unblob(buf: io.BytesIO) -> Any:
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _is_subspace_adam(optimizer: torch.optim.Optimizer) -> bool:
    return hasattr(optimizer, "projector") and hasattr(optimizer, "is_subspace") \
        and not hasattr(optimizer, "base_optimizer")


def _subspace_layout(model: nn.Module, optimizer: Any) -> dict[int, tuple[str, Any]]:
    """id(param) -> (name, its ParamState if its moments live in basis coordinates, else None)."""
    states = {id(st.param): st for st in optimizer.projector.states()}
    return {id(p): (n, states[id(p)] if optimizer.is_subspace(p) else None)
            for n, p in model.named_parameters()}


def _moment_for_dcp(m: torch.Tensor, p: torch.Tensor, st: Any) -> torch.Tensor:
    """An input-side subspace moment (rows, k) of a row-sharded weight as the DTensor it is
    (Shard(0) like the weight), so that DCP saves every rank's rows and can reshard them."""
    if st is None or st.side != "input" or not is_dtensor(p):
        return m  # full-state (already a DTensor under FSDP2) or replicated (k, d_in)
    from torch.distributed.tensor import DTensor

    k = m.shape[1]
    return DTensor.from_local(m, p.device_mesh, p.placements,  # type: ignore[attr-defined]
                              run_check=False, shape=torch.Size((st.shape[0], k)),
                              stride=(k, 1))


def _subspace_state(model: nn.Module, optimizer: Any) -> tuple[dict, dict]:
    """SubspaceAdam's moments keyed by parameter name, ready for DCP, and a manifest (which
    parameters have which state entries, and the param groups' settings)."""
    layout = _subspace_layout(model, optimizer)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    keys: dict[str, list[str]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            name, st = layout[id(p)]
            keys[name] = sorted(state)
            tensors[name] = {k: (_moment_for_dcp(v, p, st) if k != "step" else v)
                             for k, v in state.items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return tensors, {"keys": keys, "groups": groups}


def _checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What :func:`save_checkpoint` writes: the model's and the optimizer's state in
    torch.distributed.checkpoint's form (keyed by parameter name, DTensors kept sharded), and
    the projector's state (bases replicated on every rank) as one serialised object."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    proj = getattr(optimizer, "projector", None)
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if _is_subspace_adam(optimizer):
        tensors, manifest = _subspace_state(model, optimizer)
        state["subspace"] = tensors
        state["subspace_manifest"] = _blob(manifest)
    else:
        base = getattr(optimizer, "base_optimizer", None)
        if proj is not None and not isinstance(base, torch.optim.Optimizer):
            raise NotImplementedError(
                f"{type(optimizer).__name__} has a projector but neither a base optimizer "
                "(DSBP) nor SubspaceAdam's layout; save_checkpoint cannot save it")
        state["optim"] = get_optimizer_state_dict(model, base if base is not None else optimizer)
    if proj is not None:
        state["projector"] = _blob(proj.state_dict())
    return state


def save_checkpoint(checkpoint_id: str | os.PathLike, model: nn.Module,
                    optimizer: torch.optim.Optimizer) -> None:
    """Save model and optimizer with ``torch.distributed.checkpoint`` (DCP), every rank calling.

    Under FSDP2 each rank writes its own shards of the weights and of the optimizer's state
    (a base optimizer's moments, SubspaceAdam's full-state moments and its input-side (rows, k)
    moments); DSBP's bases and SubspaceAdam's output-side (k, d_in) moments, identical on every
    rank, are written once. Works for one process too.

    Args:
        checkpoint_id: a directory.
        model: the (``fully_shard``-wrapped, DDP-unwrapped, or plain) model.
        optimizer: :class:`~dsbp.DSBP` / :class:`DistributedDSBP`, SubspaceAdam, or a torch
            optimizer.

    Raises:
        NotImplementedError: an optimizer with a projector that is neither.
    """
    import torch.distributed.checkpoint as dcp

    dcp.save(_checkpoint_state(model, optimizer), checkpoint_id=checkpoint_id)


def _load_subspace(checkpoint_id: str | os.PathLike, model: nn.Module, optimizer: Any) -> None:
    """SubspaceAdam: the projector and the manifest first (they fix every moment's shape),
    then the moments into zero templates of those shapes on this rank's shards."""
    import torch.distributed.checkpoint as dcp

    head = {"projector": io.BytesIO(), "subspace_manifest": io.BytesIO()}
    dcp.load(head, checkpoint_id=checkpoint_id)
    optimizer.projector.load_state_dict(_unblob(head["projector"]))
    manifest = _unblob(head["subspace_manifest"])
    layout = _subspace_layout(model, optimizer)
    params = dict(model.named_parameters())
    templates: dict[str, dict[str, torch.Tensor]] = {}
    for name, keys in manifest["keys"].items():
        p = params[name]
        st = layout[id(p)][1]
        entry = {}
        for k in keys:
            if k == "step":
                entry[k] = torch.zeros((), dtype=torch.float32)
            elif st is None:
                entry[k] = torch.zeros_like(p)
            else:
                kk, local = st.basis.shape[1], optimizer.comm.local(p)
                rows = local.shape[0] if st.side == "input" else kk
                cols = kk if st.side == "input" else st.shape[1]
                m = torch.zeros(rows, cols, dtype=st.basis.dtype, device=local.device)
                entry[k] = _moment_for_dcp(m, p, st)
        templates[name] = entry
    body = {"subspace": templates}
    dcp.load(body, checkpoint_id=checkpoint_id)
    optimizer.state.clear()
    for name, entry in body["subspace"].items():
        p, st = params[name], layout[id(params[name])][1]
        optimizer.state[p] = {
            k: (v.to_local() if st is not None and is_dtensor(v) else v)  # type: ignore[attr-defined]
            for k, v in entry.items()}
    for group, saved in zip(optimizer.param_groups, manifest["groups"], strict=True):
        group.update(saved)


def load_checkpoint(checkpoint_id: str | os.PathLike, model: nn.Module,
                    optimizer: torch.optim.Optimizer) -> None:
    """Load what :func:`save_checkpoint` wrote into ``model`` and ``optimizer``, in place.

    DCP reshards: a checkpoint saved on W ranks loads on any number of ranks, with or without
    FSDP2 (one process without a process group included), as long as the model and the
    optimizer have the same parameters; the projector's state is replicated and loads as is.
    Build the optimizer exactly as for the saved run (same ``rank``, ``side``, layers).

    Raises:
        NotImplementedError: as :func:`save_checkpoint`.
        ValueError: the checkpoint has no projector state but the optimizer has a projector,
            or the projector's layers or side differ.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = _checkpoint_state(model, optimizer)
    if _is_subspace_adam(optimizer):
        model_only = {"model": state["model"]}
        dcp.load(model_only, checkpoint_id=checkpoint_id)
        set_model_state_dict(model, model_only["model"])
        _load_subspace(checkpoint_id, model, optimizer)
        return
    dcp.load(state, checkpoint_id=checkpoint_id)
    set_model_state_dict(model, state["model"])
    inner = getattr(optimizer, "base_optimizer", None) or optimizer
    set_optimizer_state_dict(model, inner, state["optim"])
    proj = getattr(optimizer, "projector", None)
    if proj is not None:
        saved = _unblob(state["projector"])
        if not isinstance(saved, dict) or "layers" not in saved:
            raise ValueError(f"checkpoint {checkpoint_id} has no DSBP projector state")
        proj.load_state_dict(saved)


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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

    for attempt in range(3):
        try:
            mp.spawn(_worker, args=(fn, nproc, backend, free_port(), args), nprocs=nproc,
                     join=True)
            return
        except mp.ProcessRaisedException as err:
            # free_port() releases the port before the workers bind it: another process may
            # take it in between. Only that failure is retried, on a new port.
            text = str(err)
            if attempt == 2 or not ("EADDRINUSE" in text or "Address already in use" in text):
                raise
