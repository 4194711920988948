"""SDE check of Proposition 1 on the real optimizer: DSBP's iterates against their SDE.

**What runs.** ``dsbp.DSBP`` around ``torch.optim.SGD`` (with or without momentum), with its
refreshes, warm-started power iteration and sharpness term, trains a linear layer
``W`` (d_out, d_in) on the least-squares loss ``L(W) = (1/2n) ||X W^T - Y||_F^2`` of a fixed
Gaussian design ``X`` (n, d_in), with labels ``Y = X W*^T + sigma * eps`` drawn afresh at every
step (``eps ~ N(0, I)``). Nothing of DSBP is re-implemented here: the projection, the basis and
the sharpness term are the optimizer's own. The projector uses ``side="input"``, so its
covariance is that of the layer's inputs ``X^T X``: the basis it converges to is a fixed
function of the design, and the SDE below is linear with drift and diffusion in closed form.

**Many paths in one tensor.** ``n_paths`` independent runs are one ``nn.Linear`` with
``n_paths * d_out`` output units: on the input side every row of ``W`` is projected by the same
``E`` (``G -> G E E^T``), the sharpness term ``W e1 e1^T`` acts row by row, the loss is a sum of
per-path losses, and SGD's momentum is elementwise. So the stacked layer's rows evolve exactly
as ``n_paths`` separate models would (``tests/diagnostics/test_sde.py`` checks this against
separate models).

**The SDE** (Li, Tai & E 2017, first order; t = k eta). With row-major ``w = vec(W)``,
``C = X^T X / n``, ``P = E E^T`` the exact top-k eigenprojector of ``C`` (from ``eigh``, not from
the projector), ``s = beta * lambda_1(C) / trace(C)``, and momentum ``mu`` (0 for plain SGD):

    dX = -(1/(1-mu)) (M X - b) dt + sqrt(eta)/(1-mu) Q^{1/2} dB,
    M = I (x) (P C + s e1 e1^T),   b = (I (x) P C) w*,
    Q = (sigma^2 / n) I (x) (P C P)   (the projected label-noise gradient covariance).

It is an Ornstein-Uhlenbeck process: its mean and covariance at time T are computed exactly
(matrix exponentials, Van Loan's covariance integral), so the SDE side carries neither Monte
Carlo nor discretisation error, and nothing couples its noise to the iterates'.

**Two test functions**, per step size eta, at T = K eta:

- ``loss``: ``f(w) = L(w) - L(w*)``. Its weak error ``E f(w_K) - E f(X_T)`` is O(eta) for the
  right SDE. It checks the drift (the projection, the sharpness term, the momentum factor).
  It cannot check the diffusion: the diffusion moves ``E L`` by O(eta) only, so the
  noise-free gradient flow, or a diffusion twice too large, is *also* within O(eta).
- ``fluctuation``: ``tr Cov(w_K) / eta`` against ``tr Cov(X_T) / eta``: the fluctuations at
  the scale the SDE claims to describe (their variance is O(eta)). It is the weak error of
  ``f(w) = ||w - E w||^2 / eta``, each process centred at its own mean, so that an O(eta)
  offset of the mean (the basis's first refreshes, the drift's discretisation) does not hide
  the diffusion. For the right SDE the error is O(eta); for a diffusion scaled by c it tends
  to ``(1 - c^2) tr(Cov_T) / eta``, which does not vanish.

An SDE is accepted when both weak errors extrapolate to zero as eta -> 0 (a weighted fit of
``a + b eta + c eta^2``, :func:`extrapolate_to_zero`; ``|a|`` within 4 standard errors). A wrong
SDE (diffusion x0 or x2, or a drift without the projection) is rejected because one of the two
errors tends to a nonzero limit instead. The fitted order (log-log slope) is reported too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from dsbp import DSBP

__all__ = [
    "VARIANTS",
    "LinearProblem",
    "SDECheck",
    "error_vanishes",
    "extrapolate_to_zero",
    "fit_order",
    "linear_problem",
    "run_dsbp_paths",
    "sde_drift",
    "sde_moments",
    "weak_error_check",
]

# The SDE and three wrong ones: (diffusion scale, drift projected?).
VARIANTS: dict[str, tuple[float, bool]] = {
    "sde": (1.0, True),
    "diffusion x0": (0.0, True),
    "diffusion x2": (2.0, True),
    "drift without projection": (1.0, False),
}


def fit_order(
    etas: Sequence[float],
    errors: Sequence[float],
    stderrs: Sequence[float] | None = None,
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Slope of ``log|error|`` against ``log(eta)`` by least squares, and its MC spread.

    Args:
        etas, errors: step sizes and weak errors (their absolute values are fitted).
        stderrs: MC standard errors of ``errors``; the spread is the std of the slope over
            ``n_boot`` parametric-bootstrap redraws ``N(error, stderr^2)`` (0 when None).

    Returns:
        ``(order, order_stderr)``.

    Raises:
        ValueError: fewer than two step sizes, mismatched lengths, or a zero error.
    """
    e = np.asarray(etas, dtype=np.float64)
    y = np.abs(np.asarray(errors, dtype=np.float64))
    if e.size < 2 or e.size != y.size:
        raise ValueError("fit_order needs >= 2 step sizes and one error per step size")
    if np.any(y <= 0):
        raise ValueError(f"weak errors must be nonzero to fit an order, got {y.tolist()}")
    slope = float(np.polyfit(np.log(e), np.log(y), 1)[0])
    if stderrs is None:
        return slope, 0.0
    rng = np.random.default_rng(seed)
    s = np.asarray(stderrs, dtype=np.float64)
    draws = np.maximum(np.abs(y + s * rng.standard_normal((n_boot, y.size))), 1e-300)
    slopes = [np.polyfit(np.log(e), np.log(d), 1)[0] for d in draws]
    return slope, float(np.std(slopes))


