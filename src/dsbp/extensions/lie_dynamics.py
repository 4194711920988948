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

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from dsbp.core.covariance import trace_of_covariance
from dsbp.core.lie import double_bracket_step, rotation_update
from dsbp.layers.state import ParamState
from dsbp.optim.dsbp import DSBP
from dsbp.optim.projector import RefreshPolicy, SpectralProjector

__all__ = ["LieDSBP", "LieSpectralProjector", "LieTracking"]


class LieTracking(RefreshPolicy):
    """Refresh policy: the parent's schedule, plus one Cayley double-bracket step of each
    weight's block on the batch's rows every ``track_every`` steps between refreshes."""

    def __init__(self, track_every: int, lie_step: float) -> None:
        self.track_every, self.lie_step = track_every, lie_step
        self.master: dict[str, torch.Tensor] = {}  # name -> float64 (d, b) tracked block
        self.tracks: dict[str, int] = {}  # name -> Cayley steps taken

    def _tracking(self, proj: SpectralProjector, st: ParamState) -> bool:
        return (st.block is not None and not st.due(proj.step)
                and proj.step % self.track_every == 0)

    def wants_rows(self, proj: SpectralProjector, st: ParamState) -> bool:
        """Capture on refresh steps and on tracking steps."""
        return st.due(proj.step) or self._tracking(proj, st)

    def after_refresh(self, proj: SpectralProjector, st: ParamState,
                      old_block: torch.Tensor | None, early: bool) -> None:
        assert st.block is not None
        self.master[st.name] = st.block.detach().to(torch.float64)

    @torch.no_grad()
    def between_refreshes(self, proj: SpectralProjector, st: ParamState,
                          A: torch.Tensor) -> bool:
        """One Cayley double-bracket step of ``st``'s block on the captured rows ``A``."""
        if not bool(torch.isfinite(A).all()):
            warnings.warn(f"DSBP weight {st.name!r}, step {proj.step}: non-finite activations; "
                          "tracking step skipped", RuntimeWarning, stacklevel=2)
            return False
        assert st.block is not None
        V = self.master.get(st.name)
        if V is None or V.shape != st.block.shape:
            V = st.block.detach().to(torch.float64)
        # C V in the activations' precision (the costly n x d x b part), the rest in float64:
        # the generator is skew by construction, so its precision does not affect orthonormality.
        Y = (A.T @ (A @ V.to(A.dtype))).to(torch.float64)  # (d, b)
        T = V.T @ Y
        evals, R = torch.linalg.eigh(0.5 * (T + T.T))
        evals, R = evals.flip(0), R.flip(1)
        if not float(evals[0]) > 0:
            return False  # all-zero batch: nothing to track
        V, Y = V @ R, Y @ R  # Ritz order within the span; Omega is unchanged by this rotation
        V = double_bracket_step(V, Y, self.lie_step / evals[0])
        self.master[st.name] = V
        proj.set_basis(st, V.to(st.block.dtype), evals.to(st.block.dtype),
                       trace_of_covariance(A))
        self.tracks[st.name] = self.tracks.get(st.name, 0) + 1
        return False

    def state_dict(self) -> dict:
        return {"master": dict(self.master), "tracks": dict(self.tracks)}

    def load_state_dict(self, state: Mapping) -> None:
        self.master = {n: t.detach().clone().to(torch.float64)
                       for n, t in state.get("master", {}).items()}
        self.tracks = {n: int(v) for n, v in state.get("tracks", {}).items()}


class LieSpectralProjector(SpectralProjector):
    """SpectralProjector whose bases follow the double-bracket flow between refreshes (a
    :class:`LieTracking` policy; this class only wires its arguments).

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
        if "policy" in kwargs:
            raise ValueError("LieSpectralProjector sets its own policy")
        self.tracking = LieTracking(track_every, lie_step)
        self.track_every, self.lie_step = track_every, lie_step
        super().__init__(model, *args, policy=self.tracking, **kwargs)

    def num_tracking_steps(self, module_or_name: nn.Module | str | None = None) -> int:
        """Cayley tracking steps taken by one weight, or summed over all weights."""
        if module_or_name is None:
            return sum(self.tracking.tracks.values())
        return self.tracking.tracks.get(self.layer_state(module_or_name).name, 0)


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
        **kwargs: Any,
    ) -> None:
        super().__init__(model, *args, track_every=track_every, lie_step=lie_step, **kwargs)
        self.rotation = bool(rotation)

    def _lr_of(self, p: torch.Tensor) -> float:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return float(group["lr"])
        raise ValueError("a projected weight is in no param group of the optimizer")

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], torch.Tensor] | None = None
    ) -> torch.Tensor | None:
        """Project (tracking bases), optionally rotate the projected weights, step the base."""
        if not self.rotation:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_group_overrides()
        self.projector.project_()
        for st in self.projector.states():
            w = st.param
            if w.grad is None or st.block is None:
                continue
            W = st.matrix(w)
            G = st.matrix(w.grad)
            E = st.basis.to(W.dtype)
            new = rotation_update(
                W.double(), G.double(), self._lr_of(w), E=E.double(), side=st.side
            )
            w.copy_(new.view_as(w).to(w.dtype))
            w.grad = None  # the base optimizer skips parameters without a gradient
        self.base_optimizer.step()
        return loss
