"""Harness entries of two DSBP extensions: dynamic spectral inference (training side, METHOD.md
§2.1) and Lie-algebra-inspired dynamics (§2.5). Imported by ``discover_methods``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dsbp.experiments.build import (
    _DSBP_SETTINGS,
    _DSBP_SWITCHES,
    BuildContext,
    Method,
    _sgd_kwargs,
    register_method,
)
from dsbp.experiments.config import RunConfig

_ADAPTIVE = ("rho", "tau", "p_min", "p_max", "grow", "probe_every", "probe_iters",
             "ema_dense_max")
_LIE = ("track_every", "lie_step")


def _split(cfg: RunConfig, extra: Sequence[str]) -> tuple[dict, dict, dict]:
    given = cfg.method_kwargs

    def pick(keys: Sequence[str]) -> dict[str, Any]:
        return {k: given[k] for k in keys if k in given}

    return pick(_DSBP_SETTINGS), pick(_DSBP_SWITCHES), pick(extra)


@register_method("dsbp_adaptive", settings=(*_DSBP_SETTINGS, *_DSBP_SWITCHES, *_ADAPTIVE),
                 description="DSBP with EMA covariance, drift-triggered early refresh and an "
                 "adaptive interval in [p_min, p_max] [ours] (dynamic spectral inference)")
def _dsbp_adaptive(model: nn.Module, cfg: RunConfig, ctx: BuildContext) -> Method:
    from dsbp.extensions.inference import AdaptiveDSBP

    kw, switches, extra = _split(cfg, _ADAPTIVE)
    opt = AdaptiveDSBP(model, torch.optim.SGD, projector_kwargs={"seed": cfg.seed, **switches},
                       **kw, **extra, **_sgd_kwargs(cfg))
    return Method(model, opt, cleanup=opt.projector.remove)


def _lie(model: nn.Module, cfg: RunConfig, rotation: bool) -> Method:
    from dsbp.extensions.lie_dynamics import LieDSBP

    kw, switches, extra = _split(cfg, _LIE)
    opt = LieDSBP(model, torch.optim.SGD, projector_kwargs={"seed": cfg.seed, **switches},
                  rotation=rotation, **kw, **extra, **_sgd_kwargs(cfg))
    return Method(model, opt, cleanup=opt.projector.remove)


@register_method("dsbp_lie", settings=(*_DSBP_SETTINGS, *_DSBP_SWITCHES, *_LIE),
                 description="DSBP whose bases follow the Cayley double-bracket flow between "
                 "refreshes (Lie-algebra dynamics)")
def _dsbp_lie(model: nn.Module, cfg: RunConfig, ctx: BuildContext) -> Method:
    return _lie(model, cfg, rotation=False)


@register_method("dsbp_lie_rot", settings=(*_DSBP_SETTINGS, *_DSBP_SWITCHES, *_LIE),
                 description="dsbp_lie plus the rotation-only weight update "
                 "W <- Cay(-lr (G~ W^T - W G~^T)) W (singular values preserved)")
def _dsbp_lie_rot(model: nn.Module, cfg: RunConfig, ctx: BuildContext) -> Method:
    return _lie(model, cfg, rotation=True)
