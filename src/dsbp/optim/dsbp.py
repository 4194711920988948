"""DSBP: a ``torch.optim.Optimizer`` drop-in = a SpectralProjector + any base optimizer.

The davda54/sam pattern: the wrapper shares the base optimizer's ``param_groups`` (so LR
schedulers, ``add_param_group`` and per-group settings work on it), and ``step()`` projects the
gradients, then steps the base.

    opt = DSBP(model, torch.optim.SGD, rank=10, interval=100, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    loss.backward(); opt.step(); opt.zero_grad()

Per-group overrides (as in GaLore): a param group may carry ``rank``, ``interval`` and
``sharpness``; they apply to the layers whose weight is in that group, and are re-read every
step (a new rank takes effect at the next refresh).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from dsbp.optim.projector import _OVERRIDABLE, SpectralProjector


class DSBP(torch.optim.Optimizer):
    """Dynamic Spectral Backpropagation around a base optimizer.

    Subclasses that need another projector (distributed, adaptive, Lie tracking) set the class
    attribute ``projector_class`` and pass their own settings through ``projector_kwargs``.

    Args:
        model: the network (its Linear / Conv2d layers get the projection).
        base_optimizer: an optimizer class, e.g. ``torch.optim.SGD`` (default) or ``AdamW``.
        rank, interval, power_iters, side, sharpness, max_rows, layers: see
            :class:`~dsbp.SpectralProjector` (the paper: k=10, p=100, 5 iterations, beta=0.1).
        params: parameters or param groups for the base optimizer (default:
            ``model.parameters()``); groups may carry ``rank`` / ``interval`` / ``sharpness``.
        projector_kwargs: extra keyword arguments for the projector (``oversample``, ``seed``, ...).
        **base_kwargs: the base optimizer's own arguments (``lr``, ``momentum``, ...).
    """

    projector_class: type[SpectralProjector] = SpectralProjector

    def __init__(
        self,
        model: nn.Module,
        base_optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
        rank: int = 10,
        interval: int = 100,
        power_iters: int = 5,
        side: str = "output",
        sharpness: float = 0.1,
        max_rows: int = 8192,
        layers: Iterable[str] | None = None,
        params: Iterable[Any] | None = None,
        projector_kwargs: dict | None = None,
        **base_kwargs: Any,
    ) -> None:
        if isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError("base_optimizer must be an optimizer class (e.g. torch.optim.SGD), "
                            "not an instance: DSBP constructs it on the model's parameters")
        self.projector = self.projector_class(
            model, rank=rank, interval=interval, power_iters=power_iters, side=side,
            sharpness=sharpness, max_rows=max_rows, layers=layers, **(projector_kwargs or {}),
        )
        self.base_optimizer = base_optimizer(
            model.parameters() if params is None else params, **base_kwargs
        )
        # torch.optim.Optimizer.__init__ wires hooks and the step patching that LR schedulers
        # rely on; then share the base's groups and state so there is one source of truth.
        super().__init__(self.base_optimizer.param_groups, dict(self.base_optimizer.defaults))
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self._weight_to_layer = {
            id(self.projector.layer_state(n).module.weight): n
            for n in self.projector.layer_names()
        }
        self._sync_group_overrides()

    def _sync_group_overrides(self) -> None:
        for group in self.param_groups:
            ov = {k: group[k] for k in _OVERRIDABLE if k in group}
            if not ov:
                continue
            for p in group["params"]:
                name = self._weight_to_layer.get(id(p))
                if name is not None:
                    self.projector.configure(name, **ov)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Optionally re-evaluate ``closure`` (with grad), project the gradients, step the base."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_group_overrides()
        self.projector.project_()
        self.base_optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        # Optimizer.__init__ calls this before the base exists; afterwards the base owns groups.
        base = getattr(self, "base_optimizer", None)
        if base is not None and self.param_groups is base.param_groups:
            self.base_optimizer.add_param_group(param_group)
        else:
            super().add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """``{"base": base optimizer state, "projector": bases and step}`` (tensors only)."""
        return {"base": self.base_optimizer.state_dict(), "projector": self.projector.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != {"base", "projector"}:
            raise ValueError("not a DSBP state dict: expected keys 'base' and 'projector', got "
                             f"{sorted(state_dict)}")
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.projector.load_state_dict(state_dict["projector"])

    def __repr__(self) -> str:
        p = self.projector
        return (f"DSBP(base={type(self.base_optimizer).__name__}, rank={p.rank}, "
                f"interval={p.interval}, side={p.side!r}, sharpness={p.sharpness}, "
                f"layers={len(p.layer_names())})")
