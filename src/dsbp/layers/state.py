"""Per-layer DSBP state: the tracked basis and its bookkeeping (tensors and plain numbers only)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(eq=False)
class LayerState:
    """Everything DSBP keeps for one layer.

    Attributes:
        name: the module's qualified name in the model.
        module: the Linear / Conv2d itself (not saved in state dicts).
        index: position among the projector's layers (seeds its private RNG stream).
        side: ``"output"`` or ``"input"``.
        rank: k, the number of eigenvectors the projection keeps.
        interval: p, steps between refreshes.
        sharpness: beta, the weight of the sharpness term.
        block: (d, b) orthonormal Ritz vectors, b = min(d, k + oversample); the first k columns
            are the basis ``E``. None until the first refresh.
        eigenvalues: (b,) Ritz values, descending.
        trace: trace of the activation covariance at the last refresh (0-d tensor).
        refreshes: number of eigensolves done.
        last_refresh: step of the last eigensolve (-1: never).
        rows: activation rows captured for the pending refresh (transient, never saved).
        captures: forward passes captured for the pending refresh (seeds row subsampling).
        k_active: rank chosen by the energy rule at the last refresh (None: use ``rank``).
    """

    name: str
    module: nn.Module
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

    @property
    def k(self) -> int:
        """Effective rank: ``rank`` clipped to the block width."""
        assert self.block is not None
        k = self.rank if self.k_active is None else min(self.k_active, self.rank)
        return min(k, self.block.shape[1])

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

    def load_dict(self, d: dict) -> None:
        def clone(t):
            return None if t is None else t.detach().clone().to(self.module.weight.device)

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
