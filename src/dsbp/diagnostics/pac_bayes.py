"""A PAC-Bayes generalisation bound for a trained network (the project's reading of Theorem 1).

Bound (Maurer 2004 / Seeger's kl form of McAllester's theorem): for a prior P fixed before seeing
the m training samples, with probability >= 1 - delta over the sample, for every posterior Q,

    kl( e_S(Q) || e(Q) ) <= ( KL(Q || P) + ln(2 sqrt(m) / delta) ) / m,

where e_S(Q), e(Q) are the empirical and true 0-1 errors of the Gibbs classifier (weights drawn
from Q) and kl the Bernoulli KL. So ``e(Q) <= kl^{-1}(e_S(Q), RHS)`` (the *kl-inverse form*,
used for ``bound``); Pinsker gives the looser *square-root form*
``e(Q) <= e_S(Q) + sqrt(RHS / 2)`` (reported as ``bound_sqrt``).

Choices [ours, following Dziugaite & Roy 2017]:

- Posterior ``Q = N(w, s^2 I)`` around the trained weights ``w``; prior ``P = N(w0, s^2 I)``
  around the initial weights ``w0`` (data-independent), so ``KL = ||w - w0||^2 / (2 s^2)``.
- ``s`` is picked from a fixed grid of J values; a union bound over the J priors replaces
  ``delta_pb`` by ``delta_pb / J``.
- ``e_S(Q)`` is estimated by Monte Carlo over ``n_mc`` weight draws; the Langford-Caruana sample
  bound ``e_S(Q) <= kl^{-1}(e_hat, ln(2 J / delta_mc) / n_mc)`` (union over the grid as well)
  turns the estimate into an upper bound holding with probability >= 1 - delta_mc.
- ``delta = delta_pb + delta_mc`` is the total failure probability (default 0.05 = 0.04 + 0.01).

**BatchNorm** [ours]. In eval mode a BatchNorm layer applies its running statistics, buffers
computed from training data. Held fixed at their trained values in both prior and posterior,
they would make the prior depend on the sample. So by default (``batchnorm="bounded"``) they
are part of what is bounded: the random vector is ``theta = (parameters, running means, log
running stds)`` with ``log std = 0.5 ln(running_var + eps)``. The posterior is ``N(theta, s^2 I)``
at the trained values, and the prior ``N(theta_0, s^2 I)`` at ``init``'s values. A freshly
constructed BatchNorm has mean 0 and variance 1, which no data has touched. The Gibbs
classifier draws the statistics too, and the KL counts their distance from the prior's.
``batchnorm="fixed"`` keeps the old behaviour (statistics held at their trained values,
nothing perturbed). It is reported as an assumption that does not hold, and the result's
``valid`` is False.

**Assumptions** the result lists (``PACBayesBound.assumptions``):

- The m samples are i.i.d. draws from the distribution the bound speaks about. The prior
  (``init``, the grid of s, ``delta``) was fixed without them.
- The classifier's output on one example does not depend on the other examples of its batch.
  Eval-mode BatchNorm with running statistics satisfies this. A BatchNorm without running
  statistics does not, and raises an error.
- Buffers other than BatchNorm statistics are equal in ``model`` and ``init``, and are
  data-independent (checked for equality, else an error).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from dsbp.diagnostics.hvp import ParamSpec, assign_flat_, eval_mode, flat_params

__all__ = [
    "BATCHNORM_MODES",
    "PACBayesBound",
    "gaussian_kl",
    "kl_bernoulli",
    "kl_inv_upper",
    "pac_bayes_bound",
    "zero_one_error",
]


def kl_bernoulli(q: float, p: float) -> float:
    """Bernoulli KL ``kl(q || p) = q ln(q/p) + (1-q) ln((1-q)/(1-p))`` (0 ln 0 = 0; inf if p
    is 0 or 1 where q is not)."""
    if not (0.0 <= q <= 1.0 and 0.0 <= p <= 1.0):
        raise ValueError(f"kl_bernoulli needs q, p in [0, 1], got q={q}, p={p}")

    def term(a: float, b: float) -> float:
        if a == 0.0:
            return 0.0
        if b == 0.0:
            return math.inf
        return a * math.log(a / b)

    return term(q, p) + term(1.0 - q, 1.0 - p)


def kl_inv_upper(q: float, c: float, tol: float = 1e-12) -> float:
    """``kl^{-1}(q, c) = max { p in [q, 1] : kl(q || p) <= c }`` by bisection.

    ``kl(q || .)`` is increasing on [q, 1], so bisection converges; accuracy ``tol`` in p.
    Closed form at q = 0: ``1 - exp(-c)``.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"kl_inv_upper: q must be in [0, 1], got {q}")
    if c < 0:
        raise ValueError(f"kl_inv_upper: c must be >= 0, got {c}")
    lo, hi = q, 1.0
    if kl_bernoulli(q, hi) <= c:
        return 1.0
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if kl_bernoulli(q, mid) <= c:
            lo = mid
        else:
            hi = mid
    return lo


