"""Dom-SGD, Bulk-SGD and their interpolation (Zakarin & Singh, arXiv 2505.11972; METHOD.md §5).

Gradients of deep nets align with the top-k eigenspace of the loss Hessian (the *dominant*
subspace, k ~ number of classes). With ``P = V V^T`` the projector onto it (``V`` (dim, k), the
top-k Hessian eigenvectors over all selected parameters, flattened), the update direction is

    g <- a P g + b (I - P) g,

- ``mode="dom"``: ``(a, 0)``, steps only inside the dominant subspace (Dom-SGD);
- ``mode="bulk"``: ``(0, b)``, steps only in its orthogonal complement (Bulk-SGD);
- ``mode="interp"``: ``(a, b)`` as given; ``(1, 1)`` is plain SGD.

``V`` comes from Lanczos (:func:`dsbp.core.lanczos.lanczos`, full reorthogonalisation) on
Hessian-vector products (:func:`dsbp.diagnostics.hvp.make_hvp`; model in eval mode, so
BatchNorm uses its running statistics) of the loss on a batch, recomputed every ``interval``
steps and kept in between [ours: the cadence; the paper recomputes it every step, which
``interval=1`` gives]. The projected gradient then feeds a base optimizer (SGD by default), so
momentum and weight decay act after the projection [ours: the weight-decay term is not
projected].
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from dsbp.core.lanczos import lanczos
from dsbp.diagnostics.hvp import Batch, make_hvp, named_selected_params

__all__ = ["SubspaceSGD"]

_MODES = ("dom", "bulk", "interp")


class SubspaceSGD(torch.optim.Optimizer):
    """Gradient restricted / reweighted between the dominant Hessian subspace and its complement.

    Args:
        model: the network.
        loss_fn: ``loss_fn(model(x), y) -> scalar`` mean loss, used for the Hessian.
        mode: ``"dom"``, ``"bulk"`` or ``"interp"`` (see the module docstring). Default ``"dom"``.
        k: dimension of the dominant subspace (top-k eigenvectors). Default 10.
        a: weight of the dominant component (used by ``"dom"`` and ``"interp"``). Default 1.
        b: weight of the bulk component (used by ``"bulk"`` and ``"interp"``). Default 1.
        interval: recompute the eigenvectors every ``interval`` steps (first at step 0); the
            name DSBP uses for its refresh period p. Default 10 [ours].
        lr: learning rate of the base optimizer. Default 0.01.
        hvp_batches: where the Hessian's data comes from when ``step`` gets no ``batch``: an
            ``(x, y)`` batch or a list of them (a fixed Hessian set), or a callable ``() ->
            batch(es)`` called on every refresh (e.g. drawing a fresh mini-batch from a loader).
            Default None (then ``step`` must get ``batch`` on refresh steps).
        lanczos_iters: Krylov dimension m (default ``min(dim, 2k + 20)``).
        lanczos_dtype: dtype of the Krylov basis and of the stored eigenvectors. Default
            float64; the basis takes ``dim * m * 8`` bytes (about 3.6 GB for a full-width
            ResNet-18 at k = 10), so pass ``torch.float32`` for large models.
        params: parameter selection, as in :func:`dsbp.diagnostics.hvp.named_selected_params`
            (default: every trainable parameter). The subspace lives in their joint flat space.
        base_optimizer: optimizer class for the projected gradient. Default ``torch.optim.SGD``.
        seed: seed of the Lanczos start vectors. Default 0.
        **base_kwargs: further base-optimizer arguments (``momentum``, ``weight_decay``...).

    Attributes:
        eigenvalues: (k,) top Hessian eigenvalues at the last refresh, descending, or None.
        dom_fraction: ``||P g|| / ||g||`` at the last step (float), or None.

    Raises:
        ValueError: unknown mode, ``k`` outside ``[1, dim]``, ``interval < 1`` or negative a/b.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        mode: str = "dom",
        k: int = 10,
        a: float = 1.0,
        b: float = 1.0,
        interval: int = 10,
        lr: float = 0.01,
        *,
        hvp_batches: Batch | Iterable[Batch] | Callable[[], Any] | None = None,
        lanczos_iters: int | None = None,
        lanczos_dtype: torch.dtype = torch.float64,
        params: Any = None,
        base_optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
        seed: int = 0,
        **base_kwargs: Any,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"SubspaceSGD: mode must be one of {_MODES}, got {mode!r}")
        if not (a >= 0 and b >= 0):
            raise ValueError(f"SubspaceSGD: a and b must be >= 0, got a={a}, b={b}")
        if int(interval) != interval or interval < 1:
            raise ValueError(f"SubspaceSGD: interval must be an integer >= 1, got {interval!r}")
        named = named_selected_params(model, params)
        self._names = [n for n, _ in named]
        plist = [p for _, p in named]
        self.dim = sum(p.numel() for p in plist)
        if int(k) != k or not 1 <= k <= self.dim:
            raise ValueError(f"SubspaceSGD: k must be an integer in [1, {self.dim}], got {k!r}")
        coef = {"dom": (a, 0.0), "bulk": (0.0, b), "interp": (a, b)}[mode]
        # a, b, k are optimizer-wide (one joint subspace), so they are not per-group settings.
        super().__init__(plist, dict(lr=lr))
        self.base_optimizer = base_optimizer(self.param_groups, lr=lr, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.model, self.loss_fn = model, loss_fn
        self.mode, self.k, self.interval = mode, int(k), int(interval)
        self.a, self.b = float(coef[0]), float(coef[1])
        self.hvp_batches = hvp_batches
        self.lanczos_iters = lanczos_iters
        self.lanczos_dtype = lanczos_dtype
        self._plist = plist
        self._generator = torch.Generator().manual_seed(seed)
        self._step = 0
        self.basis: torch.Tensor | None = None  # V (dim, k) in lanczos_dtype, orthonormal columns
        self.eigenvalues: torch.Tensor | None = None
        self.dom_fraction: float | None = None

    @torch.no_grad()
    def refresh_basis(self, batches: Batch | Iterable[Batch]) -> torch.Tensor:
        """Recompute the top-k Hessian eigenvectors on ``batches`` by Lanczos.

        Returns:
            The eigenvalues (k,), descending (float64). The basis is stored in ``self.basis``.
        """
        matvec, dim = make_hvp(self.model, self.loss_fn, batches, self._plist)
        device = self._plist[0].device
        vals, vecs = lanczos(
            matvec,
            dim,
            self.k,
            self.lanczos_iters,
            generator=self._generator,
            dtype=self.lanczos_dtype,
            device=device,
        )
        self.basis, self.eigenvalues = vecs, vals
        return vals

    @torch.no_grad()
    def project_(self) -> None:
        """Rewrite every selected ``.grad`` in place as ``a P g + b (I - P) g``."""
        if self.basis is None:
            raise RuntimeError("SubspaceSGD: no basis yet; call refresh_basis or step(batch=...)")
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in self._plist]
        g = torch.cat([gi.reshape(-1) for gi in grads])  # (dim,)
        # Work in the wider of the two dtypes, so an fp32 basis never rounds an fp64 gradient.
        dt = torch.promote_types(g.dtype, self.basis.dtype)
        g, V = g.to(dt), self.basis.to(dt)
        pg = V @ (V.T @ g)  # P g, (dim,)
        gnorm = torch.linalg.vector_norm(g)
        self.dom_fraction = float(torch.linalg.vector_norm(pg) / gnorm) if gnorm > 0 else 0.0
        new = self.a * pg + self.b * (g - pg)
        offset = 0
        for p in self._plist:
            n = p.numel()
            chunk = new[offset : offset + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = chunk.clone()
            else:
                p.grad.copy_(chunk)
            offset += n

    def step(  # type: ignore[override]
        self,
        closure: Callable[[], torch.Tensor] | None = None,
        batch: Batch | Iterable[Batch] | None = None,
    ) -> torch.Tensor | None:
        """Refresh the basis if due, project the gradients, take the base step.

        Args:
            closure: optional; re-evaluates the loss and calls ``backward()`` (gradients are
                zeroed first). Without it, ``.grad`` must already hold the gradient.
            batch: ``(x, y)`` (or a list of them) for the Hessian on a refresh step; defaults
                to ``hvp_batches``. Ignored on other steps.

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            self.zero_grad()
            with torch.enable_grad():
                loss = closure()
        if self._step % self.interval == 0 or self.basis is None:
            batches = batch if batch is not None else self.hvp_batches
            if batches is None:
                raise ValueError(
                    f"SubspaceSGD: step {self._step} refreshes the Hessian basis; pass "
                    "step(batch=(x, y)) or hvp_batches=..."
                )
            self.refresh_basis(batches() if callable(batches) else batches)
        self.project_()
        self.base_optimizer.step()
        self._step += 1
        return loss

    def state_dict(self) -> dict[str, Any]:
        """Base optimizer state, the basis, eigenvalues, step count and RNG state (tensors)."""
        return {
            "base": self.base_optimizer.state_dict(),
            "basis": self.basis,
            "eigenvalues": self.eigenvalues,
            "step": torch.tensor(self._step),
            "rng": self._generator.get_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; the basis must match this model's size."""
        basis = state_dict["basis"]
        if basis is not None and tuple(basis.shape) != (self.dim, self.k):
            raise ValueError(
                f"SubspaceSGD: saved basis has shape {tuple(basis.shape)}, "
                f"expected {(self.dim, self.k)}"
            )
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.param_groups = self.base_optimizer.param_groups
        self.basis, self.eigenvalues = basis, state_dict["eigenvalues"]
        self._step = int(state_dict["step"])
        self._generator.set_state(state_dict["rng"])
