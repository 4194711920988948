"""Spectral transfer regularisation (METHOD.md §2, extension 4) [ours: definitions].

Fine-tuning a pretrained network with weights ``W0`` on a new task, keeping each layer's
update in the span of its *source* spectral basis ``E_src``: the top-k eigenvectors of the
layer's activation covariance on source data at ``W0`` (the same covariance DSBP uses,
computed with :class:`~dsbp.SpectralProjector`). Two forms:

* **Penalty** ``mu * ||(I - E_src E_src^T)(W - W0)||_F^2`` (output side, ``E_src`` (d_out, k));
  the input-side analogue is ``mu * ||(W - W0)(I - E_src E_src^T)||_F^2`` with ``E_src``
  (d_in, k) from the layer's input covariance (im2col patches for a conv). It leaves updates
  inside the source subspace free and charges the part outside it. Use it as a loss term
  (:meth:`SpectralTransferPenalty.penalty`) or as a gradient hook on any optimizer
  (:meth:`SpectralTransferPenalty.attach`).
* **Spectral adapter** ``W = W0 + E_src K`` (output side; ``K`` (k, d_in) is the only trainable
  tensor, k * d_in parameters per layer): LoRA with its left factor frozen to the source
  eigenvectors. Input side: ``W = W0 + K E_src^T`` with ``K`` (d_out, k).

Weights are viewed as (d_out, d_in) matrices, a Conv2d weight as C_out x (C_in*kh*kw)
(METHOD.md §1). Biases are neither penalised nor adapted. [ours]

Typical use::

    bases = activation_bases(model, source_batches, rank=8)          # at W0
    reg = SpectralTransferPenalty(model, bases, mu=1.0)              # W0 = current weights
    reg.attach(optimizer)                                            # adds its gradient
    # or: the parameter-efficient form
    apply_spectral_adapter(model, bases, trainable=("head.2",))
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from dsbp.core.projection import SIDES, residual
from dsbp.layers import adapters
from dsbp.optim.projector import SpectralProjector

__all__ = [
    "SpectralAdapter",
    "SpectralTransferPenalty",
    "activation_bases",
    "apply_spectral_adapter",
    "spectral_adapter_param_count",
    "transfer_penalty",
]


def _check_side(side: str) -> str:
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    return side


# --------------------------------------------------------------------------- bases
def activation_bases(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    rank: int,
    side: str = "output",
    layers: Iterable[str] | None = None,
    *,
    params: Mapping[str, torch.Tensor] | None = None,
    max_rows: int = 8192,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Top-k activation-covariance eigenvectors of each Linear / Conv2d layer on some inputs.

    The bases DSBP itself would compute (a fresh :class:`~dsbp.SpectralProjector` captures the
    activations; its first refresh is an exact ``eigh`` for d <= 2048), but on demand, on
    the given inputs, without touching the model: the forward passes run in train mode (the
    projector's capture condition, and what DSBP sees during training) through
    ``torch.func.functional_call`` on detached parameters and *copies* of the buffers, so
    BatchNorm running statistics are never written (not even in place and restored, which
    would break an autograd graph that saved them, e.g. MAML's); the training flag is
    restored and no ``.grad`` is touched. The result is detached: no gradient flows through
    the eigensolver.

    Args:
        model: the network at the weights the bases belong to (``W0`` for transfer).
        batches: input tensors (N, ...) fed to ``model``; rows of all of them are pooled
            (at most ``max_rows`` per layer, subsampled by a seeded private RNG).
        rank: k, eigenvectors per layer (clipped to the layer width d).
        side: ``"output"`` (d = d_out, the paper's reading) or ``"input"`` (d = d_in).
        layers: module names; ``None`` means every Linear / Conv2d.
        params: optional ``{name: tensor}`` to run the forward pass with instead of the
            module's own parameters (``torch.func.functional_call``; used per task by
            spectral MAML). Detached before use.
        max_rows: cap on activation rows per layer.
        seed: seeds the row subsampling.

    Returns:
        ``{layer name: E}`` with ``E`` (d, min(k, d)), orthonormal columns ordered by
        eigenvalue, descending.

    Raises:
        ValueError: bad rank / side / layer names (from the projector), or no batch given.
    """
    _check_side(side)
    proj = SpectralProjector(model, rank=rank, interval=1, side=side, sharpness=0.0,
                             max_rows=max_rows, layers=layers, seed=seed)
    names = proj.layer_names()
    was_training = model.training
    own = {k: v.detach() for k, v in model.named_parameters()}
    own.update({k: v.detach() for k, v in (params or {}).items()})
    try:
        model.train()
        seen = 0
        with torch.enable_grad():
            for x in batches:
                # fresh buffer copies per batch: BatchNorm updates them, not the model's
                state = {**own, **{k: b.detach().clone() for k, b in model.named_buffers()}}
                torch.func.functional_call(model, state, (x,))
                seen += 1
        if seen == 0:
            raise ValueError("activation_bases needs at least one input batch")
        proj.refresh_now()  # a new projector is due at once: every layer captured rows
        out = {n: proj.basis(n).detach().clone() for n in names}
    finally:
        proj.remove()
        model.train(was_training)
    return out


