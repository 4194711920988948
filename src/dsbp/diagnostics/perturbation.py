"""Perturbation dynamics: loss increase under Gaussian weight noise of growing radius.

For each relative radius ``r`` and each of ``n_draws`` draws, the weights become ``w + eps`` and
the loss increase ``L(w + eps) - L(w)`` is recorded (eval mode, no grad, weights restored).
The noise is Gaussian with a scale relative to the weights [ours: the paper's figure 4 does not
define it]:

- ``mode="filter"`` (default): for each filter (slice along dim 0 of a >= 2-D parameter; a 1-D
  parameter is one filter) with ``n_f`` entries and norm ``||w_f||``, ``eps_f ~ N(0, s_f^2 I)``
  with ``s_f = r * ||w_f|| / sqrt(n_f)``, so ``E ||eps_f||^2 = r^2 ||w_f||^2`` (Li et al.'s
  filter-wise scale; scale-invariant under BatchNorm-style rescaling of filters).
- ``mode="global"``: ``eps ~ N(0, s^2 I)`` with ``s = r * ||w|| / sqrt(dim)``, so
  ``E ||eps||^2 = r^2 ||w||^2``.

At a minimum with Hessian H, ``E[L(w + eps) - L(w)] ~= 0.5 * sum_i s_i^2 H_ii`` for small r.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dsbp.diagnostics.hvp import (
    Batch,
    LossFn,
    ParamSpec,
    as_batch_list,
    assign_flat_,
    flat_params,
    named_selected_params,
)
from dsbp.diagnostics.landscape import evaluate_loss

__all__ = ["PerturbationCurve", "noise_scales", "perturbation_curve"]


@dataclass(frozen=True)
class PerturbationCurve:
    """A sharpness curve.

    Attributes:
        radii: (R,) relative radii r.
        mean_increase, std_increase: (R,) mean and sample std over draws of ``L(w+eps) - L(w)``.
        stderr: (R,) standard error of the mean (std / sqrt(n_draws)).
        increases: (R, n_draws) the raw increases.
        base_loss: ``L(w)``.
        mode: ``"filter"`` or ``"global"``.
    """

    radii: torch.Tensor
    mean_increase: torch.Tensor
    std_increase: torch.Tensor
    stderr: torch.Tensor
    increases: torch.Tensor
    base_loss: float
    mode: str

    def to_dict(self) -> dict:
        """Plain-Python version for JSON."""
        return {
            "radii": self.radii.tolist(),
            "mean_increase": self.mean_increase.tolist(),
            "std_increase": self.std_increase.tolist(),
            "stderr": self.stderr.tolist(),
            "base_loss": self.base_loss,
            "mode": self.mode,
            "n_draws": int(self.increases.shape[1]),
        }


def noise_scales(model: nn.Module, params: ParamSpec = None, mode: str = "filter") -> torch.Tensor:
    """Per-entry noise std for relative radius 1, flat (dim,) float64 (see module docstring)."""
    if mode not in ("filter", "global"):
        raise ValueError(f"mode must be 'filter' or 'global', got {mode!r}")
    named = named_selected_params(model, params)
    if mode == "global":
        w = flat_params(model, params).to(torch.float64)
        return torch.full_like(w, (w.norm() / w.numel() ** 0.5).item()).cpu()
    parts = []
    for _, p in named:
        w = p.detach().to("cpu", torch.float64)
        wf = w.reshape(w.shape[0], -1) if w.dim() >= 2 else w.reshape(1, -1)
        s = wf.norm(dim=1, keepdim=True) / wf.shape[1] ** 0.5  # (filters, 1)
        parts.append(s.expand_as(wf).reshape(-1))
    return torch.cat(parts)


def perturbation_curve(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch] | Batch,
    radii: Sequence[float] | torch.Tensor,
    n_draws: int = 10,
    mode: str = "filter",
    params: ParamSpec = None,
    *,
    generator: torch.Generator | None = None,
) -> PerturbationCurve:
    """Loss increase under Gaussian weight perturbations of relative radius ``r`` (figure 4).

    Args:
        model, loss_fn, batches: as in :mod:`dsbp.diagnostics.hvp`.
        radii: relative radii r (>= 0); the noise std is ``r`` times :func:`noise_scales`.
        n_draws: draws per radius (>= 2 for a spread). The same standard-normal draws are reused
            across radii (common random numbers), so the curve is smooth in r.
        mode: ``"filter"`` or ``"global"`` (module docstring).
        params: parameter selection (default: all trainable).
        generator: RNG for the draws.

    Returns:
        :class:`PerturbationCurve`.
    """
    if not isinstance(n_draws, int) or n_draws < 2:
        raise ValueError(f"n_draws must be an int >= 2, got {n_draws!r}")
    r_t = torch.as_tensor(radii, dtype=torch.float64).reshape(-1)
    if (r_t < 0).any():
        raise ValueError("radii must be >= 0")
    batch_list = as_batch_list(batches)
    scales = noise_scales(model, params, mode)
    w0 = flat_params(model, params)
    base = w0.to("cpu", torch.float64)
    base_loss = evaluate_loss(model, loss_fn, batch_list)
    z = torch.randn(n_draws, base.numel(), generator=generator, dtype=torch.float64)
    inc = torch.empty(r_t.numel(), n_draws, dtype=torch.float64)
    try:
        for i, r in enumerate(r_t):
            for j in range(n_draws):
                assign_flat_(model, base + r * scales * z[j], params)
                inc[i, j] = evaluate_loss(model, loss_fn, batch_list) - base_loss
    finally:
        assign_flat_(model, w0, params)
    std = inc.std(dim=1, unbiased=True)
    return PerturbationCurve(r_t, inc.mean(dim=1), std, std / n_draws**0.5, inc, base_loss, mode)
