"""Curvature of a model's loss: top Hessian eigenpairs, Hutchinson trace, spectral density.

All functions take ``(model, loss_fn, batches)`` with the conventions of
:mod:`dsbp.diagnostics.hvp` (eval mode during Hessian work, sample-weighted average over batches),
and a ``params`` selection (whole model by default, or one layer's weight). ``per_layer=True``
repeats the computation for the weight of every ``nn.Linear`` / ``nn.Conv2d`` (the diagonal
blocks of the Hessian) and returns a dict keyed by module name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from dsbp.core.lanczos import density_on_grid, lanczos, slq
from dsbp.diagnostics.hvp import (
    Batch,
    LossFn,
    ParamSpec,
    as_batch_list,
    make_hvp,
    named_selected_params,
)

__all__ = [
    "HessianEigen",
    "TraceEstimate",
    "SpectralDensity",
    "hessian_top_eigenvalues",
    "hessian_trace",
    "hessian_spectral_density",
    "power_iteration",
    "weight_layers",
]


@dataclass(frozen=True)
class HessianEigen:
    """Top Hessian eigenpairs.

    Attributes:
        eigenvalues: (k,) float64, descending.
        eigenvectors: (dim, k) float64, orthonormal columns, in :func:`flat_params` order.
        param_names: names of the parameters the vectors range over.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    param_names: tuple[str, ...]


@dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson estimate of ``tr(H)``: ``mean`` and its standard error over ``n_samples``."""

    mean: float
    stderr: float
    n_samples: int


@dataclass(frozen=True)
class SpectralDensity:
    """SLQ spectral density: raw quadrature (nodes, weights (n_probes, m)) and a smoothed curve.

    ``density`` integrates to ~1 over ``grid``; multiply by ``dim`` for an eigenvalue count density.
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    grid: torch.Tensor
    density: torch.Tensor
    dim: int


def weight_layers(model: nn.Module, params: ParamSpec = None) -> dict[str, torch.Tensor]:
    """Weights of every ``nn.Linear`` / ``nn.Conv2d`` in ``model``, by module name.

    With ``params`` given (names or tensors), only layers whose weight is in it are kept.
    """
    wanted: set[int] | None = None
    if params is not None:
        wanted = {id(p) for _, p in named_selected_params(model, params)}
    out: dict[str, torch.Tensor] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)) and mod.weight.requires_grad:
            if wanted is None or id(mod.weight) in wanted:
                out[name] = mod.weight
    if not out:
        raise ValueError("no trainable nn.Linear / nn.Conv2d weight in the selection")
    return out


def _param_names(model: nn.Module, params: ParamSpec) -> tuple[str, ...]:
    return tuple(n for n, _ in named_selected_params(model, params))


