"""Loss-landscape slices: 1-D and 2-D, along filter-normalised random or principal directions.

A direction is a flat vector over the selected parameters (the order of
:func:`dsbp.diagnostics.hvp.flat_params`). The slice is ``L(w + a d1 [+ b d2])`` evaluated with
the model in eval mode (BatchNorm running statistics, dropout off) and no gradient; the weights
are restored bit-exactly afterwards.

Filter normalisation (Li et al., "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018):
draw ``d ~ N(0, I)`` and, for every parameter with >= 2 dims, rescale each filter (slice along
dim 0: a Linear row / one conv output channel) to the Frobenius norm of the matching filter of
the weights: ``d_i <- d_i / ||d_i|| * ||w_i||``. One-dimensional parameters (biases, BatchNorm
scale/shift) are set to zero by default (Li et al.'s ``ignore='biasbn'``); ``bias_bn="keep"``
instead treats each such vector as a single filter.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from dsbp.core.projection import check_side
from dsbp.diagnostics.hvp import (
    Batch,
    LossFn,
    ParamSpec,
    as_batch_list,
    assign_flat_,
    eval_mode,
    flat_params,
    named_selected_params,
)

__all__ = [
    "filter_normalized_direction",
    "basis_direction",
    "hessian_directions",
    "loss_slice_1d",
    "loss_slice_2d",
    "evaluate_loss",
]


def filter_normalized_direction(
    model: nn.Module,
    params: ParamSpec = None,
    *,
    bias_bn: str = "zero",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A random filter-normalised direction (Li et al. 2018) as a flat vector (dim,).

    Args:
        model: the network.
        params: parameter selection (default: all trainable).
        bias_bn: ``"zero"`` (1-D parameters get direction 0) or ``"keep"`` (each 1-D parameter
            is one filter, rescaled to the parameter's norm).
        generator: RNG for the Gaussian draw.

    Returns:
        Flat direction (dim,) in float64 on CPU.
    """
    if bias_bn not in ("zero", "keep"):
        raise ValueError(f"bias_bn must be 'zero' or 'keep', got {bias_bn!r}")
    parts = []
    for _, p in named_selected_params(model, params):
        w = p.detach().to("cpu", torch.float64)
        d = torch.randn(w.shape, generator=generator, dtype=torch.float64)
        if w.dim() <= 1:
            if bias_bn == "zero":
                d = torch.zeros_like(w)
            else:
                d = d / d.norm().clamp_min(1e-30) * w.norm()
        else:
            wf, df = w.reshape(w.shape[0], -1), d.reshape(d.shape[0], -1)
            df = df / df.norm(dim=1, keepdim=True).clamp_min(1e-30) * wf.norm(dim=1, keepdim=True)
            d = df.reshape(w.shape)
        parts.append(d.reshape(-1))
    return torch.cat(parts)


def basis_direction(
    model: nn.Module,
    layer: str,
    E: torch.Tensor,
    index: int = 0,
    side: str = "output",
    params: ParamSpec = None,
) -> torch.Tensor:
    """Direction along a DSBP basis vector of one layer, as a flat vector over ``params``. [ours]

    For layer weight ``W`` (viewed as (d_out, d_in)) and basis vector ``e = E[:, index]``, the
    direction is the component of W along e, ``e e^T W`` (output side) or ``W e e^T`` (input side),
    rescaled to Frobenius norm ``||W||_F`` so that a step of 1 is the size of the weight (the
    filter-normalisation scale). Zero on every other parameter. Falls back to the rank-1
    ``e (e^T W / ||e^T W||)`` scaled likewise if ``e e^T W`` is zero.

    Args:
        model: the network; ``layer`` names a module with a ``weight``.
        E: basis (d, k); d = d_out (output side) or d_in (input side).
        index: which basis column (0 = top eigenvector).
        side: ``"output"`` or ``"input"``.
        params: selection the flat vector ranges over (must include the layer's weight).

    Returns:
        Flat direction (dim,) float64 on CPU.
    """
    check_side(side)
    module: Any = model.get_submodule(layer)  # torch types ``.weight`` as ``Tensor | Module``
    weight: torch.Tensor = module.weight
    W = weight.detach().to("cpu", torch.float64).reshape(weight.shape[0], -1)
    e = E[:, index].detach().to("cpu", torch.float64)
    D = torch.outer(e, e @ W) if side == "output" else torch.outer(W @ e, e)
    norm = D.norm()
    if norm == 0:
        raise ValueError(f"layer {layer!r}: the weight has no component along basis vector {index}")
    D = D / norm * W.norm()
    parts = []
    found = False
    for _, p in named_selected_params(model, params):
        if p is weight:
            parts.append(D.reshape(-1))
            found = True
        else:
            parts.append(torch.zeros(p.numel(), dtype=torch.float64))
    if not found:
        raise ValueError(f"layer {layer!r}'s weight is not in the parameter selection")
    return torch.cat(parts)