def gaussian_kl(w: torch.Tensor, w0: torch.Tensor, s: float) -> float:
    """``KL(N(w, s^2 I) || N(w0, s^2 I)) = ||w - w0||^2 / (2 s^2)`` (nats)."""
    if s <= 0:
        raise ValueError(f"posterior scale s must be > 0, got {s}")
    diff = (w.to(torch.float64) - w0.to(torch.float64)).reshape(-1)
    return float(diff.dot(diff) / (2.0 * s * s))


@torch.no_grad()
def zero_one_error(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024
                   ) -> float:
    """Fraction of ``(x, y)`` misclassified (argmax of the logits), eval mode."""
    wrong = 0
    with eval_mode(model):
        for i in range(0, x.shape[0], batch_size):
            pred = model(x[i : i + batch_size]).argmax(dim=1)
            wrong += int((pred != y[i : i + batch_size].to(pred.device)).sum())
    return wrong / x.shape[0]


BATCHNORM_MODES = ("bounded", "fixed")


def _batchnorms(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            if not mod.track_running_stats or mod.running_mean is None \
                    or mod.running_var is None:
                raise ValueError(
                    f"BatchNorm {name!r} keeps no running statistics: in eval mode its output "
                    "on one example depends on the rest of the batch, which the bound's i.i.d. "
                    "per-example loss does not allow")
            out.append((name, mod))
    return out


def _bn_vector(bns: list[tuple[str, nn.modules.batchnorm._BatchNorm]]) -> torch.Tensor:
    """Running means and log running stds (``0.5 ln(var + eps)``) of the BatchNorms, flat,
    float64 on the CPU; empty when there are none."""
    parts: list[torch.Tensor] = []
    for _, m in bns:
        assert m.running_mean is not None and m.running_var is not None
        parts.append(m.running_mean.detach().to("cpu", torch.float64).reshape(-1))
        parts.append(0.5 * torch.log(m.running_var.detach().to("cpu", torch.float64)
                                     .reshape(-1) + m.eps))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


@torch.no_grad()
def _assign_bn_(bns: list[tuple[str, nn.modules.batchnorm._BatchNorm]], v: torch.Tensor
                ) -> None:
    i = 0
    for _, m in bns:
        assert m.running_mean is not None and m.running_var is not None
        n = m.running_mean.numel()
        m.running_mean.copy_(v[i:i + n].view_as(m.running_mean))
        logstd = v[i + n:i + 2 * n].view_as(m.running_var)
        m.running_var.copy_(torch.exp(2.0 * logstd) - m.eps)
        i += 2 * n


def _check_other_buffers(model: nn.Module, init: nn.Module) -> None:
    bn_bufs = {f"{n}.{b}" if n else b for n, m in model.named_modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm)
               for b in ("running_mean", "running_var", "num_batches_tracked")}
    theirs = dict(init.named_buffers())
    for name, buf in model.named_buffers():
        if name in bn_bufs or not torch.is_floating_point(buf):
            continue
        other = theirs.get(name)
        if other is None or other.shape != buf.shape or not torch.equal(
                other.detach().cpu(), buf.detach().cpu()):
            raise ValueError(
                f"buffer {name!r} differs between the model and init: it is neither perturbed "
                "nor part of the prior, so the bound would not hold")