def power_iteration(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    k: int = 1,
    *,
    max_iters: int = 100,
    tol: float = 1e-6,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k eigenpairs by power iteration with deflation (the PyHessian recipe).

    Converges to the eigenvalues of **largest magnitude** (a Hessian with a large negative
    eigenvalue returns it); stops when the Rayleigh quotient changes by less than
    ``tol * |lambda|``. Each pair is found against the previous ones (Gram-Schmidt deflation).
    Prefer Lanczos: it converges faster and returns algebraically largest values.

    Returns:
        ``(eigvals (k,), eigvecs (dim, k))`` float64, sorted by descending eigenvalue.
    """
    if not isinstance(k, int) or not 1 <= k <= dim:
        raise ValueError(f"power_iteration: k must be an int in [1, {dim}], got {k!r}")
    vals: list[torch.Tensor] = []
    vecs: list[torch.Tensor] = []
    for _ in range(k):
        v = torch.randn(dim, generator=generator, dtype=dtype)
        lam = torch.zeros((), dtype=dtype)
        for it in range(max_iters):
            for u in vecs:
                v = v - torch.dot(u, v) * u
            v = v / torch.linalg.vector_norm(v)
            Hv = matvec(v).detach().reshape(-1).to(dtype)
            for u in vecs:  # keep the iterate out of the found subspace
                Hv = Hv - torch.dot(u, Hv) * u
            new = torch.dot(v, Hv)
            done = it > 0 and abs(new - lam) <= tol * abs(new)
            lam, v = new, Hv
            if done:
                break
        v = v / torch.linalg.vector_norm(v)
        vals.append(lam)
        vecs.append(v)
    values, vectors = torch.stack(vals), torch.stack(vecs, dim=1)
    order = torch.argsort(values, descending=True)
    return values[order], vectors[:, order]


def hessian_top_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch] | Batch,
    k: int = 1,
    method: str = "lanczos",
    params: ParamSpec = None,
    *,
    per_layer: bool = False,
    iters: int | None = None,
    tol: float = 1e-6,
    generator: torch.Generator | None = None,
) -> HessianEigen | dict[str, HessianEigen]:
    """Top-k eigenvalues and eigenvectors of the loss Hessian (the paper's "sharpness" lambda_max).

    Args:
        model: the network (eval mode during the computation, restored afterwards).
        loss_fn: ``loss_fn(output, target) -> scalar``.
        batches: ``(x, y)`` batches; the Hessian is their sample-weighted average.
        k: number of eigenpairs.
        method: ``"lanczos"`` (full reorthogonalisation, algebraically largest; ``iters``
            Krylov steps, default ``2k + 20``) or ``"power"`` (deflated power iteration, largest
            magnitude; ``iters`` max iterations, default 100, relative tolerance ``tol``).
        params: parameter selection (default: all trainable parameters).
        per_layer: if True, return ``{module_name: HessianEigen}`` for the weight of each
            Linear/Conv2d (in ``params`` if given): the Hessian's diagonal blocks.
        iters, tol, generator: solver settings; ``generator`` seeds the start vectors.

    Returns:
        :class:`HessianEigen` (eigenvalues descending (k,), eigenvectors (dim, k)), or a dict of
        them with ``per_layer=True``.
    """
    if method not in ("lanczos", "power"):
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    batch_list = as_batch_list(batches)
    if per_layer:
        eigs: dict[str, HessianEigen] = {}
        for name, w in weight_layers(model, params).items():
            eig = hessian_top_eigenvalues(model, loss_fn, batch_list, k, method, [w],
                                          iters=iters, tol=tol, generator=generator)
            assert isinstance(eig, HessianEigen)  # per_layer=False: one estimate
            eigs[name] = eig
        return eigs
    matvec, dim = make_hvp(model, loss_fn, batch_list, params)
    if k > dim:
        raise ValueError(f"k={k} exceeds the number of selected parameters ({dim})")
    if method == "lanczos":
        # Krylov basis on the parameters' device: no host round trip per product.
        device = named_selected_params(model, params)[0][1].device
        vals, vecs = lanczos(matvec, dim, k, iters, generator=generator, device=device)
        vals, vecs = vals.cpu(), vecs.cpu()
    else:
        vals, vecs = power_iteration(matvec, dim, k, max_iters=iters or 100, tol=tol,
                                     generator=generator)
    return HessianEigen(vals, vecs, _param_names(model, params))


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch] | Batch,
    n_samples: int = 100,
    params: ParamSpec = None,
    *,
    per_layer: bool = False,
    generator: torch.Generator | None = None,
) -> TraceEstimate | dict[str, TraceEstimate]:
    """Hutchinson's estimator of ``tr(H)`` with Rademacher probes: ``mean_i v_i^T H v_i``.

    Unbiased; its standard error is the sample std of ``v^T H v`` over ``sqrt(n_samples)``
    (for Rademacher probes the variance is ``2 * sum_{i != j} H_ij^2``, so a diagonal H is exact).

    Args:
        n_samples: number of probes (>= 2 for a standard error).
        per_layer: ``{module_name: TraceEstimate}`` for each Linear/Conv2d weight block.
        Other arguments as in :func:`hessian_top_eigenvalues`.
    """
    if not isinstance(n_samples, int) or n_samples < 2:
        raise ValueError(f"n_samples must be an int >= 2, got {n_samples!r}")
    batch_list = as_batch_list(batches)
    if per_layer:
        traces: dict[str, TraceEstimate] = {}
        for name, w in weight_layers(model, params).items():
            tr = hessian_trace(model, loss_fn, batch_list, n_samples, [w], generator=generator)
            assert isinstance(tr, TraceEstimate)  # per_layer=False: one estimate
            traces[name] = tr
        return traces
    matvec, dim = make_hvp(model, loss_fn, batch_list, params)
    samples = torch.empty(n_samples, dtype=torch.float64)
    for i in range(n_samples):
        v = (torch.randint(0, 2, (dim,), generator=generator) * 2 - 1).to(torch.float64)
        samples[i] = torch.dot(v, matvec(v).to(torch.float64))
    mean = samples.mean().item()
    stderr = samples.std(unbiased=True).item() / math.sqrt(n_samples)
    return TraceEstimate(mean, stderr, n_samples)


def hessian_spectral_density(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch] | Batch,
    n_probes: int = 4,
    iters: int = 40,
    params: ParamSpec = None,
    *,
    grid_points: int = 512,
    sigma: float | None = None,
    generator: torch.Generator | None = None,
) -> SpectralDensity:
    """Hessian eigenvalue density by stochastic Lanczos quadrature (Ghorbani et al. 2019).

    Args:
        n_probes: Rademacher probes; iters: Lanczos steps per probe.
        grid_points: points of the evaluation grid spanning the Ritz values (+-5 sigma).
        sigma: Gaussian smoothing width; default 1% of the Ritz-value range [ours].
    """
    matvec, dim = make_hvp(model, loss_fn, as_batch_list(batches), params)
    nodes, weights = slq(matvec, dim, n_probes, iters, generator=generator)
    used = weights > 0
    lo, hi = nodes[used].min().item(), nodes[used].max().item()
    if sigma is None:
        sigma = max(0.01 * (hi - lo), 1e-8)
    grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, grid_points, dtype=torch.float64)
    return SpectralDensity(nodes, weights, grid, density_on_grid(nodes, weights, grid, sigma), dim)
