"""Hessian-vector products of a model's loss, as a flat-vector operator.

``make_hvp`` turns ``(model, loss_fn, batches)`` into ``matvec(v_flat) -> H v_flat`` over a chosen
set of parameters (all trainable ones, or one layer's weight), ready for
:func:`dsbp.core.lanczos.lanczos` or power iteration.

Conventions used by every diagnostic in this package:

- ``batches`` is an iterable of ``(x, y)`` pairs; ``loss_fn(model(x), y)`` returns a scalar mean
  loss (e.g. ``torch.nn.functional.cross_entropy``). It is re-iterated on every matvec, so pass a
  list (a one-shot generator is materialised into a list once).
- The loss Hessian is the **sample-weighted average over batches**: batch b with n_b samples gets
  weight n_b / N, so with mean-reduced losses this is the Hessian of the mean loss over all the
  samples given [ours].
- **BatchNorm / dropout**: during Hessian work the model is put in ``eval()`` mode, so BatchNorm
  uses its running statistics (and does not update them) and dropout is off; every module's
  previous ``training`` flag is restored afterwards [ours: the stated choice of issue 4]. The
  Hessian is then that of the deterministic function the model computes at test time. Running
  statistics are not updated by the extra forward passes.
- Products use double backward (``autograd.grad`` with ``create_graph=True``), which works with
  any module, hooks included; the graph is rebuilt per matvec, so memory is that of one
  forward + double backward on one batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]
ParamSpec = Iterable[nn.Parameter | torch.Tensor | str] | nn.Module | None

__all__ = [
    "flat_params",
    "make_hvp",
    "make_grad",
    "named_selected_params",
    "eval_mode",
    "as_batch_list",
    "unflatten",
    "assign_flat_",
]


def named_selected_params(
    model: nn.Module, params: ParamSpec = None
) -> list[tuple[str, nn.Parameter]]:
    """Resolve a parameter selection into ``(name, parameter)`` pairs, in model order.

    Args:
        model: the network.
        params: None for every parameter with ``requires_grad``; an ``nn.Module`` (a submodule
            of ``model``) for its trainable parameters; or an iterable of parameters and/or
            parameter names (``"fc1.weight"``) of ``model``.

    Returns:
        List of ``(name, parameter)`` in the order of ``model.named_parameters()``.

    Raises:
        ValueError: an unknown name, a tensor that is not a parameter of ``model``, a
            selected parameter without ``requires_grad``, or an empty selection.
    """
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
    else:
        if isinstance(params, nn.Module):
            wanted_ids = {id(p) for p in params.parameters() if p.requires_grad}
        else:
            by_name = dict(named)
            wanted_ids = set()
            for item in params:
                if isinstance(item, str):
                    if item not in by_name:
                        raise ValueError(f"unknown parameter name {item!r}; "
                                         f"known: {sorted(by_name)[:8]}...")
                    wanted_ids.add(id(by_name[item]))
                elif isinstance(item, torch.Tensor):
                    wanted_ids.add(id(item))
                else:
                    raise ValueError(
                        f"params entries must be parameters or names, got {type(item)}"
                    )
        chosen = [(n, p) for n, p in named if id(p) in wanted_ids]
        if len(chosen) != len(wanted_ids):
            raise ValueError("params contains tensors that are not parameters of the model")
        frozen = [n for n, p in chosen if not p.requires_grad]
        if frozen:
            raise ValueError(f"selected parameters do not require grad: {frozen}")
    if not chosen:
        raise ValueError("the parameter selection is empty")
    return chosen


def flat_params(model: nn.Module, params: ParamSpec = None) -> torch.Tensor:
    """Concatenate the selected parameters into one detached flat vector.

    Args:
        model: the network.
        params: selection as in :func:`named_selected_params` (default: all trainable).

    Returns:
        Tensor (dim,), a detached copy, in the parameters' dtype and device; the order is the
        order used by :func:`make_hvp` and :func:`unflatten`.
    """
    ps = [p for _, p in named_selected_params(model, params)]
    return torch.cat([p.detach().reshape(-1) for p in ps]).clone()


def unflatten(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split a flat vector (dim,) into tensors shaped like ``like`` (views of ``flat``)."""
    sizes = [p.numel() for p in like]
    if flat.numel() != sum(sizes):
        raise ValueError(f"flat vector has {flat.numel()} entries, parameters have {sum(sizes)}")
    return [c.view_as(p) for c, p in zip(torch.split(flat.reshape(-1), sizes), like, strict=True)]