# --------------------------------------------------------------------------- penalty
def transfer_penalty(
    W: torch.Tensor, W0: torch.Tensor, E: torch.Tensor, mu: float, side: str = "output"
) -> torch.Tensor:
    """Spectral transfer penalty of one layer (METHOD.md §2.4) [ours: definition].

    ``mu * ||(I - E E^T)(W - W0)||_F^2`` (output side) or ``mu * ||(W - W0)(I - E E^T)||_F^2``
    (input side). Computed with thin products, never forming the d x d projector.

    Args:
        W: current weight, (d_out, d_in) or a conv weight (viewed as C_out x C_in*kh*kw).
        W0: the pretrained weight, same shape as ``W`` (treated as a constant).
        E: source basis ``E_src`` (d, k), orthonormal columns; d = d_out (output) / d_in (input).
        mu: penalty weight, >= 0.
        side: ``"output"`` or ``"input"``.

    Returns:
        0-d tensor, differentiable with respect to ``W``.
    """
    _check_side(side)
    if W.shape != W0.shape:
        raise ValueError(f"W {tuple(W.shape)} and W0 {tuple(W0.shape)} must have the same shape")
    D = adapters.as_matrix(W) - adapters.as_matrix(W0).detach()
    d = D.shape[0] if side == "output" else D.shape[1]
    if E.ndim != 2 or E.shape[0] != d:
        raise ValueError(f"basis E must be ({d}, k) for side={side!r} and W of shape "
                         f"{tuple(W.shape)}, got {tuple(E.shape)}")
    R = residual(D, E.to(D.dtype).detach(), side)
    return mu * R.pow(2).sum()


