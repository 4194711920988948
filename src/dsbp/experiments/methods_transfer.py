"""Harness entries for the spectral transfer extension (METHOD.md §2.4) [ours].

``spectral_adapter``: ``W = W0 + E_src K`` on every Linear/Conv2d, only K trains.
``spectral_penalty``: SGD plus ``mu * ||(I - E_src E_src^T)(W - W0)||_F^2``.
Both take ``E_src`` (top-k activation eigenvectors) and ``W0`` at the run's initial weights,
on the first batch of epoch 0 (the loader is deterministic in (seed, epoch), so this consumes
no RNG stream of the run). In a fine-tuning run, load the pretrained weights first.
"""

from __future__ import annotations

import torch
from torch import nn

from dsbp.experiments.build import BuildContext, Method, _kw, _sgd_kwargs, register_method
from dsbp.experiments.config import RunConfig


def _source_batch(ctx: BuildContext) -> torch.Tensor:
    x, _ = next(iter(ctx.train.iter_epoch(0)))
    return x


def _bases(model: nn.Module, cfg: RunConfig, ctx: BuildContext, side: str) -> dict:
    from dsbp.extensions.transfer import activation_bases

    return activation_bases(model, [_source_batch(ctx)], rank=int(_kw(cfg, "rank", 10)),
                            side=side, seed=cfg.seed)


@register_method("spectral_adapter", settings=("rank", "side"),
                 description="Spectral adapter W = W0 + E_src K on every Linear/Conv2d (only K "
                             "trains; E_src: top-k activation eigenvectors at W0) [ours]")
def _spectral_adapter(model: nn.Module, cfg: RunConfig, ctx: BuildContext) -> Method:
    from dsbp.extensions.transfer import apply_spectral_adapter

    side = str(_kw(cfg, "side", "output"))
    apply_spectral_adapter(model, _bases(model, cfg, ctx, side), side=side)
    params = [p for p in model.parameters() if p.requires_grad]
    return Method(model, torch.optim.SGD(params, **_sgd_kwargs(cfg)))


@register_method("spectral_penalty", settings=("rank", "mu", "side"),
                 description="SGD + spectral transfer penalty mu ||(I - E_src E_src^T)(W - W0)||^2"
                             " (W0, E_src at the initial weights) [ours]")
def _spectral_penalty(model: nn.Module, cfg: RunConfig, ctx: BuildContext) -> Method:
    from dsbp.extensions.transfer import SpectralTransferPenalty

    side = str(_kw(cfg, "side", "output"))
    reg = SpectralTransferPenalty(model, _bases(model, cfg, ctx, side),
                                  mu=float(_kw(cfg, "mu", 1.0)), side=side)
    opt = torch.optim.SGD(model.parameters(), **_sgd_kwargs(cfg))
    handle = reg.attach(opt)
    return Method(model, opt, extra_state={"spectral_penalty": reg}, cleanup=handle.remove)
