"""DSBP: a ``torch.optim.Optimizer`` drop-in = a SpectralProjector + any base optimizer.

The davda54/sam pattern: the wrapper shares the base optimizer's ``param_groups`` (so LR
schedulers, ``add_param_group`` and per-group settings work on it), and ``step()`` projects the
gradients, then steps the base.

    opt = DSBP(model, torch.optim.SGD, rank=10, interval=100, lr=0.1, momentum=0.9)
    print(opt.summary())  # which weights are projected, which skipped and why
    loss.backward(); opt.step(); opt.zero_grad()

Every projector option (``exclude``, ``residual``, ``warmup``, ``path``, ...) is accepted as a
keyword; the rest go to the base optimizer. Per-group overrides (as in GaLore): a param group may
carry ``rank``, ``interval`` and ``sharpness``; they apply to the weights in that group and are
re-read every step (a new rank takes effect at the next refresh).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from dsbp.optim.projector import OVERRIDABLE, SpectralProjector


def projector_options(cls: type[SpectralProjector]) -> frozenset[str]:
    """Keyword arguments that go to the projector: those of ``cls`` (a subclass adds its own,
    e.g. ``track_every``) and of :class:`SpectralProjector`."""
    names: set[str] = set()
    for c in {cls, SpectralProjector}:
        names |= {n for n, p in inspect.signature(c).parameters.items()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return frozenset(names - {"model", "params"})


PROJECTOR_OPTIONS = projector_options(SpectralProjector)


def _needs_closure(base_optimizer: Callable[..., torch.optim.Optimizer]) -> bool:
    step = getattr(base_optimizer, "step", None)
    if step is None:
        return False
    p = inspect.signature(step).parameters.get("closure")
    return p is not None and p.default is inspect.Parameter.empty


class DSBP(torch.optim.Optimizer):
    """Dynamic Spectral Backpropagation around a base optimizer.

    Args:
        model: the network (every weight a weight adapter handles gets the projection).
        base_optimizer: an optimizer class, e.g. ``torch.optim.SGD`` (default) or ``AdamW``.
            Optimizers whose ``step`` needs a closure (LBFGS) re-evaluate the loss several times
            per step, which one projection per step cannot follow: they are refused.
        rank, interval, power_iters, side, sharpness, max_rows, layers: see
            :class:`~dsbp.SpectralProjector` (the paper: k=10, p=100, 5 iterations, beta=0.1).
        params: parameters or param groups for the base optimizer (default:
            ``model.parameters()``); only these are projected. Groups may carry ``rank`` /
            ``interval`` / ``sharpness``.
        projector_kwargs: projector options as a dict (the same as passing them as keywords).
        **kwargs: projector options (``exclude``, ``skip_first_last``, ``residual``, ``warmup``,
            ``path``, ``seed``, ...) and the base optimizer's own arguments (``lr``, ...).
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
        **kwargs: Any,
    ) -> None:
        if isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError("base_optimizer must be an optimizer class (e.g. torch.optim.SGD), "
                            "not an instance: DSBP constructs it on the model's parameters")
        if _needs_closure(base_optimizer):
            raise TypeError(f"{getattr(base_optimizer, '__name__', base_optimizer)} needs a "
                            "closure that it re-evaluates within one step; DSBP projects once "
                            "per step and cannot follow it. Use a first-order optimizer.")
        options = projector_options(self.projector_class)
        proj_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in options}
        proj_kw.update(projector_kwargs or {})
        self.base_optimizer = base_optimizer(
            model.parameters() if params is None else params, **kwargs)
        owned = [p for g in self.base_optimizer.param_groups for p in g["params"]]
        self.projector = self.projector_class(
            model, rank=rank, interval=interval, power_iters=power_iters, side=side,
            sharpness=sharpness, max_rows=max_rows, layers=layers, params=owned, **proj_kw)
        # torch.optim.Optimizer.__init__ wires hooks and the step patching that LR schedulers
        # rely on; then share the base's groups and state so there is one source of truth.
        super().__init__(self.base_optimizer.param_groups, dict(self.base_optimizer.defaults))
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self._sync_group_overrides()

    def _sync_group_overrides(self) -> None:
        for group in self.param_groups:
            ov = {k: group[k] for k in OVERRIDABLE if k in group}
            if not ov:
                continue
            for p in group["params"]:
                st = self.projector.state_of(p)
                if st is not None:
                    self.projector.configure(st.name, **ov)

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], torch.Tensor] | None = None
    ) -> torch.Tensor | None:
        """Optionally evaluate ``closure`` (with grad) once, project the gradients, step the
        base."""
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

    def summary(self) -> str:
        """Each weight this optimizer owns: projected (side, rank, interval) or skipped, why."""
        return self.projector.summary()

    def remove(self) -> None:
        """Remove the projector's hooks from the model and free captured rows."""
        self.projector.remove()

    def __deepcopy__(self, memo: dict) -> DSBP:
        raise TypeError("DSBP is bound to its model by forward hooks and cannot be copied; "
                        "build a new DSBP on the copied model and load_state_dict()")

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("DSBP cannot be pickled (its projector holds hooks on the model); "
                        "save state_dict() instead")

    def state_dict(self) -> dict[str, Any]:
        """``{"base": base optimizer state, "projector": bases and step}`` (tensors only).
        The ``register_state_dict_pre_hook`` / ``post_hook`` hooks run as for any optimizer."""
        for pre in self._optimizer_state_dict_pre_hooks.values():
            pre(self)
        out: dict[str, Any] = {"base": self.base_optimizer.state_dict(),
                               "projector": self.projector.state_dict()}
        for post in self._optimizer_state_dict_post_hooks.values():
            res = post(self, out)
            out = out if res is None else res
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        for pre in self._optimizer_load_state_dict_pre_hooks.values():
            res = pre(self, state_dict)
            state_dict = state_dict if res is None else res
        if set(state_dict) != {"base", "projector"}:
            raise ValueError("not a DSBP state dict: expected keys 'base' and 'projector', got "
                             f"{sorted(state_dict)}")
        self.projector.load_state_dict(state_dict["projector"])  # validates before any change
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        for post in self._optimizer_load_state_dict_post_hooks.values():
            post(self)

    def __repr__(self) -> str:
        p = self.projector
        return (f"DSBP(base={type(self.base_optimizer).__name__}, rank={p.rank}, "
                f"interval={p.interval}, side={p.side!r}, sharpness={p.sharpness}, "
                f"weights={len(p.layer_names())})")