class SpectralTransferPenalty:
    """The spectral transfer penalty over a model's layers, as a loss term or optimizer hook.

    ``W0`` is copied from the model's weights when the object is built (call it right after
    loading the pretrained weights). Total penalty ``sum_l mu * ||(I - E_l E_l^T)(W_l - W0_l)||^2``.

    Args:
        model: the network being fine-tuned.
        bases: ``{layer name: E_src}`` (from :func:`activation_bases` at ``W0``); the layers
            penalised are exactly these.
        mu: penalty weight (>= 0).
        side: the side the bases were computed on.

    Raises:
        ValueError: negative / non-finite mu, a name that is not a Linear / Conv2d of the
            model, or a basis of the wrong height.
    """

    def __init__(self, model: nn.Module, bases: Mapping[str, torch.Tensor], mu: float,
                 side: str = "output") -> None:
        mu = float(mu)
        if not (mu >= 0.0 and mu != float("inf")):
            raise ValueError(f"mu must be a finite number >= 0, got {mu!r}")
        self.mu, self.side = mu, _check_side(side)
        modules = dict(model.named_modules())
        # Linear / Conv2d layers (checked below); Any since torch types their attributes
        # as ``Tensor | Module``
        self.modules: dict[str, Any] = {}
        self.bases: dict[str, torch.Tensor] = {}
        self.W0: dict[str, torch.Tensor] = {}
        for name, E in bases.items():
            m = modules.get(name)
            if m is None or not adapters.is_supported(m):
                raise ValueError(f"bases names {name!r}, which is not a Linear/Conv2d of the model")
            d = adapters.dim(m, side)
            if E.ndim != 2 or E.shape[0] != d:
                raise ValueError(f"basis for {name!r} must be ({d}, k), got {tuple(E.shape)}")
            self.modules[name] = m
            self.bases[name] = E.detach().clone().to(m.weight.device, m.weight.dtype)
            self.W0[name] = m.weight.detach().clone()

    def penalty(self) -> torch.Tensor:
        """The total penalty (0-d tensor, differentiable w.r.t. the weights)."""
        total = None
        for n, m in self.modules.items():
            p = transfer_penalty(m.weight, self.W0[n], self.bases[n], self.mu, self.side)
            total = p if total is None else total + p
        return total if total is not None else torch.zeros(())

    @torch.no_grad()
    def add_grad_(self) -> None:
        """Add the penalty's gradient ``2 mu (I - E E^T)(W - W0)`` to each weight's ``.grad``.

        The trainer-hook form: call it after ``loss.backward()``, before ``optimizer.step()``
        (or :meth:`attach` it), and the step is that of ``loss + penalty()`` without
        differentiating the penalty. A weight without ``.grad`` gets one.
        """
        if self.mu == 0.0:
            return
        for n, m in self.modules.items():
            W = m.weight
            D = adapters.as_matrix(W) - adapters.as_matrix(self.W0[n])
            g = residual(D, self.bases[n], self.side).mul_(2.0 * self.mu).view_as(W)
            if W.grad is None:
                W.grad = g
            else:
                W.grad.add_(g)

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Run :meth:`add_grad_` before every ``optimizer.step()`` (a step pre-hook).

        Returns the hook's handle; ``handle.remove()`` detaches it.
        """
        return optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.add_grad_())

    def state_dict(self) -> dict:
        """Tensors and plain values only (``torch.load(weights_only=True)`` reads it)."""
        return {"mu": self.mu, "side": self.side, "bases": dict(self.bases), "W0": dict(self.W0)}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore ``mu``, bases and ``W0`` saved by :meth:`state_dict` (same layer names)."""
        if set(state["bases"]) != set(self.modules):
            raise ValueError(f"state has layers {sorted(state['bases'])}, penalty has "
                             f"{sorted(self.modules)}")
        if state["side"] != self.side:
            raise ValueError(f"state was saved with side={state['side']!r}, not {self.side!r}")
        self.mu = float(state["mu"])
        for n, m in self.modules.items():
            self.bases[n] = state["bases"][n].detach().clone().to(m.weight.device)
            self.W0[n] = state["W0"][n].detach().clone().to(m.weight.device)


