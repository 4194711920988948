"""Per-weight DSBP state: the tracked basis and its bookkeeping (tensors and plain numbers only).

The basis belongs to the parameter: a weight used by several modules has one state, whose
refreshes pool the activation rows of all its uses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dsbp.layers.hooks import WeightUse

SAVED_KEYS = ("block", "eigenvalues", "trace", "refreshes", "last_refresh", "rank", "interval",
              "sharpness")


@dataclass(eq=False)
class ParamState:
    """Everything DSBP keeps for one projected weight.

    Attributes:
        name: the weight's name (its parameter name less ``.weight``, e.g. ``"fc1"``).
        param: the parameter itself (not saved in state dicts).
        uses: the modules that use it, each with its adapter (at least one).
        index: position among the projector's weights (seeds its private RNG stream).
        side: ``"output"`` or ``"input"``.
        rank, interval, sharpness: k, p and beta for this weight.
        block: (d, b) orthonormal Ritz vectors, b = min(d, k + oversample); the first k columns
            are the basis ``E``. None until the first refresh.
        eigenvalues: (b,) Ritz values, descending.
        trace: trace of the activation covariance at the last refresh (0-d tensor).
        refreshes: eigensolves done. last_refresh: step of the last one (-1: never).
        rows: activation rows captured for the pending refresh (transient, never saved).
        captures: forward calls captured for the pending refresh (seeds row subsampling).
        k_active: rank chosen by the energy rule at the last refresh (None: use ``rank``).
        in_span_step: the last step whose gradient a low-rank backward already projected.
    """

    name: str
    param: nn.Parameter
    uses: list[WeightUse]
    index: int
    side: str
    rank: int
    interval: int
    sharpness: float
    block: torch.Tensor | None = None
    eigenvalues: torch.Tensor | None = None
    trace: torch.Tensor | None = None
    refreshes: int = 0
    last_refresh: int = -1
    rows: list[torch.Tensor] = field(default_factory=list)
    captures: int = 0
    k_active: int | None = None
    in_span_step: int = -1

    @property
    def grad(self) -> torch.Tensor:
        """The parameter's gradient (callers check that there is one)."""
        g = self.param.grad
        assert g is not None, f"weight {self.name!r} has no gradient"
        return g

    @property
    def module(self) -> nn.Module:
        """The first module that uses this weight."""
        return self.uses[0].module

    def matrix(self, t: torch.Tensor) -> torch.Tensor:
        """(d_out, d_in) view of this weight, or of a tensor shaped like it (its gradient)."""
        u = self.uses[0]
        return u.adapter.matrix(u.module, u.attr, t)

    def __post_init__(self) -> None:
        d_out, d_in = self.matrix(torch.empty(self.param.shape, device="meta")).shape
        self.shape = (int(d_out), int(d_in))  # of the full weight, also when it is sharded

    @property
    def dim(self) -> int:
        """Width d of the covariance on this weight's side."""
        d_out, d_in = self.shape
        return d_out if self.side == "output" else d_in

    def write_matrix(self, t: torch.Tensor, M: torch.Tensor, copy: bool = False) -> None:
        """Make ``t`` (this weight's gradient) hold the matrix ``M``: nothing to do when ``M``
        is already the in-place edited view of ``t`` (``copy=False``), else a copy."""
        view = self.matrix(t)
        if view.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
            if copy or M.data_ptr() != view.data_ptr():
                view.copy_(M)
        else:  # t's layout (channels-last) made the matrix a copy: write back through reshape
            t.copy_(M.reshape(t.shape))

    @property
    def k(self) -> int:
        """Effective rank: ``rank`` (or the energy rule's choice) clipped to the block width."""
        assert self.block is not None
        k = self.rank if self.k_active is None else min(self.k_active, self.rank)
        return min(k, self.block.shape[1])

    @property
    def basis(self) -> torch.Tensor:
        """E (d, k)."""
        assert self.block is not None
        return self.block[:, : self.k]

    def sharpness_scale(self) -> torch.Tensor:
        """``beta * lambda_1 / trace(C)``, a 0-d tensor (no host sync), cached until the
        eigenvalues, trace or beta change."""
        assert self.eigenvalues is not None and self.trace is not None
        key = (self.eigenvalues, self.eigenvalues._version, self.trace, self.trace._version,
               self.sharpness)
        hit = self.__dict__.get("_scale")
        if hit is None or len(hit[0]) != len(key) or any(
                (a is not b) if isinstance(a, torch.Tensor) else a != b
                for a, b in zip(hit[0], key, strict=True)):
            hit = self.__dict__["_scale"] = (key, self.eigenvalues[0] / self.trace
                                             * self.sharpness)
        return hit[1]

    def due(self, step: int) -> bool:
        """Whether a refresh is due at ``step`` (first step, then every ``interval`` steps)."""
        return self.last_refresh < 0 or step - self.last_refresh >= self.interval

    def to_dict(self) -> dict:
        return {
            "block": self.block,
            "eigenvalues": self.eigenvalues,
            "trace": self.trace,
            "refreshes": self.refreshes,
            "last_refresh": self.last_refresh,
            "rank": self.rank,
            "interval": self.interval,
            "sharpness": self.sharpness,
            "k_active": -1 if self.k_active is None else self.k_active,
        }

    def check_dict(self, d: Mapping[str, Any], block_width: int) -> None:
        """Raise ``ValueError`` naming this weight if ``d`` cannot be this weight's state."""
        def bad(msg: str) -> ValueError:
            return ValueError(f"DSBP state for weight {self.name!r}: {msg}")

        missing = [k for k in SAVED_KEYS if k not in d]
        if missing:
            raise bad(f"missing keys {missing}")
        rank, interval = d["rank"], d["interval"]
        for key, v in (("rank", rank), ("interval", interval)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise bad(f"{key} must be a positive integer, got {v!r}")
        if int(rank) != self.rank:
            raise bad(f"saved with rank {rank}, this optimizer uses rank {self.rank} "
                      "(configure the same rank, or load into a matching optimizer)")
        s = float(d["sharpness"])
        if not (math.isfinite(s) and s >= 0):
            raise bad(f"sharpness must be finite and >= 0, got {s!r}")
        block, evals, trace = d["block"], d["eigenvalues"], d["trace"]
        if block is None:
            if evals is not None or trace is not None:
                raise bad("eigenvalues or trace without a basis")
            return
        if not isinstance(block, torch.Tensor) or block.dim() != 2:
            raise bad("block must be a (d, b) tensor")
        if block.shape[0] != self.dim:
            raise bad(f"basis has d={block.shape[0]}, this weight's {self.side} side has "
                      f"d={self.dim} (a different model or side?)")
        if block.shape[1] > block_width:
            raise bad(f"basis has {block.shape[1]} columns, at most {block_width} expected "
                      "(a larger rank or oversample?)")
        if not isinstance(evals, torch.Tensor) or evals.shape != (block.shape[1],):
            raise bad("eigenvalues must be a vector with one entry per basis column")
        if not isinstance(trace, torch.Tensor) or trace.numel() != 1:
            raise bad("trace must be a scalar tensor")
        if not (torch.isfinite(block).all() and torch.isfinite(evals).all()
                and torch.isfinite(trace).all()):
            raise bad("basis, eigenvalues or trace are not finite")
        if not float(trace) > 0:
            raise bad(f"trace must be > 0, got {float(trace)}")

    def load_dict(self, d: Mapping[str, Any]) -> None:
        def clone(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().clone().to(self.param.device)

        self.block, self.eigenvalues, self.trace = (
            clone(d["block"]), clone(d["eigenvalues"]), clone(d["trace"])
        )
        self.refreshes = int(d["refreshes"])
        self.last_refresh = int(d["last_refresh"])
        self.rank, self.interval = int(d["rank"]), int(d["interval"])
        self.sharpness = float(d["sharpness"])
        ka = int(d.get("k_active", -1))
        self.k_active = None if ka < 0 else ka
        self.rows, self.captures = [], 0


LayerState = ParamState  # the name used before the state belonged to the parameter
