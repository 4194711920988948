"""Low-rank backward for ``nn.Linear``: the projected weight gradient without the full one. [ours]

DSBP's pure projection (no residual, no sharpness term) replaces a Linear layer's weight
gradient ``G = dY^T X`` (d_out, d_in) by ``E E^T G`` (output side, ``E`` (d_out, k)) or
``G E E^T`` (input side, ``E`` (d_in, k)). Done after backward, as
:class:`~dsbp.SpectralProjector` does, the full ``G`` is computed first (``2 n d_out d_in``
flops for ``n`` rows), so the projection can only add cost. Here the backward computes the
projection from the layer's output gradient ``dY`` (n, d_out) and input ``X`` (n, d_in)
directly:

* output side: ``E^T G = (dY E)^T X`` (k, d_in), then ``E (E^T G)``;
* input side: ``G E = dY^T (X E)`` (d_out, k), then ``(G E) E^T``.

The thin products cost ``2 n k (d_out + d_in)`` flops; the expansion back to a (d_out, d_in)
gradient ``2 k d_out d_in``. Against ``2 n d_out d_in``, the weight-gradient work falls by
about ``n / k`` when ``n`` is small against d, and by ``d / (2k)`` otherwise, while the input
gradient ``dX = dY W`` and the forward pass are unchanged: a whole step of an MLP can gain at
most 1.5x (6 -> 4 GEMMs of size ``n d_out d_in``).

With ``coords=True`` the expansion is skipped too: the weight gets no ``.grad`` and the handle
holds the coordinates (``E^T G`` or ``G E``) for a subspace optimizer, which can apply its update
as one ``W.addmm_(E, U)`` (output side) / ``W.addmm_(U, E.T)`` (input side).

Usage::

    E = torch.linalg.qr(torch.randn(512, 32)).Q    # any orthonormal (d, k) basis
    with low_rank_backward(model.fc, lambda: E):   # or: h = low_rank_backward(...); h.remove()
        loss_fn(model(x), y).backward()            # model.fc.weight.grad == E E^T G

The basis comes from a callable evaluated at each forward, so it can follow a projector's
refreshes (e.g. ``lambda: projector.basis(module)``); returning ``None`` means "no basis yet"
and gives the ordinary gradient. The basis is not differentiated through.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SIDES = ("output", "input")
BasisFn = Callable[[], "torch.Tensor | None"]


def lowrank_flops(n: int, d_out: int, d_in: int, k: int, coords: bool = False) -> int:
    """Flops of the low-rank weight gradient (thin products, plus the expansion unless
    ``coords``), to compare with ``2 n d_out d_in`` for the full one."""
    return 2 * n * k * (d_out + d_in) + (0 if coords else 2 * k * d_out * d_in)


def projected_weight_grad(dy: torch.Tensor, x: torch.Tensor, E: torch.Tensor, side: str,
                          coords: bool = False) -> torch.Tensor:
    """The projected weight gradient of ``Y = X W^T`` from ``dY`` (n, d_out) and ``X`` (n, d_in).

    Args:
        dy: output gradient, (n, d_out).
        x: layer input, (n, d_in).
        E: orthonormal basis, (d_out, k) for ``side="output"``, (d_in, k) for ``"input"``.
        side: ``"output"`` (``E E^T G``) or ``"input"`` (``G E E^T``).
        coords: return the coordinates (``E^T G`` (k, d_in) / ``G E`` (d_out, k)) instead.

    Returns:
        (d_out, d_in) projected gradient, or the coordinates. ``G = dY^T X`` is never formed.
    """
    E = E.to(dy.dtype)
    if side == "output":
        C = (dy @ E).T @ x  # (k, n) @ (n, d_in): E^T G
        return C if coords else E @ C
    if side == "input":
        C = dy.T @ (x @ E)  # (d_out, n) @ (n, k): G E
        return C if coords else C @ E.T
    raise ValueError(f"side must be one of {SIDES}, got {side!r}")


class _LowRankLinear(torch.autograd.Function):
    """``F.linear`` whose backward returns the projected weight gradient (see module doc)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                E: torch.Tensor, side: str, handle: LowRankBackward) -> torch.Tensor:
        ctx.save_for_backward(x, weight, E)
        ctx.side, ctx.handle, ctx.has_bias = side, handle, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, E = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = dy @ weight.to(dy.dtype)  # (..., d_out) @ (d_out, d_in): unchanged
        d_out, d_in = weight.shape
        dy2 = dy.reshape(-1, d_out)
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, d_in).to(dy.dtype)
            handle: LowRankBackward = ctx.handle
            if handle.coords:
                C = projected_weight_grad(dy2, x2, E, ctx.side, coords=True)
                handle._accumulate(C, E)
            else:
                dw = projected_weight_grad(dy2, x2, E, ctx.side).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db, None, None, None


