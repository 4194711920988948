"""Sharpness-Aware Minimization (Foret et al. 2021, arXiv 2010.01412) as an optimizer wrapper.

The davda54/sam pattern: SAM wraps a base optimizer and *shares its* ``param_groups``, so
learning-rate schedulers attached to SAM drive the base optimizer. One SAM update is

1. gradient ``g`` at the weights ``w`` (first pass);
2. ascent ``w + e`` with ``e = rho * g / ||g||`` (ASAM, ``adaptive=True``:
   ``e = rho * T^2 g / ||T g||``, ``T = |w|`` elementwise, Kwon et al. 2021);
3. gradient ``g_sam`` at ``w + e`` (second pass);
4. restore ``w`` exactly and take the base optimizer's step with ``g_sam``.

``||.||`` is the global 2-norm over every parameter of every group; ``rho`` is read per group.

BatchNorm [ours: the usual practice made explicit]. When ``model`` is given, every BatchNorm
module has ``momentum = 0`` between :meth:`SAM.first_step` and :meth:`SAM.second_step` (and its
``num_batches_tracked`` is restored), so the second forward pass normalises with its own batch
statistics, as the first did, but leaves the running statistics exactly as the first (plain)
forward pass set them. Without ``model`` the second pass updates them a second time, at the
perturbed weights.

Mixed precision. Under ``torch.autocast`` nothing changes: parameters and gradients stay fp32
and the ascent norm is taken in fp32. With a ``GradScaler`` the closure form cannot be used
(the scaler refuses closures): call ``opt.step(closure, scaler=scaler)`` then
``scaler.update()``, which runs this sequence, or call the two halves yourself::

    opt.zero_grad()
    with torch.autocast(device_type, dtype):
        loss = loss_fn(model(x), y)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)                       # true gradient for the ascent norm; inf check
    if opt.first_step(zero_grad=True):         # False (nothing moved) if the gradient is inf/nan
        with torch.autocast(device_type, dtype):
            loss2 = loss_fn(model(x), y)
        scaler.scale(loss2).backward()
        opt.second_step(scaler=scaler)         # restore w; scaler.step(base): unscale, skip on inf
    scaler.update()                            # lowers the scale if either pass overflowed
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["SAM"]


class SAM(torch.optim.Optimizer):
    """Sharpness-Aware Minimization around any base optimizer.

    Args:
        params: parameters or parameter groups (as for any torch optimizer); per-group ``rho``
            and ``adaptive`` overrides are allowed.
        base_optimizer: the base optimizer *class* (default ``torch.optim.SGD``); it is built
            on SAM's parameter groups with ``**base_kwargs``.
        rho: radius of the ascent step (paper symbol rho). Default 0.05.
        adaptive: ASAM's scale-invariant ascent (``T = |w|``). Default False.
        model: the model, to hold BatchNorm running statistics fixed in the second pass (see the
            module docstring). Default None (they are updated in both passes).
        **base_kwargs: passed to ``base_optimizer`` (``lr``, ``momentum``, ``weight_decay``...).

    Raises:
        ValueError: if ``rho < 0`` or ``base_optimizer`` is not an optimizer class.
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        rho: float = 0.05,
        adaptive: bool = False,
        model: nn.Module | None = None,
        **base_kwargs: Any,
    ) -> None:
        if not rho >= 0.0:
            raise ValueError(f"SAM: rho must be >= 0, got {rho}")
        if not (
            isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)
        ):
            raise ValueError(
                f"SAM: base_optimizer must be a torch.optim.Optimizer class, got {base_optimizer!r}"
            )
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **base_kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups  # shared: schedulers reach the base
        self.defaults.update(self.base_optimizer.defaults)
        self.model = model
        # Transient (between first_step and second_step only), never in state_dict.
        self._w_backup: dict[torch.Tensor, torch.Tensor] = {}
        self._bn_saved: list[tuple[_BatchNorm, float | None, torch.Tensor | None]] = []

    @torch.no_grad()
    def _grad_norm(self) -> torch.Tensor:
        norms = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.to(torch.promote_types(p.grad.dtype, torch.float32))  # >= fp32
                norms.append(
                    torch.linalg.vector_norm(p.abs().to(g) * g if group["adaptive"] else g)
                )
        if not norms:
            return torch.zeros(())
        device = norms[0].device
        return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> bool:
        """Move to the ascent point ``w + e`` using the current ``.grad`` (first-pass gradient).

        Args:
            zero_grad: clear the gradients afterwards, ready for the second pass.

        Returns:
            True if the weights were perturbed; False (nothing changed) when the gradient norm is
            inf or nan, e.g. after a GradScaler overflow.
        """
        if self._w_backup:
            raise RuntimeError("SAM.first_step called twice without second_step")
        grad_norm = self._grad_norm()
        if not torch.isfinite(grad_norm):
            return False
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._w_backup[p] = p.detach().clone()
                e_w = (p * p if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                p.add_(e_w)
        self._freeze_bn()
        if zero_grad:
            self.zero_grad()
        return True

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, scaler: Any = None) -> None:
        """Restore ``w`` and take the base step with the current (second-pass) gradient.

        Args:
            zero_grad: clear the gradients afterwards.
            scaler: a ``torch.amp.GradScaler``; the base step is then ``scaler.step(base)``,
                which unscales the second-pass gradient and skips the step on inf/nan.
        """
        self._undo_ascent()
        if scaler is None:
            self.base_optimizer.step()
        else:
            scaler.step(self.base_optimizer)
        if zero_grad:
            self.zero_grad()

    def step(  # type: ignore[override]
        self, closure: Callable[[], torch.Tensor] | None = None, scaler: Any = None
    ) -> torch.Tensor:
        """One full SAM update.

        Args:
            closure: computes the loss on the current batch and calls ``backward()`` on it;
                called twice (at ``w``, then at ``w + e``). Gradients are zeroed before each call.
            scaler: the ``torch.amp.GradScaler`` whose scale the closure applies
                (``scaler.scale(loss).backward()``), or None. SAM then runs the sequence of the
                module docstring: unscale before the ascent norm, no ascent and no step on
                inf/nan, base step through ``scaler.step``. The caller still calls
                ``scaler.update()`` afterwards.

        Returns:
            The loss of the first pass (at ``w``), as returned by the closure.
        """
        if closure is None:
            raise ValueError("SAM.step needs a closure (or call first_step / second_step)")
        self.zero_grad()
        with torch.enable_grad():
            loss = closure()
        if scaler is not None:
            scaler.unscale_(self)
        if self.first_step(zero_grad=True):
            try:
                with torch.enable_grad():
                    closure()
            except BaseException:
                self._undo_ascent()  # leave w and BatchNorm as they were before the step
                raise
            self.second_step(scaler=scaler)
        return loss

    @torch.no_grad()
    def _undo_ascent(self) -> None:
        for p, w in self._w_backup.items():
            p.copy_(w)
        self._w_backup.clear()
        self._restore_bn()

    def _freeze_bn(self) -> None:
        if self.model is None:
            return
        for m in self.model.modules():
            if isinstance(m, _BatchNorm):
                nbt = None if m.num_batches_tracked is None else m.num_batches_tracked.clone()
                self._bn_saved.append((m, m.momentum, nbt))
                m.momentum = 0.0  # running = 1 * running + 0 * batch: unchanged, exactly

    def _restore_bn(self) -> None:
        for m, momentum, nbt in self._bn_saved:
            m.momentum = momentum
            if nbt is not None and m.num_batches_tracked is not None:
                m.num_batches_tracked.copy_(nbt)
        self._bn_saved.clear()

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (its state plus the shared groups with ``rho``)."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the base optimizer and re-share its parameter groups."""
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
