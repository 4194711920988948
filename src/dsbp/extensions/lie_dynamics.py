"""Lie-algebra-inspired dynamics (METHOD.md §2.5): Cayley basis tracking and rotation updates.

Two pieces, both built on :mod:`dsbp.core.lie`:

* :class:`LieSpectralProjector`, a :class:`~dsbp.SpectralProjector` that, *between* its
  eigen-refreshes, tracks each layer's basis on every ``track_every``-th step with one Cayley
  step of the double-bracket flow on the current batch's covariance,

      Omega = C P - P C,  P = E E^T,   E <- Cay(eps * Omega) E,   eps = lie_step / lambda_1,

  in low-rank form (one ``C E = A^T (A E)`` product and a (2b x 2b) solve per layer; no d x d
  matrix). The refresh schedule (every ``interval`` steps, a warm-started block power
  iteration) is the parent's; tracking costs one matrix-free product per step instead of
  ``power_iters`` of them. Before each Cayley step the block is rotated within its own span
  onto the batch's Ritz vectors, so its first k columns stay ordered by eigenvalue (the flow
  itself only converges to the span) **[ours]**. The tracked block is kept in float64 (a
  "master" copy, like mixed-precision master weights) and the float32 copy the projection uses
  is re-cast from it: a Cayley step is orthogonal in exact arithmetic, so orthonormality then
  holds to float32 round-off however many steps run **[ours]**.
* :class:`LieDSBP`, the :class:`~dsbp.DSBP` optimizer on top of that projector, with the
  optional rotation-only update ``W <- Cay(-lr (G~ W^T - W G~^T)) W`` for the projected layers'
  weights (their singular values never change; the base optimizer still steps every other
  parameter: biases, norms).

``eps = lie_step / lambda_1`` with ``lambda_1`` the batch's top Ritz value makes the step
scale-free **[ours]**; the flow's contraction along the eigengap is then about
``lie_step * (lambda_k - lambda_{k+1}) / lambda_1`` per step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from dsbp.core.covariance import subsample_rows, trace_of_covariance
from dsbp.core.lie import double_bracket_step, rotation_update
from dsbp.layers import adapters
from dsbp.layers.state import LayerState
from dsbp.optim.dsbp import DSBP
from dsbp.optim.projector import SpectralProjector

__all__ = ["LieDSBP", "LieSpectralProjector"]


class LieSpectralProjector(SpectralProjector):
    """SpectralProjector whose bases follow the double-bracket flow between refreshes.

    Args:
        model, *args: as for :class:`~dsbp.SpectralProjector` (rank, interval, ...).
        track_every: steps between Cayley tracking steps (1: every step that is not a refresh).
        lie_step: c in ``eps = c / lambda_1`` (default 0.5) [ours].
        **kwargs: the parent's keyword-only arguments (``oversample``, ``seed``, ...).

    Raises:
        ValueError: ``track_every`` not a positive integer or ``lie_step`` not in (0, 4].
    """

    def __init__(
        self,
        model: nn.Module,
        *args: Any,
        track_every: int = 1,
        lie_step: float = 0.5,
        **kwargs: Any,
    ) -> None:
        if isinstance(track_every, bool) or not isinstance(track_every, int) or track_every < 1:
            raise ValueError(f"track_every must be a positive integer, got {track_every!r}")
        lie_step = float(lie_step)
        if not 0.0 < lie_step <= 4.0:
            # Beyond ~2 the Cayley step overshoots along the top direction (it saturates at a
            # reflection); 4 is a generous guard, not a tuned bound.
            raise ValueError(f"lie_step must be in (0, 4], got {lie_step!r}")
        self.track_every, self.lie_step = track_every, lie_step
        self._master: dict[str, torch.Tensor] = {}  # name -> float64 (d, b) tracked block
        self._tracks: dict[str, int] = {}  # name -> Cayley steps taken
        super().__init__(model, *args, **kwargs)

    # ------------------------------------------------------------------ capture / refresh
    def _tracking(self, st: LayerState) -> bool:
        return st.block is not None and not st.due(self.step) and self.step % self.track_every == 0

    def _wants_rows(self, st: LayerState) -> bool:
        """Capture on refresh steps and on tracking steps."""
        return st.due(self.step) or self._tracking(st)

    def _refresh(self, st: LayerState, grad: torch.Tensor | None) -> None:
        before = st.refreshes
        super()._refresh(st, grad)
        if st.refreshes != before:
            self._master[st.name] = st.block.detach().to(torch.float64)

    @torch.no_grad()
    def _track(self, st: LayerState) -> None:
        """One Cayley double-bracket step of ``st``'s block on the captured rows."""
        rows, st.rows, st.captures = st.rows, [], 0
        if not rows:
            return
        A = subsample_rows(
            torch.cat(rows).to(self.eig_dtype), self.max_rows, self._generator(st, 0)
        )
        if not bool(torch.isfinite(A).all()):
            self._warn(st, "non-finite activations; tracking step skipped")
            return
        V = self._master.get(st.name)
        if V is None or V.shape != st.block.shape:
            V = st.block.detach().to(torch.float64)
        # C V in the activations' precision (the costly n x d x b part), the rest in float64:
        # the generator is skew by construction, so its precision does not affect orthonormality.
        Y = (A.T @ (A @ V.to(A.dtype))).to(torch.float64)  # (d, b)
        T = V.T @ Y
        evals, R = torch.linalg.eigh(0.5 * (T + T.T))
        evals, R = evals.flip(0), R.flip(1)
        if not float(evals[0]) > 0:
            return  # all-zero batch: nothing to track
        V, Y = V @ R, Y @ R  # Ritz order within the span; Omega is unchanged by this rotation
        V = double_bracket_step(V, Y, self.lie_step / evals[0])
        self._master[st.name] = V
        st.block = V.to(st.block.dtype)
        st.eigenvalues = evals.to(st.block.dtype)
        st.trace = trace_of_covariance(A)
        self._tracks[st.name] = self._tracks.get(st.name, 0) + 1

    @torch.no_grad()
    def project_(self) -> None:
        """Track non-refreshing layers with one Cayley step, then project as the parent does."""
        for st in self._layers.values():
            if st.rows and not st.due(self.step) and st.block is not None:
                self._track(st)
        super().project_()

    def num_tracking_steps(self, module_or_name: nn.Module | str | None = None) -> int:
        """Cayley tracking steps taken by one layer, or summed over all layers."""
        if module_or_name is None:
            return sum(self._tracks.values())
        return self._tracks.get(self._state(module_or_name).name, 0)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The parent's state plus the float64 tracked blocks and tracking counts."""
        out = super().state_dict()
        out["lie"] = {"master": dict(self._master), "tracks": dict(self._tracks)}
        return out

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict(state)
        lie = state.get("lie", {"master": {}, "tracks": {}})
        self._master = {n: t.detach().clone().to(torch.float64) for n, t in lie["master"].items()}
        self._tracks = {n: int(v) for n, v in lie["tracks"].items()}