def hessian_directions(eigenvectors: torch.Tensor, scale: float = 1.0) -> list[torch.Tensor]:
    """Principal directions from Hessian eigenvectors (dim, k): unit columns times ``scale``."""
    return [eigenvectors[:, i].to(torch.float64) * scale for i in range(eigenvectors.shape[1])]


@torch.no_grad()
def evaluate_loss(model: nn.Module, loss_fn: LossFn, batch_list: list[Batch]) -> float:
    """Sample-weighted mean of ``loss_fn(model(x), y)`` over batches, eval mode, no grad."""
    total, count = 0.0, 0
    with eval_mode(model):
        for x, y in batch_list:
            n = int(y.shape[0]) if y.dim() > 0 else 1
            total += float(loss_fn(model(x), y)) * n
            count += n
    return total / count


def _check_direction(d: torch.Tensor, dim: int, what: str) -> torch.Tensor:
    d = torch.as_tensor(d).reshape(-1)
    if d.numel() != dim:
        raise ValueError(f"{what} has {d.numel()} entries, the selected parameters have {dim}")
    return d.to(torch.float64)


def loss_slice_2d(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch] | Batch,
    d1: torch.Tensor,
    d2: torch.Tensor,
    alphas: Sequence[float] | torch.Tensor,
    betas: Sequence[float] | torch.Tensor,
    params: ParamSpec = None,
) -> torch.Tensor:
    """Loss on the plane ``w + a d1 + b d2`` for ``a in alphas``, ``b in betas``.

    Returns:
        Tensor (len(alphas), len(betas)) float64. The parameters are restored afterwards.
    """
    batch_list = as_batch_list(batches)
    w0 = flat_params(model, params)
    dim = w0.numel()
    d1 = _check_direction(d1, dim, "d1")
    d2 = _check_direction(d2, dim, "d2")
    a_t = torch.as_tensor(alphas, dtype=torch.float64).reshape(-1)
    b_t = torch.as_tensor(betas, dtype=torch.float64).reshape(-1)
    out = torch.empty(a_t.numel(), b_t.numel(), dtype=torch.float64)
    base = w0.to(torch.float64).cpu()
    try:
        for i, a in enumerate(a_t):
            for j, b in enumerate(b_t):
                assign_flat_(model, base + a * d1 + b * d2, params)
                out[i, j] = evaluate_loss(model, loss_fn, batch_list)
    finally:
        assign_flat_(model, w0, params)  # w0 is an exact copy in the parameters' dtype
    return out


def loss_slice_1d(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch] | Batch,
    direction: torch.Tensor,
    alphas: Sequence[float] | torch.Tensor,
    params: ParamSpec = None,
) -> torch.Tensor:
    """Loss along the line ``w + a d`` for ``a in alphas``: tensor (len(alphas),) float64."""
    zero = torch.zeros_like(torch.as_tensor(direction, dtype=torch.float64).reshape(-1))
    return loss_slice_2d(model, loss_fn, batches, direction, zero, alphas, [0.0], params)[:, 0]
