"""How a projector's sums and weight shards cross processes: the distribution policy object.

The projector never calls ``torch.distributed`` itself. Everything that would differ between
one process, data parallelism (DDP) and sharded data parallelism (FSDP2) goes through one
small object passed in at construction (the kfac-pytorch pattern: the policy is an argument,
not a subclass). :class:`Communicator` is the single-process policy: every method is the
identity. :mod:`dsbp.optim.distributed` implements the multi-process ones.

What the projector asks of it:

* refresh: ``all_reduce_sum`` of the matrix-free products ``A_r^T (A_r V)`` (d, b), of the
  explicit covariance on an exact cold start (d x d, only while d is small), and of the health
  counts; ``broadcast_`` of the committed basis and eigenvalues (bit-identical bases);
  ``row_budget`` splits the global ``max_rows`` over the ranks;
* projection: ``local`` gives the part of a parameter or gradient this rank holds (a plain
  tensor whose in-place edits reach the parameter / gradient), ``row_slice`` which rows of the
  full (d_out, d_in) matrix that is, and ``sum_over_row_shards`` adds up the thin products that
  a row-sharded output-side projection needs (``E^T G = sum_r E_r^T G_r``);
* ``check_params`` refuses parameters this policy cannot handle (the single-process policy
  refuses sharded DTensor parameters and names ``DistributedDSBP``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (without importing it eagerly)."""
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


class Communicator:
    """The single-process policy: nothing is reduced, gathered or sharded."""

    world_size: int = 1
    rank: int = 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place; returns ``t``."""
        return t

    def broadcast_(self, t: torch.Tensor) -> torch.Tensor:
        """Overwrite ``t`` with the source rank's copy, in place; returns ``t``."""
        return t

    def row_budget(self, max_rows: int) -> int:
        """Activation rows this rank keeps for a refresh, out of a global ``max_rows``."""
        return max_rows

    def local(self, t: torch.Tensor) -> torch.Tensor:
        """The part of parameter or gradient ``t`` that this rank holds (in-place edits reach
        ``t``)."""
        return t

    def row_slice(self, param: torch.Tensor) -> slice:
        """Rows (dim 0) of the full parameter that :meth:`local` holds."""
        return slice(None)

    def sum_over_row_shards(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks that hold the other row shards of one weight, in place."""
        return t

    def check_params(self, params: Iterable[torch.Tensor]) -> None:
        """Raise for parameters this policy cannot project correctly."""
        for p in params:
            if is_dtensor(p):
                raise TypeError(
                    "this model's parameters are DTensors (FSDP2 / fully_shard): a "
                    "single-process DSBP would project each shard on its own. Use "
                    "dsbp.DistributedDSBP (or SubspaceAdam(..., distributed=True))")
