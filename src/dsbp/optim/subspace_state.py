"""Subspace optimizer state (memory mode): Adam moments in the k-dim basis coordinates. [ours]

GaLore (Zhao et al., 2024) keeps Adam's moments in a rank-k subspace of each weight matrix,
with bases from an SVD of the gradient. :class:`SubspaceAdam` does the same with DSBP's bases:
the top-k eigenvectors ``E`` (d, k) of each layer's activation covariance, refreshed every ``p``
steps by the :class:`~dsbp.SpectralProjector` (cheap: a warm-started block power iteration on
activations, no SVD of a d_out x d_in gradient).

Per layer, with ``G~`` the DSBP direction (projected gradient plus sharpness term):

* output side: coordinates ``R = E^T G~`` (k, d_in); update ``W <- W - lr * E U``;
* input side:  coordinates ``R = G~ E`` (d_out, k); update ``W <- W - lr * U E^T``;

where ``U = m_hat / (sqrt(v_hat) + eps)`` is Adam's step on ``R``, and decoupled weight decay
(AdamW) acts on the full ``W``. Adam state per layer is ``2 k d_in`` (or ``2 d_out k``) numbers
instead of ``2 d_out d_in``: at ``k = d / 16`` sixteen times less for the layer's moments.

Because ``E E^T G = E R``, with a fixed basis this is *exactly* Adam run on the coordinates
``R_t`` (tests/optim/test_subspace_state.py checks it against ``torch.optim.Adam``). It is not
Adam on the projected full gradient ``E E^T G``: Adam's elementwise second moment is not
rotation invariant, and the subspace coordinates are the natural axes.

Refresh (the basis moves from ``E_old`` to ``E_new``), with ``Q = E_new^T E_old`` (k_new, k_old):

* first moment, exact re-projection: ``m <- Q m`` (output side) / ``m <- m Q^T`` (input side).
  ``E_new m_new = P_new E_old m_old``: the old momentum, orthogonally projected onto the new
  span; exact (nothing lost) when the new basis only rotates within the old span.
* second moment, ``second_moment="rotate"`` (default): ``v <- (Q*Q) v`` (elementwise square of Q).
  ``v`` tracks E[r_i^2] per coordinate; a rotation ``r' = Q r`` gives
  ``E[r'_i^2] = sum_j Q_ij^2 E[r_j^2] + cross terms``, and the cross terms are unknown because
  Adam keeps no covariances. Dropping them is exact when Q is a signed permutation (power
  iteration reordering or flipping eigenvectors, the common case between refreshes), keeps
  ``v >= 0``, and maps a rotation-invariant (isotropic) ``v`` to itself within a span.
  ``"keep"`` leaves ``v`` as it is (GaLore's behaviour), ``"reset"`` zeroes both moments and
  restarts that layer's bias correction.

Layers with ``k >= d`` (nothing to save) and all other parameters (biases, norms) get plain
AdamW with full state.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from dsbp.core.projection import dsbp_coordinates
from dsbp.layers.state import ParamState
from dsbp.optim.comm import Communicator, is_dtensor
from dsbp.optim.projector import SpectralProjector

SECOND_MOMENT = ("rotate", "keep", "reset")


def reproject_moments(
    m: torch.Tensor,
    v: torch.Tensor,
    E_old: torch.Tensor,
    E_new: torch.Tensor,
    side: str,
    second_moment: str = "rotate",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Carry Adam's moments from basis ``E_old`` (d, k_old) to ``E_new`` (d, k_new). [ours]

    Args:
        m: first moment in old coordinates, (k_old, d_in) output side / (d_out, k_old) input.
        v: second moment, same shape as ``m``.
        E_old, E_new: orthonormal bases (d, k_old), (d, k_new).
        side: ``"output"`` (coordinates are rows) or ``"input"`` (columns).
        second_moment: ``"rotate"`` (``v <- (Q*Q) v``), ``"keep"`` (unchanged; needs
            k_new == k_old) or ``"reset"`` (zeros; the caller restarts bias correction).

    Returns:
        ``(m_new, v_new)`` in the new coordinates.
    """
    if second_moment not in SECOND_MOMENT:
        raise ValueError(f"second_moment must be one of {SECOND_MOMENT}, got {second_moment!r}")
    Q = (E_new.T @ E_old).to(m.dtype)  # (k_new, k_old)
    if side == "output":
        m_new = Q @ m
    elif side == "input":
        m_new = m @ Q.T
    else:
        raise ValueError(f"side must be 'output' or 'input', got {side!r}")
    if second_moment == "reset":
        return torch.zeros_like(m_new), torch.zeros_like(m_new)
    if second_moment == "keep":
        if v.shape != m_new.shape:
            raise ValueError("second_moment='keep' cannot follow a rank change; use 'rotate'")
        return m_new, v
    Q2 = Q * Q
    return m_new, (Q2 @ v if side == "output" else v @ Q2.T)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in an optimizer's state tensors (and a DSBP projector's bases, if any).

    Works for ``torch.optim`` optimizers, wrappers with a ``base_optimizer`` (:class:`~dsbp.DSBP`,
    SAM), :class:`SubspaceAdam` and GaLore's optimizers (whose state holds projector objects:
    their tensors are counted too). Tensors are counted once (by storage pointer).
    """
    seen: set[int] = set()

    def count(obj: Any) -> int:
        if isinstance(obj, torch.Tensor):
            if is_dtensor(obj):  # per rank: the shard this process holds
                obj = obj.to_local()  # type: ignore[attr-defined]
            if obj.data_ptr() in seen or obj.numel() == 0:
                return 0
            seen.add(obj.data_ptr())
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(count(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(count(v) for v in obj)
        if hasattr(obj, "__dict__") and not isinstance(obj, nn.Module):
            return sum(count(v) for v in vars(obj).values())
        return 0

    total = sum(count(s) for s in optimizer.state.values())
    base = getattr(optimizer, "base_optimizer", None)  # SAM / DSBP wrappers: the base's state
    if isinstance(base, torch.optim.Optimizer):
        total += sum(count(s) for s in base.state.values())
    proj = getattr(optimizer, "projector", None)
    if isinstance(proj, SpectralProjector):
        for st in proj.states():
            total += count(st.block) + count(st.eigenvalues) + count(st.trace)
    return total


class SubspaceAdam(torch.optim.Optimizer):
    """AdamW whose moments live in the k-dim coordinates of DSBP's bases (memory mode). [ours]

    Args:
        model: the network; its Linear / Conv2d layers (or ``layers``) get subspace state.
        lr: learning rate.
        betas: Adam's (beta1, beta2).
        eps: Adam's epsilon.
        weight_decay: decoupled (AdamW) weight decay on every parameter.
        rank: k, basis size per layer (GaLore-style memory mode: e.g. d / 16).
        interval: p, steps between basis refreshes.
        power_iters, side, sharpness, max_rows, layers: as for :class:`~dsbp.SpectralProjector`.
            ``sharpness`` (beta) adds ``beta * lam_hat * e1 e1^T W`` to the direction before
            Adam, as :class:`~dsbp.DSBP` around AdamW does.
        second_moment: how ``v`` crosses a refresh: ``"rotate"`` (default), ``"keep"`` or
            ``"reset"`` (module docstring).
        params: parameters or groups to optimise (default ``model.parameters()``).
        projector_kwargs: extra keyword arguments for the projector (``oversample``, ``seed``...).
        distributed: use :class:`~dsbp.optim.distributed.DistributedSpectralProjector` (under
            DDP: the bases of the global batch, bit-identical on every rank, so the subspace
            moments agree across ranks too). Needs an initialised process group.
        process_group: the group for ``distributed=True`` (default: world).

    Raises:
        ValueError: a bad lr / betas / eps / weight_decay / second_moment (and the projector's
            own argument errors).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        rank: int = 64,
        interval: int = 200,
        power_iters: int = 5,
        side: str = "output",
        sharpness: float = 0.0,
        max_rows: int = 8192,
        layers: Iterable[str] | None = None,
        second_moment: str = "rotate",
        params: Iterable[Any] | None = None,
        projector_kwargs: dict | None = None,
        distributed: bool = False,
        process_group=None,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not eps > 0.0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if second_moment not in SECOND_MOMENT:
            raise ValueError(f"second_moment must be one of {SECOND_MOMENT}, "
                             f"got {second_moment!r}")
        kw = dict(projector_kwargs or {})
        if distributed:  # bases of the global batch, bit-identical on every rank
            from dsbp.optim.distributed import ProcessGroupCommunicator

            kw["comm"] = ProcessGroupCommunicator(process_group)
        self.second_moment = second_moment
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(model.parameters() if params is None else params, defaults)
        owned = [p for g in self.param_groups for p in g["params"]]
        self.projector = SpectralProjector(
            model, rank=rank, interval=interval, power_iters=power_iters, side=side,
            sharpness=sharpness, max_rows=max_rows, layers=layers, params=owned, **kw,
        )
        self.comm: Communicator = self.projector.comm
        # weights whose state lives in the subspace: only where k < d saves memory
        self._state_of: dict[int, ParamState] = {
            id(st.param): st for st in self.projector.states() if min(st.rank, st.dim) < st.dim}

    def is_subspace(self, p: torch.Tensor) -> bool:
        """Whether parameter ``p`` keeps its Adam moments in basis coordinates."""
        return id(p) in self._state_of

    def summary(self) -> str:
        """Each weight: projected (its moments in basis coordinates) or skipped, and why."""
        return self.projector.summary()

    def remove(self) -> None:
        """Remove the projector's hooks from the model."""
        self.projector.remove()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One AdamW step; subspace weights refresh their basis when due and re-project state."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for st, old in self.projector.refresh_():
            self._reproject(st, old)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                sub = self._state_of.get(id(p))
                if sub is None:
                    self._full_step(p, p.grad, group)
                else:
                    self._subspace_step(p, sub, group)
        self.projector.end_step()
        return loss

    def _reproject(self, st: ParamState, old: torch.Tensor | None) -> None:
        """Carry a weight's moments into its new basis after a refresh."""
        state = self.state[st.param]
        if old is None or id(st.param) not in self._state_of or "exp_avg" not in state:
            return
        m, v = reproject_moments(state["exp_avg"], state["exp_avg_sq"], old, st.basis,
                                 st.side, self.second_moment)
        state["exp_avg"], state["exp_avg_sq"] = m, v
        if self.second_moment == "reset":
            state["step"].zero_()

    # ---------------------------------------------------------------- Adam on a tensor
    def _adam(self, state: dict, R: torch.Tensor, group: dict) -> torch.Tensor:
        """Adam's step direction ``m_hat / (sqrt(v_hat) + eps)`` for gradient ``R``.

        Same arithmetic as ``torch.optim.AdamW`` (single-tensor path); returns the direction
        already scaled by ``lr / bias_correction1`` so the caller only subtracts it.
        """
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(R)
            state["exp_avg_sq"] = torch.zeros_like(R)
        b1, b2 = group["betas"]
        state["step"] += 1
        t = float(state["step"])  # CPU scalar: no device sync
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(R, 1 - b1)
        v.mul_(b2).addcmul_(R, R, value=1 - b2)
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        denom = (v.sqrt() / bc2**0.5).add_(group["eps"])
        return (m / denom).mul_(group["lr"] / bc1)

    def _full_step(self, p: torch.Tensor, g: torch.Tensor, group: dict) -> None:
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.sub_(self._adam(self.state[p], g, group))

    def _subspace_step(self, p: torch.Tensor, st: ParamState, group: dict) -> None:
        if st.block is None:
            return  # no basis yet (the projector warned): the weight waits for a refresh
        comm, output = self.comm, st.side == "output"
        E = st.basis[comm.row_slice(p)] if output else st.basis  # this rank's rows of E
        W = st.matrix(comm.local(p))
        # the coordinates of the DSBP direction: E^T G + s e_1 e1^T W (k, d_in) or G E + ...
        R = dsbp_coordinates(st.matrix(comm.local(st.grad)), E, st.side,
                             W=W if st.sharpness else None, scale=st.sharpness_scale(),
                             row_sum=comm.sum_over_row_shards)
        U = self._adam(self.state[p], R, group)
        local = comm.local(p)
        local.mul_(1 - group["lr"] * group["weight_decay"])
        Wv = st.matrix(local)  # a view, unless the weight's layout needs a copy
        Wv.sub_((E @ U if output else U @ E.T).to(local.dtype))
        st.write_matrix(local, Wv)

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """``{"base": Adam moments and groups, "projector": bases and step}`` (tensors only)."""
        return {"base": super().state_dict(), "projector": self.projector.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != {"base", "projector"}:
            raise ValueError("not a SubspaceAdam state dict: expected keys 'base' and "
                             f"'projector', got {sorted(state_dict)}")
        super().load_state_dict(state_dict["base"])
        self.projector.load_state_dict(state_dict["projector"])