# --------------------------------------------------------------------------- adapter
class SpectralAdapter(nn.Module):
    """``W = W0 + E_src K`` around a frozen Linear / Conv2d; only ``K`` trains [ours].

    Output side: ``E_src`` (d_out, k) frozen buffer, ``K`` (k, d_in) trainable, k * d_in
    parameters. Input side: ``W = W0 + K E_src^T`` with ``E_src`` (d_in, k) and ``K`` (d_out, k),
    k * d_out parameters. ``K`` starts at zero, so the wrapped layer starts equal to the base.
    The forward pass never forms the update: ``base(x) + second(first(x))`` with the factors
    ``(first, second) = (K, E)`` (output side) or ``(E^T, K)`` (input side), a Linear pair or,
    for a conv, a conv with the base's geometry into k channels followed by a 1x1 conv
    (the LoRA-for-conv layout).

    Args:
        base: the pretrained layer; its parameters are frozen (``requires_grad=False``).
        E: source basis (d, k), orthonormal columns.
        side: ``"output"`` or ``"input"``.

    Raises:
        ValueError: a basis of the wrong height, or a grouped conv.
        TypeError: a layer that is neither Linear nor Conv2d.
    """

    base: nn.Linear | nn.Conv2d
    E: torch.Tensor  # a buffer

    def __init__(self, base: nn.Module, E: torch.Tensor, side: str = "output") -> None:
        super().__init__()
        if not adapters.is_supported(base):
            raise TypeError("SpectralAdapter wraps nn.Linear / nn.Conv2d, got "
                            f"{type(base).__name__}")
        layer = cast("nn.Linear | nn.Conv2d", base)  # is_supported checked just above
        if isinstance(base, nn.Conv2d) and base.groups != 1:
            raise ValueError("SpectralAdapter needs groups=1 convolutions, got "
                             f"groups={base.groups}")
        self.side = _check_side(side)
        d_out, d_in = adapters.as_matrix(layer.weight).shape
        d = d_out if side == "output" else d_in
        if E.ndim != 2 or E.shape[0] != d or E.shape[1] < 1:
            raise ValueError(f"basis E must be ({d}, k) with k >= 1 for side={side!r}, "
                             f"got {tuple(E.shape)}")
        k = E.shape[1]
        self.base = layer
        for p in base.parameters():
            p.requires_grad_(False)
        w = layer.weight
        self.register_buffer("E", E.detach().clone().to(w.device, w.dtype))
        shape = (k, d_in) if side == "output" else (d_out, k)
        self.K = nn.Parameter(torch.zeros(shape, device=w.device, dtype=w.dtype))

    @property
    def rank(self) -> int:
        """k, the number of source eigenvectors."""
        return int(self.E.shape[1])

    def delta(self) -> torch.Tensor:
        """The update ``E K`` (output) or ``K E^T`` (input), shaped like the base weight."""
        D = self.E @ self.K if self.side == "output" else self.K @ self.E.T
        return D.view_as(self.base.weight)

    def merged_weight(self) -> torch.Tensor:
        """``W0 + delta()``: the effective weight."""
        return self.base.weight + self.delta()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = (self.K, self.E) if self.side == "output" else (self.E.T, self.K)
        if isinstance(self.base, nn.Linear):
            return self.base(x) + F.linear(F.linear(x, first), second)
        conv = self.base
        z = conv._conv_forward(x, first.reshape(-1, *conv.weight.shape[1:]), None)  # (N, k, H', W')
        return conv(x) + torch.einsum("ok,nkhw->nohw", second, z)


def spectral_adapter_param_count(model: nn.Module, rank: int, side: str = "output",
                                 layers: Iterable[str] | None = None) -> int:
    """Trainable parameters a spectral adapter of rank k would add: sum of k * d_in (output
    side) or k * d_out (input side) over the layers, with k clipped to each layer's width."""
    _check_side(side)
    modules = dict(model.named_modules())
    names = [n for n, m in modules.items() if adapters.is_supported(m)] if layers is None \
        else list(layers)
    total = 0
    for n in names:
        d_out, d_in = adapters.as_matrix(modules[n].weight).shape
        d, other = (d_out, d_in) if side == "output" else (d_in, d_out)
        total += min(rank, d) * other
    return total


def apply_spectral_adapter(
    model: nn.Module,
    bases: Mapping[str, torch.Tensor],
    side: str = "output",
    trainable: Sequence[str] = (),
) -> nn.Module:
    """Wrap the named layers in :class:`SpectralAdapter`, in place, and freeze everything else.

    After the call the trainable parameters are the adapters' ``K`` plus every parameter
    whose name starts with one of ``trainable`` (e.g. a freshly initialised classifier head,
    like peft's ``modules_to_save``).

    Args:
        model: the pretrained network (modified in place and returned).
        bases: ``{layer name: E_src}``, e.g. from :func:`activation_bases` at ``W0``.
        side: the side the bases were computed on.
        trainable: name prefixes of modules that stay fully trainable; they must not be
            adapted as well.

    Returns:
        ``model``, with adapters in place.
    """
    _check_side(side)
    modules = dict(model.named_modules())
    for name in bases:
        if name not in modules or not adapters.is_supported(modules[name]):
            raise ValueError(f"bases names {name!r}, which is not a Linear/Conv2d of the model")
        if any(name == t or name.startswith(t + ".") for t in trainable):
            raise ValueError(f"layer {name!r} is both adapted and listed in trainable")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, E in bases.items():
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        setattr(parent, child, SpectralAdapter(modules[name], E, side))
    for pname, p in model.named_parameters():
        if any(pname.startswith(t + ".") for t in trainable):
            p.requires_grad_(True)
    return model