class LieDSBP(DSBP):
    """DSBP with Cayley basis tracking, and optionally rotation-only weight updates.

    Args:
        model, base_optimizer, rank, interval, power_iters, side, sharpness, max_rows, layers,
            params: as for :class:`~dsbp.DSBP`.
        track_every, lie_step: see :class:`LieSpectralProjector`.
        rotation: if True, each projected layer's weight is updated by
            ``W <- Cay(-lr (G~ W^T - W G~^T)) W`` (G~ the projected gradient, lr its group's
            learning rate) instead of by the base optimizer; singular values are preserved.
            Other parameters still use the base optimizer. Default False.
        projector_kwargs: extra projector arguments (``oversample``, ``seed``, ...).
        **base_kwargs: the base optimizer's arguments (``lr``, ``momentum``, ...).
    """

    projector_class = LieSpectralProjector

    def __init__(
        self,
        model: nn.Module,
        *args: Any,
        track_every: int = 1,
        lie_step: float = 0.5,
        rotation: bool = False,
        projector_kwargs: dict | None = None,
        **kwargs: Any,
    ) -> None:
        lie = {"track_every": track_every, "lie_step": lie_step}
        super().__init__(model, *args, projector_kwargs={**lie, **(projector_kwargs or {})},
                         **kwargs)
        self.rotation = bool(rotation)

    def _lr_of(self, p: torch.Tensor) -> float:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return float(group["lr"])
        raise ValueError("a projected weight is in no param group of the optimizer")

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Project (tracking bases), optionally rotate the projected weights, step the base."""
        if not self.rotation:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_group_overrides()
        self.projector.project_()
        proj = self.projector
        for name in proj.layer_names():
            st = proj.layer_state(name)
            w = st.module.weight
            if w.grad is None or st.block is None:
                continue
            W = adapters.as_matrix(w)
            G = adapters.as_matrix(w.grad)
            E = st.block[:, : st.k].to(W.dtype)
            new = rotation_update(
                W.double(), G.double(), self._lr_of(w), E=E.double(), side=st.side
            )
            w.copy_(new.view_as(w).to(w.dtype))
            w.grad = None  # the base optimizer skips parameters without a gradient
        self.base_optimizer.step()
        return loss
