"""Spectral meta-learning (METHOD.md §2, extension 3) [ours: definitions].

MAML whose inner loop steps along the DSBP-projected gradient. For each task, the bases are
the top-k eigenvectors of every Linear / Conv2d layer's activation covariance on that task's
*support set*, at the starting point of the inner loop (the meta-parameters ``theta``). They
are computed once per task (one extra forward pass, no backward), detached and held constant
through all inner steps, so no gradient ever flows through the eigensolver, in first- or
second-order mode. The inner loop is then

    phi_{j+1} = phi_j - alpha * P_E(grad L_S(phi_j)),   P_E(G) = E E^T G  (output side)
                                                       or G E E^T       (input side),

applied to each layer's weight (viewed as d_out x d_in; conv: C_out x C_in*kh*kw); biases,
BatchNorm parameters and other parameters keep their plain gradient, as in DSBP. DSBP's
sharpness term is not used in the inner loop [ours]: with a handful of inner steps from a
fresh basis it has nothing to act on. With k >= d for every layer the projection is the
identity and the method is MAML.

It is :class:`dsbp.baselines.maml.MAML` with a per-task ``inner_grad_transform``; the outer
loop, first-/second-order handling and evaluation are MAML's own::

    smaml = SpectralMAML(model, rank=10, inner_lr=0.1, inner_steps=5)   # first order by default
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for tasks in batches:                       # [(support_x, support_y, query_x, query_y)]
        opt.zero_grad(); smaml.meta_loss(tasks).backward(); opt.step()
    loss, acc = smaml.evaluate(test_tasks)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from dsbp.baselines.maml import MAML, GradTransform, Params
from dsbp.core.projection import SIDES, project
from dsbp.extensions.transfer import activation_bases
from dsbp.layers import adapters
from dsbp.layers.hooks import select_layers

__all__ = ["SpectralMAML", "projected_grad_transform"]


def _weight_name(layer: str) -> str:
    return f"{layer}.weight" if layer else "weight"


def projected_grad_transform(bases: Mapping[str, torch.Tensor], side: str = "output"
                             ) -> GradTransform:
    """MAML ``inner_grad_transform`` projecting each layer's weight gradient onto its basis.

    Args:
        bases: ``{layer name: E}`` with ``E`` (d, k) orthonormal (d = d_out on the output side,
            d_in on the input side); the gradient of parameter ``"<layer>.weight"`` becomes
            ``E E^T G`` (output) or ``G E E^T`` (input), G viewed as (d_out, d_in).
        side: ``"output"`` or ``"input"``.

    Returns:
        ``T(grads) -> grads`` (a new dict; gradients of other parameters pass through). It is
        linear in the gradient with constant ``E`` (detached here), so in second-order MAML the
        meta-gradient flows through it but never into the bases.
    """
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    fixed = {_weight_name(n): E.detach() for n, E in bases.items()}

    def transform(grads: Params) -> Params:
        out = dict(grads)
        for pname, E in fixed.items():
            if pname not in out:
                continue  # a frozen layer: MAML does not adapt it
            G = out[pname]
            out[pname] = project(adapters.as_matrix(G), E.to(G.dtype), side).view_as(G)
        return out

    return transform


class SpectralMAML(MAML):
    """MAML with the DSBP-projected inner gradient, bases from each task's support set [ours].

    Args:
        model: the network whose parameters are the meta-initialisation ``theta``.
        rank: k, eigenvectors per layer (clipped to each layer's width; k >= d is plain MAML).
        side: ``"output"`` (activation outputs, the paper's reading) or ``"input"``.
        layers: module names to project; ``None`` means every Linear / Conv2d.
        inner_lr: inner step size alpha.
        inner_steps: inner gradient steps m.
        first_order: FOMAML-style meta-gradient. Default True (METHOD.md §2.3: first order
            by default, second order optional).
        loss_fn: ``loss_fn(logits, y)``, default cross-entropy.
        max_rows: cap on support activation rows per layer entering the eigensolve.
        seed: seeds the row subsampling (only used when a layer has more than ``max_rows``).

    Raises:
        ValueError: a bad rank / side / layer name, or MAML's own checks.
    """

    def __init__(
        self,
        model: nn.Module,
        rank: int = 10,
        side: str = "output",
        layers: Iterable[str] | None = None,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        first_order: bool = True,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
        *,
        max_rows: int = 8192,
        seed: int = 0,
    ) -> None:
        super().__init__(model, inner_lr=inner_lr, inner_steps=inner_steps,
                         first_order=first_order, loss_fn=loss_fn)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        self.rank, self.side, self.max_rows, self.seed = rank, side, int(max_rows), int(seed)
        self.layers = [n for n, _ in select_layers(model, layers)]

    def support_bases(self, params: Mapping[str, torch.Tensor], support_x: torch.Tensor
                      ) -> dict[str, torch.Tensor]:
        """Per-task bases: top-k eigenvectors of each layer's activation covariance on the
        support inputs, with the model at ``params`` (detached; BatchNorm statistics untouched).

        Returns ``{layer name: E (d, min(k, d))}``.
        """
        return activation_bases(self.model, [support_x], self.rank, self.side, self.layers,
                                params=params, max_rows=self.max_rows, seed=self.seed)

    def adapt(
        self,
        params: Mapping[str, torch.Tensor],
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        inner_grad_transform: GradTransform | None = None,
    ) -> Params:
        """MAML's inner loop with ``T = projected_grad_transform(support_bases(params, x_S))``.

        An explicit ``inner_grad_transform`` replaces the spectral one (as in MAML).
        """
        if inner_grad_transform is None:
            inner_grad_transform = projected_grad_transform(
                self.support_bases(params, support_x), self.side)
        return super().adapt(params, support_x, support_y, inner_grad_transform)