class LowRankBackward:
    """Handle of a Linear layer whose backward computes the projected weight gradient.

    Made by :func:`low_rank_backward`; :meth:`remove` (or leaving the ``with`` block) restores
    the module's own forward.

    Attributes:
        module: the ``nn.Linear``.
        side: ``"output"`` or ``"input"``.
        coords: whether the backward leaves ``weight.grad`` alone and stores coordinates.
        grad_coords: with ``coords=True``, the coordinates summed over the backward passes since
            the last :meth:`zero_coords` (``E^T G`` (k, d_in) or ``G E`` (d_out, k)), else None.
        coords_basis: the basis ``E`` those coordinates refer to.
    """

    def __init__(self, module: nn.Linear, basis_fn: BasisFn, side: str = "output",
                 coords: bool = False) -> None:
        if not isinstance(module, nn.Linear):
            raise TypeError(f"low_rank_backward supports nn.Linear only, got "
                            f"{type(module).__name__}")
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        if not callable(basis_fn):
            raise TypeError("basis_fn must be a callable returning a (d, k) tensor or None")
        if "forward" in vars(module):
            raise RuntimeError("the module's forward is already replaced (a low-rank backward "
                               "is attached, or another wrapper): remove that first")
        self.module, self.basis_fn, self.side, self.coords = module, basis_fn, side, coords
        self.grad_coords: torch.Tensor | None = None
        self.coords_basis: torch.Tensor | None = None
        self._attached = True
        module.forward = self._forward  # type: ignore[method-assign,assignment]

    def _basis(self) -> torch.Tensor | None:
        E = self.basis_fn()
        if E is None:
            return None
        w = self.module.weight
        d = w.shape[0] if self.side == "output" else w.shape[1]
        if E.dim() != 2 or E.shape[0] != d:
            raise ValueError(f"basis_fn returned shape {tuple(E.shape)}; the {self.side} side "
                             f"of a Linear with weight {tuple(w.shape)} needs ({d}, k)")
        return E.detach()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        E = self._basis() if torch.is_grad_enabled() else None
        if E is None:  # no basis yet, or no backward coming: the ordinary layer
            return F.linear(x, m.weight, m.bias)
        out: torch.Tensor = _LowRankLinear.apply(x, m.weight, m.bias, E, self.side, self)
        return out

    def _accumulate(self, C: torch.Tensor, E: torch.Tensor) -> None:
        if self.grad_coords is None:
            self.grad_coords, self.coords_basis = C, E
            return
        if self.coords_basis is not None and self.coords_basis.data_ptr() != E.data_ptr() \
                and not torch.equal(self.coords_basis, E):
            raise RuntimeError("the basis changed between two backward passes without "
                               "zero_coords(): coordinates in different bases cannot be summed")
        self.grad_coords = self.grad_coords + C

    def zero_coords(self) -> None:
        """Forget the stored coordinates (call after the optimizer step, like zero_grad)."""
        self.grad_coords = self.coords_basis = None

    def remove(self) -> None:
        """Restore the module's own forward (idempotent)."""
        if self._attached:
            del self.module.forward
            self._attached = False

    def __enter__(self) -> LowRankBackward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def low_rank_backward(module: nn.Linear, basis_fn: BasisFn, side: str = "output",
                      coords: bool = False) -> LowRankBackward:
    """Make ``module``'s backward compute its weight gradient already projected. [ours]

    Args:
        module: an ``nn.Linear`` (any leading batch dimensions of its input are handled; the
            bias gradient is the ordinary one).
        basis_fn: called at each forward with grad enabled; returns the orthonormal basis
            ``E`` (d_out, k) for ``side="output"`` or (d_in, k) for ``"input"``, or ``None``
            (ordinary backward, e.g. before a projector's first refresh).
        side: ``"output"`` (``E E^T G``, the paper's shapes) or ``"input"`` (``G E E^T``).
        coords: store the coordinates (``E^T G`` / ``G E``) on the handle instead of
            expanding them into ``weight.grad``.

    Returns:
        A :class:`LowRankBackward` handle (also a context manager) whose ``remove()`` restores
        the module.

    Raises:
        TypeError: ``module`` is not an ``nn.Linear`` or ``basis_fn`` is not callable.
        ValueError: an unknown side, or (at forward time) a basis of the wrong shape.
        RuntimeError: the module's forward is already replaced.
    """
    return LowRankBackward(module, basis_fn, side=side, coords=coords)