def _steps(T: float, eta: float) -> int:
    K = round(T / eta)
    if K < 1 or abs(K * eta - T) > 1e-9 * T:
        raise ValueError(f"horizon T={T} must be a positive multiple of eta={eta}")
    return K


def _ou_transition(M: torch.Tensor, bvec: torch.Tensor, Qrate: torch.Tensor, tau: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact transition of ``dX = -(M X - b) dt + G dB`` over time tau, ``Qrate = G G^T``.

    Returns ``(Phi, shift, Qd)``: ``X_tau = Phi X_0 + shift + N(0, Qd)``.
    """
    D = M.shape[0]
    # Mean: augmented system d/dt [x; 1] = [[-M, b], [0, 0]] [x; 1].
    aug = torch.zeros(D + 1, D + 1, dtype=M.dtype)
    aug[:D, :D], aug[:D, D] = -M, bvec
    ex = torch.linalg.matrix_exp(aug * tau)
    Phi, shift = ex[:D, :D], ex[:D, D]
    # Covariance by Van Loan (1978): expm([[-F, Q], [0, F^T]] tau) with F = -M.
    vl = torch.zeros(2 * D, 2 * D, dtype=M.dtype)
    vl[:D, :D], vl[:D, D:], vl[D:, D:] = M, Qrate, -M.T
    ev = torch.linalg.matrix_exp(vl * tau)
    B22, B12 = ev[D:, D:], ev[:D, D:]
    Qd = B22.T @ B12
    return Phi, shift, 0.5 * (Qd + Qd.T)


# --------------------------------------------------------------------------- the problem
@dataclass(frozen=True)
class LinearProblem:
    """A least-squares linear layer with label noise, and its closed-form SDE ingredients.

    Attributes:
        X: design (n, d_in); W_star: teacher (d_out, d_in); W0: start (d_out, d_in).
        sigma: label-noise std; rank: k; sharpness: beta.
        C: ``X^T X / n``; E: its exact top-k eigenvectors (d_in, k) from ``eigh``;
        lam_hat: ``lambda_1(C) / trace(C)`` (the projector's normalised eigenvalue).
    """

    X: torch.Tensor
    W_star: torch.Tensor
    W0: torch.Tensor
    sigma: float
    rank: int
    sharpness: float
    C: torch.Tensor
    E: torch.Tensor
    lam_hat: float
    settings: dict = field(default_factory=dict)

    @property
    def d_out(self) -> int:
        return self.W0.shape[0]

    @property
    def d_in(self) -> int:
        return self.W0.shape[1]


def linear_problem(d_out: int = 3, d_in: int = 4, n: int = 16, rank: int = 2,
                   spectrum: Sequence[float] = (3.0, 2.0, 0.7, 0.3), sharpness: float = 0.1,
                   sigma: float = 1.0, seed: int = 0) -> LinearProblem:
    """The check's problem: Gaussian design with population input covariance
    ``diag(spectrum)`` in a random rotation, random teacher and start (all float64)."""
    if len(spectrum) != d_in:
        raise ValueError(f"spectrum needs d_in={d_in} values, got {len(spectrum)}")
    if not 1 <= rank < d_in:
        raise ValueError(f"rank must be in [1, d_in), got {rank}")
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    R, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=dt))
    X = torch.randn(n, d_in, generator=g, dtype=dt) * torch.tensor(spectrum, dtype=dt).sqrt()
    X = X @ R.T
    C = X.T @ X / n
    evals, vecs = torch.linalg.eigh(C)
    E = vecs.flip(1)[:, :rank]
    lam = evals.flip(0)
    if float(lam[rank - 1] - lam[rank]) <= 1e-6 * float(lam[0]):
        raise ValueError("the design has no eigengap at the rank: the projection is undefined")
    W_star = torch.randn(d_out, d_in, generator=g, dtype=dt)
    W0 = torch.randn(d_out, d_in, generator=g, dtype=dt)
    return LinearProblem(
        X=X, W_star=W_star, W0=W0, sigma=float(sigma), rank=rank, sharpness=float(sharpness),
        C=C, E=E, lam_hat=float(lam[0] / lam.sum()),
        settings={"d_out": d_out, "d_in": d_in, "n": n, "rank": rank,
                  "spectrum": list(spectrum), "sharpness": sharpness, "sigma": sigma,
                  "seed": seed, "eigenvalues_C": lam.tolist()})


# --------------------------------------------------------------------------- the iterates
def run_dsbp_paths(problem: LinearProblem, eta: float, horizon: float, n_paths: int, *,
                   momentum: float = 0.0, interval: int = 1, power_iters: int = 1,
                   cold_iters: int = 3, seed: int = 0, noise_seed: int | None = None,
                   return_optimizer: bool = False
                   ) -> torch.Tensor | tuple[torch.Tensor, DSBP, nn.Linear]:
    """Weights after ``K = horizon / eta`` steps of the real ``DSBP(SGD)``, one row per path.

    One ``nn.Linear(d_in, n_paths * d_out, bias=False)`` holds every path (module docstring).
    The projector starts cold from a random block (``exact_threshold=0``, ``cold_iters``
    iterations) and refreshes every ``interval`` steps with ``power_iters`` warm-started
    iterations and no oversampling, so its basis approaches the eigenvectors over the first
    refreshes, as in training. ``seed`` seeds the projector (its cold start), ``noise_seed``
    (default: ``seed``) the label noise. The design is fixed, so with one ``seed`` the
    sequence of bases is the same for every eta: its transient lasts a fixed number of
    steps, which is O(eta) in time.

    Returns:
        ``(n_paths, d_out * d_in)`` float64 (row-major ``vec(W)`` per path); with
        ``return_optimizer``, also the optimizer and the layer.
    """
    p = problem
    K = _steps(horizon, eta)
    dt = torch.float64
    layer = nn.Linear(p.d_in, n_paths * p.d_out, bias=False).to(dt)
    with torch.no_grad():
        layer.weight.copy_(p.W0.repeat(n_paths, 1))
    opt = DSBP(layer, torch.optim.SGD, rank=p.rank, interval=interval, power_iters=power_iters,
               side="input", sharpness=p.sharpness, lr=eta, momentum=momentum,
               projector_kwargs={"oversample": 0, "exact_threshold": 0,
                                 "cold_iters": cold_iters, "eig_dtype": dt, "seed": seed})
    g = torch.Generator().manual_seed(seed if noise_seed is None else noise_seed)
    clean = (p.X @ p.W_star.T).repeat(1, n_paths)  # (n, n_paths * d_out)
    layer.train()
    for _ in range(K):
        Y = clean + p.sigma * torch.randn(clean.shape, generator=g, dtype=dt)
        opt.zero_grad()
        loss = 0.5 / p.X.shape[0] * (layer(p.X) - Y).square().sum()
        loss.backward()
        opt.step()
    W = layer.weight.detach().reshape(n_paths, p.d_out * p.d_in).clone()
    return (W, opt, layer) if return_optimizer else W


# --------------------------------------------------------------------------- the SDE
def sde_drift(problem: LinearProblem, *, project: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M, b)`` of the SDE's drift ``-(M w - b)`` without the momentum factor: one
    noise-free step of DSBP(SGD) from a converged basis is ``w - eta (M w - b)``."""
    p = problem
    Id = torch.eye(p.d_out, dtype=torch.float64)
    P = p.E @ p.E.T if project else torch.eye(p.d_in, dtype=torch.float64)
    e1 = p.E[:, 0]
    inner = P @ p.C + p.sharpness * p.lam_hat * torch.outer(e1, e1)
    return torch.kron(Id, inner), torch.kron(Id, P @ p.C) @ p.W_star.reshape(-1)


def sde_moments(problem: LinearProblem, eta: float, horizon: float, *, momentum: float = 0.0,
                diffusion_scale: float = 1.0, project: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact mean (D,) and covariance (D, D) at time ``horizon`` of the SDE in the module
    docstring, started at ``W0``; ``diffusion_scale`` and ``project=False`` (drift
    ``-(grad L + sharpness)``, diffusion unchanged) give the wrong SDEs the check must
    reject."""
    p = problem
    M, b = sde_drift(p, project=project)
    scale = 1.0 / (1.0 - momentum)
    P = p.E @ p.E.T
    Q = (diffusion_scale * scale) ** 2 * eta * p.sigma ** 2 / p.X.shape[0] * torch.kron(
        torch.eye(p.d_out, dtype=torch.float64), P @ p.C @ P)
    Phi, shift, cov = _ou_transition(scale * M, scale * b, Q, horizon)
    return Phi @ p.W0.reshape(-1) + shift, cov


def extrapolate_to_zero(etas: Sequence[float], errors: Sequence[float],
                        stderr: Sequence[float]) -> tuple[float, float]:
    """The weak error's limit as eta -> 0 and its standard error.

    Weighted least squares of ``e(eta) = a + b eta + c eta^2`` (the Talay-Tubaro expansion of a
    weak error, to second order), weights ``1 / s.e.^2``; returns ``(a, s.e.(a))``. An SDE that
    approximates the iterates has ``a = 0``; a wrong one has a nonzero limit.
    """
    e = np.asarray(etas, dtype=np.float64)
    if e.size < 4:
        raise ValueError("extrapolate_to_zero needs >= 4 step sizes (3 coefficients + 1)")
    y = np.asarray(errors, dtype=np.float64)
    w = 1.0 / np.maximum(np.asarray(stderr, dtype=np.float64), 1e-300) ** 2
    A = np.stack([np.ones_like(e), e, e * e], 1)
    cov = np.linalg.inv(A.T @ (w[:, None] * A))
    coef = cov @ A.T @ (w * y)
    return float(coef[0]), float(math.sqrt(cov[0, 0]))


def error_vanishes(etas: Sequence[float], errors: Sequence[float], stderr: Sequence[float],
                   *, z: float = 4.0) -> bool:
    """Whether the weak errors extrapolate to 0 as eta -> 0 within ``z`` standard errors
    (:func:`extrapolate_to_zero`): the SDE is accepted; otherwise it is rejected."""
    a, se = extrapolate_to_zero(etas, errors, stderr)
    return abs(a) <= z * se


# --------------------------------------------------------------------------- the check
@dataclass
class SDECheck:
    """Weak errors of the SDE and of the wrong SDEs against the real optimizer's iterates.

    ``errors[variant][test_function]`` is a list over ``etas`` of signed weak errors
    ``E f(iterates) - E f(SDE)``, ``stderr`` the Monte Carlo standard error of each (from the
    iterates only: the SDE side is exact), ``order[variant][test_function]`` the fitted slope
    of ``log|error|`` against ``log eta`` with its bootstrap spread, ``limit[variant][name]``
    the error extrapolated to eta -> 0 with its standard error (:func:`extrapolate_to_zero`),
    ``accepted[variant]`` whether both limits are zero within 4 standard errors.
    """

    etas: list[float]
    horizon: float
    n_paths: int
    momentum: float
    interval: int
    power_iters: int
    seed: int
    errors: dict[str, dict[str, list[float]]]
    stderr: dict[str, dict[str, list[float]]]
    order: dict[str, dict[str, list[float]]]
    limit: dict[str, dict[str, list[float]]]
    iterates: dict[str, list[float]]
    basis_angle: list[float]
    accepted: dict[str, bool]
    problem: dict

    def to_dict(self) -> dict:
        return asdict(self)


def _loss_excess(w: torch.Tensor, problem: LinearProblem) -> torch.Tensor:
    D = w - problem.W_star.reshape(-1)
    R = D.reshape(-1, problem.d_out, problem.d_in)
    return 0.5 * torch.einsum("pij,jk,pik->p", R, problem.C, R)


def _loss_excess_moments(mean: torch.Tensor, cov: torch.Tensor, problem: LinearProblem
                         ) -> float:
    A = torch.kron(torch.eye(problem.d_out, dtype=mean.dtype), problem.C)
    r = mean - problem.W_star.reshape(-1)
    return float(0.5 * (torch.trace(A @ cov) + r @ A @ r))


def weak_error_check(problem: LinearProblem | None = None,
                     etas: Sequence[float] = (0.05, 0.025, 0.0125, 0.00625), horizon: float = 1.0,
                     n_paths: int = 20000, *, momentum: float = 0.0, interval: int = 1,
                     power_iters: int = 1, seed: int = 0,
                     variants: Sequence[str] = tuple(VARIANTS)) -> SDECheck:
    """Run the real optimizer for every eta and compare with the SDE and the wrong SDEs."""
    p = problem if problem is not None else linear_problem()
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown SDE variants {sorted(unknown)}; known: {list(VARIANTS)}")
    errors: dict[str, dict[str, list[float]]] = {v: {"loss": [], "fluctuation": []}
                                                 for v in variants}
    stderr: dict[str, dict[str, list[float]]] = {v: {"loss": [], "fluctuation": []}
                                                 for v in variants}
    iterates: dict[str, list[float]] = {"mean_loss": [], "mean_fluctuation_sde": []}
    angles = []
    for i, eta in enumerate(etas):
        out = run_dsbp_paths(p, eta, horizon, n_paths, momentum=momentum, interval=interval,
                             power_iters=power_iters, seed=seed, noise_seed=seed + 1 + i,
                             return_optimizer=True)
        assert isinstance(out, tuple)
        W, opt, layer = out
        E_opt = opt.projector.basis(layer).to(torch.float64)
        overlap = torch.linalg.matrix_norm(p.E.T @ E_opt) ** 2 / p.rank
        angles.append(math.sqrt(max(0.0, 1.0 - float(overlap))))
        f_loss = _loss_excess(W, p)
        iterates["mean_loss"].append(float(f_loss.mean()))
        for v in variants:
            scale, proj = VARIANTS[v]
            mean, cov = sde_moments(p, eta, horizon, momentum=momentum, diffusion_scale=scale,
                                    project=proj)
            # centred at the iterates' own mean: E f = tr Cov(w_K) / eta, unbiased (n - 1)
            f_fl = (W - W.mean(0)).square().sum(1) / eta * n_paths / (n_paths - 1)
            for name, f_it, f_sde in (
                    ("loss", f_loss, _loss_excess_moments(mean, cov, p)),
                    ("fluctuation", f_fl, float(torch.trace(cov)) / eta)):
                errors[v][name].append(float(f_it.mean()) - f_sde)
                stderr[v][name].append(float(f_it.std()) / math.sqrt(n_paths))
            if v == "sde":
                iterates["mean_fluctuation_sde"].append(float(torch.trace(cov)) / eta)
    names = ("loss", "fluctuation")
    order = {v: {name: list(fit_order(etas, errors[v][name], stderr[v][name]))
                 for name in names} for v in variants}
    limit = {v: {n: list(extrapolate_to_zero(etas, errors[v][n], stderr[v][n]))
                 for n in names} for v in variants}
    accepted = {v: all(abs(limit[v][n][0]) <= 4.0 * limit[v][n][1] for n in names)
                for v in variants}
    return SDECheck(etas=list(etas), horizon=horizon, n_paths=n_paths, momentum=momentum,
                    interval=interval, power_iters=power_iters, seed=seed, errors=errors,
                    stderr=stderr, order=order, limit=limit, iterates=iterates,
                    basis_angle=angles, accepted=accepted, problem=p.settings)