@torch.no_grad()
def assign_flat_(model: nn.Module, flat: torch.Tensor, params: ParamSpec = None) -> None:
    """Copy a flat vector (dim,) into the selected parameters, in place."""
    ps = [p for _, p in named_selected_params(model, params)]
    for p, c in zip(ps, unflatten(flat, ps), strict=True):
        p.copy_(c.to(dtype=p.dtype, device=p.device))


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode; restore every submodule's own ``training`` flag on exit."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def as_batch_list(batches: Iterable[Batch] | Batch) -> list[Batch]:
    """Materialise ``batches`` into a list of ``(x, y)``; a single ``(x, y)`` pair is accepted.

    Raises:
        ValueError: when there is no batch.
    """
    if isinstance(batches, tuple) and len(batches) == 2 and isinstance(batches[0], torch.Tensor):
        out = [batches]
    else:
        out = [tuple(b) for b in batches]  # type: ignore[misc]
    if not out:
        raise ValueError("batches is empty")
    for b in out:
        if len(b) != 2:
            raise ValueError("each batch must be an (x, y) pair")
    return out  # type: ignore[return-value]


def _batch_weights(batch_list: list[Batch]) -> list[float]:
    sizes = [int(y.shape[0]) if y.dim() > 0 else 1 for _, y in batch_list]
    total = float(sum(sizes))
    return [s / total for s in sizes]


def make_grad(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch] | Batch,
    params: ParamSpec = None,
) -> Callable[[], torch.Tensor]:
    """Return ``grad() -> g_flat (dim,)``: the gradient of the batch-averaged loss (eval mode).

    Same conventions as :func:`make_hvp`. Does not touch ``.grad``.
    """
    batch_list = as_batch_list(batches)
    weights = _batch_weights(batch_list)
    ps = [p for _, p in named_selected_params(model, params)]

    def grad() -> torch.Tensor:
        total = None
        with eval_mode(model):
            for (x, y), w in zip(batch_list, weights, strict=True):
                gs = torch.autograd.grad(loss_fn(model(x), y), ps, allow_unused=True)
                flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                  for g, p in zip(gs, ps, strict=True)])
                total = flat * w if total is None else total + flat * w
        assert total is not None
        return total.detach()

    return grad


def make_hvp(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch] | Batch,
    params: ParamSpec = None,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """Hessian-vector product operator of the loss w.r.t. the selected parameters.

    ``H = sum_b (n_b / N) * d^2 loss_fn(model(x_b), y_b) / d theta^2`` at the current parameters,
    computed with the model in eval mode (BatchNorm running statistics, dropout off) and the
    previous modes restored afterwards; see the module docstring.

    Args:
        model: the network; its parameters are read at call time of the matvec (so the operator
            follows in-place parameter updates).
        loss_fn: ``loss_fn(output, target) -> scalar`` (mean over the batch).
        batches: iterable of ``(x, y)`` (materialised into a list once), or one ``(x, y)``.
        params: selection as in :func:`named_selected_params`: None (all trainable), a
            submodule, or parameters / names (e.g. ``["fc1.weight"]`` for one layer's weight,
            the per-layer Hessian block).

    Returns:
        ``(matvec, dim)``: ``matvec(v)`` takes a flat vector (dim,) of any float dtype / device
        and returns ``H v`` (dim,) in the parameters' dtype and device; ``dim`` is the number of
        selected scalars. Parameter order is that of :func:`flat_params`.
    """
    batch_list = as_batch_list(batches)
    weights = _batch_weights(batch_list)
    ps = [p for _, p in named_selected_params(model, params)]
    dim = sum(p.numel() for p in ps)
    ref = ps[0]

    def matvec(v: torch.Tensor) -> torch.Tensor:
        v = torch.as_tensor(v).reshape(-1)
        if v.numel() != dim:
            raise ValueError(f"hvp: vector has {v.numel()} entries, expected dim={dim}")
        vs = unflatten(v.detach().to(dtype=ref.dtype, device=ref.device), ps)
        total = None
        with eval_mode(model), torch.enable_grad():
            for (x, y), w in zip(batch_list, weights, strict=True):
                loss = loss_fn(model(x), y)
                gs = torch.autograd.grad(loss, ps, create_graph=True, allow_unused=True)
                pairs = [(g, vi) for g, vi in zip(gs, vs, strict=True) if g is not None]
                if not pairs or not any(g.requires_grad for g, _ in pairs):
                    # Loss is linear (or constant) in the selected parameters: H = 0.
                    hv = [torch.zeros_like(p) for p in ps]
                else:
                    gv = sum((g * vi).sum() for g, vi in pairs)
                    assert isinstance(gv, torch.Tensor)  # pairs is not empty
                    hv_raw = torch.autograd.grad(gv, ps, allow_unused=True)
                    hv = [torch.zeros_like(p) if h is None else h
                          for h, p in zip(hv_raw, ps, strict=True)]
                flat = torch.cat([h.reshape(-1) for h in hv]).detach()
                total = flat * w if total is None else total + flat * w
        assert total is not None
        return total

    return matvec, dim