@dataclass(frozen=True)
class PACBayesBound:
    """The bound and its parts, at the chosen posterior scale.

    Attributes:
        bound: kl-inverse bound on the Gibbs classifier's true 0-1 error (holds w.p. >= 1-delta).
        bound_sqrt: the square-root (Pinsker) form ``empirical_upper + sqrt(complexity / 2)``.
        kl: ``KL(Q || P)`` in nats.
        empirical: Monte Carlo estimate of the posterior's training 0-1 error (each row of
            ``grid`` also has ``empirical_std``, the std of the error over the draws).
        empirical_upper: its Langford-Caruana upper confidence bound.
        confidence: ``ln(2 sqrt(m) J / delta_pb) / m``, the confidence part of the complexity.
        complexity: ``(kl + ln(2 sqrt(m) J / delta_pb)) / m``, the kl budget.
        s: chosen posterior / prior standard deviation.
        deterministic_error: training 0-1 error of the trained weights themselves.
        m, n_mc, delta, delta_mc: sample size, MC draws, total and MC failure probability.
        batchnorm: ``"bounded"`` or ``"fixed"`` (module docstring); ``n_batchnorm_stats``: how
            many running statistics (means + stds) are in the bounded vector.
        valid: False when an assumption is known not to hold (``batchnorm="fixed"`` on a
            model with BatchNorm).
        assumptions: what the bound assumes, in words, including any that does not hold.
        grid: per-s results (dicts with the same fields).
    """

    bound: float
    bound_sqrt: float
    kl: float
    empirical: float
    empirical_upper: float
    confidence: float
    complexity: float
    s: float
    deterministic_error: float
    m: int
    n_mc: int
    delta: float
    delta_mc: float
    batchnorm: str = "bounded"
    n_batchnorm_stats: int = 0
    valid: bool = True
    assumptions: list[str] = field(default_factory=list)
    grid: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain-Python version for JSON."""
        return dict(self.__dict__)


def pac_bayes_bound(
    model: nn.Module,
    init: torch.Tensor | nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    s_grid: Sequence[float] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
    *,
    n_mc: int = 100,
    delta: float = 0.05,
    delta_mc: float = 0.01,
    params: ParamSpec = None,
    batch_size: int = 1024,
    generator: torch.Generator | None = None,
    batchnorm: str = "bounded",
) -> PACBayesBound:
    """PAC-Bayes bound on the 0-1 error of ``N(w, s^2 I)`` around the trained weights.

    Args:
        model: the trained network (its current weights are ``w``; restored afterwards).
        init: the prior's centre ``w0``: a model with the same parameters and buffers (e.g. a
            copy saved before training, whose BatchNorm statistics are the untouched 0 / 1),
            or a flat vector over ``params`` (only for models without BatchNorm).
        x, y: the m training samples the model was trained on (the bound is over this sample).
        s_grid: candidate scales (J values), fixed before looking at the data.
        n_mc: weight draws for the empirical Gibbs error (per grid value).
        delta: total failure probability; ``delta_mc`` of it goes to the MC sample bound.
        params: which parameters are perturbed (default: all trainable). Parameters left out
            are held at their trained values, which makes the bound invalid unless they are
            data-independent (e.g. frozen at initialisation).
        batch_size: evaluation chunk size.
        generator: RNG for the weight draws.
        batchnorm: ``"bounded"`` (default: running statistics are drawn and counted in the KL)
            or ``"fixed"`` (held at their trained values; the result is marked not valid).

    Returns:
        :class:`PACBayesBound` at the grid value with the smallest ``bound``.

    Raises:
        ValueError: bad deltas, grid or sizes; a BatchNorm without running statistics; a flat
            ``init`` for a model with BatchNorm; a non-BatchNorm buffer differing from init's.
    """
    if not 0 < delta_mc < delta < 1:
        raise ValueError(f"need 0 < delta_mc < delta < 1, got delta={delta}, delta_mc={delta_mc}")
    if not isinstance(n_mc, int) or n_mc < 1:
        raise ValueError(f"n_mc must be a positive int, got {n_mc!r}")
    grid_vals = [float(s) for s in s_grid]
    if not grid_vals or any(s <= 0 for s in grid_vals):
        raise ValueError(f"s_grid must be non-empty with positive values, got {s_grid!r}")
    m = int(x.shape[0])
    if m != int(y.shape[0]) or m == 0:
        raise ValueError(f"x and y must hold the same non-zero number of samples, got {m}, "
                         f"{y.shape[0]}")
    if batchnorm not in BATCHNORM_MODES:
        raise ValueError(f"batchnorm must be one of {BATCHNORM_MODES}, got {batchnorm!r}")
    w = flat_params(model, params)
    w0 = flat_params(init, params) if isinstance(init, nn.Module) else init.reshape(-1)
    if w0.numel() != w.numel():
        raise ValueError(f"init has {w0.numel()} parameters, the model has {w.numel()}")
    bns = _batchnorms(model)
    if isinstance(init, nn.Module):
        _check_other_buffers(model, init)
    assumptions = [
        f"the m = {m} samples are i.i.d. from the distribution bounded, and the prior (init, "
        "the s grid, delta) was fixed without them",
        "the classifier's output on one example does not depend on the rest of its batch",
    ]
    valid = True
    b = b0 = torch.zeros(0, dtype=torch.float64)
    if bns and batchnorm == "bounded":
        if not isinstance(init, nn.Module):
            raise ValueError("a model with BatchNorm needs init as a module: the prior's "
                             "centre includes its running statistics")
        b, b0 = _bn_vector(bns), _bn_vector(_batchnorms(init))
        if b0.numel() != b.numel():
            raise ValueError(f"init has {b0.numel()} BatchNorm statistics, the model "
                             f"{b.numel()}")
        assumptions.append(
            f"BatchNorm running statistics ({b.numel()} means and log stds) are drawn with the "
            "weights and counted in the KL; the prior's statistics are init's, which must not "
            "have seen the m samples (a fresh BatchNorm: mean 0, variance 1)")
    elif bns:
        valid = False
        assumptions.append(
            "NOT MET: BatchNorm running statistics are held at their trained values in prior "
            "and posterior (batchnorm='fixed'); they were computed from training data, so the "
            "prior depends on the sample")
    if params is not None:
        assumptions.append("parameters outside `params` are held at their trained values and "
                           "must be data-independent (e.g. frozen at initialisation)")
    J = len(grid_vals)
    delta_pb = delta - delta_mc
    confidence = math.log(2.0 * math.sqrt(m) * J / delta_pb) / m
    mc_budget = math.log(2.0 * J / delta_mc) / n_mc
    det_err = zero_one_error(model, x, y, batch_size)
    w64 = w.to("cpu", torch.float64)
    bn_saved = [(mod.running_mean.detach().clone(), mod.running_var.detach().clone())  # type: ignore[union-attr]
                for _, mod in bns]
    rows = []
    try:
        for s in grid_vals:
            errs = []
            for _ in range(n_mc):
                eps = torch.randn(w64.shape, generator=generator, dtype=torch.float64)
                assign_flat_(model, w64 + s * eps, params)
                if b.numel():
                    eb = torch.randn(b.shape, generator=generator, dtype=torch.float64)
                    _assign_bn_(bns, b + s * eb)
                errs.append(zero_one_error(model, x, y, batch_size))
            emp = sum(errs) / n_mc
            emp_std = math.sqrt(sum((e - emp) ** 2 for e in errs) / max(n_mc - 1, 1))
            emp_up = kl_inv_upper(emp, mc_budget)
            kl = gaussian_kl(torch.cat([w.to("cpu", torch.float64), b]),
                             torch.cat([w0.to("cpu", torch.float64), b0]), s)
            complexity = kl / m + confidence
            rows.append({
                "s": s, "kl": kl, "empirical": emp, "empirical_std": emp_std,
                "empirical_upper": emp_up,
                "complexity": complexity,
                "bound": kl_inv_upper(emp_up, complexity),
                "bound_sqrt": min(1.0, emp_up + math.sqrt(complexity / 2.0)),
            })
    finally:
        assign_flat_(model, w, params)
        with torch.no_grad():
            for (_, mod), (rm, rv) in zip(bns, bn_saved, strict=True):
                mod.running_mean.copy_(rm)  # type: ignore[union-attr]
                mod.running_var.copy_(rv)  # type: ignore[union-attr]
    best = min(rows, key=lambda r: r["bound"])
    return PACBayesBound(
        bound=best["bound"], bound_sqrt=best["bound_sqrt"], kl=best["kl"],
        empirical=best["empirical"], empirical_upper=best["empirical_upper"],
        confidence=confidence, complexity=best["complexity"], s=best["s"],
        deterministic_error=det_err, m=m, n_mc=n_mc, delta=delta, delta_mc=delta_mc,
        batchnorm=batchnorm, n_batchnorm_stats=int(b.numel()), valid=valid,
        assumptions=assumptions, grid=rows,
    )
