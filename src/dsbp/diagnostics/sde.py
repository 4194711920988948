"""Numerical check of Proposition 1: DSBP iterates vs a first-order weak SDE approximation.

**The discrete process (DSBP with a sharpness term).** Parameters ``x`` in R^D; one step is

    x_{k+1} = x_k - eta * ( Pi_x(g_k) + beta * s(x_k) ),

with ``g_k`` a stochastic gradient (mean ``grad L(x_k)``, covariance ``Sigma(x_k)``), ``Pi_x`` the
DSBP projection of each layer's weight gradient (output side, ``G -> E E^T G``; biases are not
projected) and ``s(x)`` the sharpness term ``lam_hat e1 e1^T W`` (``dsbp.core.projection``). The
basis ``E`` is either fixed (computed once at ``x_0``) or refreshed at every step from the
current weights (then ``Pi`` and ``s`` depend on ``x``; with refreshes every ``p`` steps there
is no ``eta -> 0`` limit at fixed ``p``, so the per-step refresh is the consistent state-dependent
version).

**The SDE we simulate** (the first-order weak approximation of Li, Tai & E 2017, applied to the
projected dynamics):

    dX_t = b(X_t) dt + sqrt(eta) * Pi_X Sigma(X_t)^{1/2} dB_t,
    b(x) = -( Pi_x(grad L(x)) + beta * s(x) ),

with ``t = k * eta``. Its weak error against the iterates is ``O(eta)``:
``|E f(x_k) - E f(X_{k eta})| <= C(T) eta`` for smooth ``f`` (order 1). This is what
Proposition 1 asserts (error ``O(eta)``); the paper calls its SDE "third-order" (its assumptions
involve third derivatives); we check the weak order 1 numerically, nothing more. Note that the
noise-free gradient flow ``dX = b dt`` is *also* an order-1 weak approximation; the diffusion
term is what makes the SDE capture the fluctuations (it matters at order 2, with the drift
correction ``-eta/2 (grad b) b``, which we do not add).

Two problems:

(a) ``quadratic_weak_error``: ``L(x) = 0.5 (x - c)^T A (x - c)`` over a weight matrix
    ``W`` (d_out, d_in), gradient noise ``sigma * xi`` with ``xi ~ N(0, I)``, fixed basis. The
    SDE is linear (Ornstein-Uhlenbeck); we sample its *exact* transition over each interval of
    length eta (no discretisation error) with the same normal draws as the iterates (common
    random numbers: valid since both processes are driven by the same Gaussian increments), and
    we also compute both expectations in closed form (moment recursions / matrix exponentials)
    for an exact weak error to compare the Monte Carlo estimate with.

(b) ``regression_net_weak_error``: a 2-layer tanh network on a fixed regression data set,
    mini-batch gradient noise (B samples with replacement, so ``Sigma(x)`` is the per-sample
    gradient covariance over B). The SDE is simulated by Euler-Maruyama with steps
    ``h = eta / n_sub`` and ``h / 2`` on the same Brownian path, combined by Richardson
    extrapolation (``2 f_{h/2} - f_h``, weak order 2 in h) so that the SDE reference's own
    discretisation error is negligible against the O(eta) error we measure. The iterates' noise
    (discrete mini-batch sampling) cannot be coupled to the Brownian motion, so paths are
    independent; the Monte Carlo standard error is reported next to each error.

Test function: ``f = L`` (the full-data loss) [ours].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "WeakErrorResult",
    "fit_order",
    "quadratic_weak_error",
    "regression_net_weak_error",
]


@dataclass(frozen=True)
class WeakErrorResult:
    """Weak errors ``|E f(x_K) - E f(X_T)|`` at ``T = K eta`` for each step size.

    Attributes:
        problem: ``"quadratic"`` or ``"regression_net"``.
        etas: step sizes.
        horizon: T.
        weak_error: Monte Carlo estimates of the weak error, one per eta.
        mc_stderr: standard error of each estimate.
        order: fitted slope of log(weak_error) vs log(eta).
        order_stderr: its spread under the MC noise (parametric bootstrap).
        exact_error: closed-form weak errors (quadratic only), else empty.
        order_exact: slope fitted to ``exact_error`` (quadratic only), else None.
        mean_f_iterates, mean_f_sde: the two expectations, per eta.
        n_paths: Monte Carlo paths per eta.
        settings: the problem's settings (for the record).
    """

    problem: str
    etas: list[float]
    horizon: float
    weak_error: list[float]
    mc_stderr: list[float]
    order: float
    order_stderr: float
    exact_error: list[float] = field(default_factory=list)
    order_exact: float | None = None
    mean_f_iterates: list[float] = field(default_factory=list)
    mean_f_sde: list[float] = field(default_factory=list)
    n_paths: int = 0
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain-Python version for JSON."""
        return dict(self.__dict__)


def fit_order(
    etas: Sequence[float],
    errors: Sequence[float],
    stderrs: Sequence[float] | None = None,
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Slope of ``log(error)`` against ``log(eta)`` by least squares, and its MC spread.

    Args:
        etas, errors: step sizes and (positive) weak errors.
        stderrs: MC standard errors of ``errors``; the spread is the std of the slope over
            ``n_boot`` parametric-bootstrap redraws ``N(error, stderr^2)`` (0 when None).

    Returns:
        ``(order, order_stderr)``.
    """
    e = np.asarray(etas, dtype=np.float64)
    y = np.asarray(errors, dtype=np.float64)
    if e.size < 2 or e.size != y.size:
        raise ValueError("fit_order needs >= 2 step sizes and one error per step size")
    if np.any(y <= 0):
        raise ValueError(f"weak errors must be > 0 to fit an order, got {y.tolist()}")
    slope = float(np.polyfit(np.log(e), np.log(y), 1)[0])
    if stderrs is None:
        return slope, 0.0
    rng = np.random.default_rng(seed)
    s = np.asarray(stderrs, dtype=np.float64)
    draws = np.abs(y + s * rng.standard_normal((n_boot, y.size)))
    draws = np.maximum(draws, 1e-300)
    slopes = [np.polyfit(np.log(e), np.log(d), 1)[0] for d in draws]
    return slope, float(np.std(slopes))


def _steps(T: float, eta: float) -> int:
    K = round(T / eta)
    if K < 1 or abs(K * eta - T) > 1e-9 * T:
        raise ValueError(f"horizon T={T} must be a positive multiple of eta={eta}")
    return K


# --------------------------------------------------------------------------- (a) quadratic
def _quadratic_problem(d_out: int, d_in: int, k: int, beta: float, lam_hat: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    D = d_out * d_in
    U, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    eigs = 0.5 + 1.5 * torch.rand(D, generator=g, dtype=torch.float64)  # spectrum in [0.5, 2]
    A = U @ torch.diag(eigs) @ U.T
    c = torch.randn(D, generator=g, dtype=torch.float64)
    x0 = 2.0 * torch.randn(D, generator=g, dtype=torch.float64)
    E, _ = torch.linalg.qr(torch.randn(d_out, k, generator=g, dtype=torch.float64))
    eye = torch.eye(d_in, dtype=torch.float64)
    # Row-major vec(W): W -> E E^T W is kron(E E^T, I_{d_in}); the sharpness term likewise.
    P = torch.kron(E @ E.T, eye)
    S = torch.kron(torch.outer(E[:, 0], E[:, 0]), eye)
    M = P @ A + beta * lam_hat * S  # drift b(x) = -(M x - P A c)
    bvec = P @ A @ c
    return A, c, x0, P, M, bvec


def _psd_sqrt(Q: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(0.5 * (Q + Q.T))
    return vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T


def _ou_transition(M: torch.Tensor, bvec: torch.Tensor, Qrate: torch.Tensor, tau: float):
    """Exact transition of dX = -(M X - b) dt + G dB over time tau, Qrate = G G^T.

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


def _quad_f(x: torch.Tensor, A: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    r = x - c
    return 0.5 * ((r @ A) * r).sum(-1)


def _quad_f_moments(m: torch.Tensor, S: torch.Tensor, A: torch.Tensor, c: torch.Tensor) -> float:
    r = m - c
    return float(0.5 * (torch.trace(A @ S) + r @ A @ r))


def quadratic_weak_error(
    etas: Sequence[float] = (0.2, 0.1, 0.05, 0.025),
    horizon: float = 1.0,
    n_paths: int = 4000,
    *,
    d_out: int = 4,
    d_in: int = 3,
    k: int = 2,
    beta: float = 0.1,
    lam_hat: float = 0.5,
    sigma: float = 1.0,
    seed: int = 0,
) -> WeakErrorResult:
    """Weak error of DSBP iterates vs their SDE on a quadratic (problem (a), module docstring).

    Args:
        etas: step sizes (each must divide ``horizon``).
        horizon: T.
        n_paths: Monte Carlo paths (common random numbers between iterates and SDE).
        d_out, d_in: weight shape; the parameter dimension is ``d_out * d_in``.
        k: DSBP rank (fixed random orthonormal basis of R^{d_out}).
        beta, lam_hat: sharpness weight and the (fixed) normalised eigenvalue.
        sigma: gradient-noise scale (noise covariance ``sigma^2 I`` before projection).
        seed: seeds the problem and the paths.

    Returns:
        :class:`WeakErrorResult` with MC and closed-form errors and both fitted orders.
    """
    A, c, x0, P, M, bvec = _quadratic_problem(d_out, d_in, k, beta, lam_hat, seed)
    D = x0.numel()
    I = torch.eye(D, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed + 1)
    errs, ses, exact, f_it, f_sde = [], [], [], [], []
    for eta in etas:
        K = _steps(horizon, eta)
        Qrate = eta * sigma**2 * P  # SDE diffusion G G^T = eta sigma^2 P P^T = eta sigma^2 P
        Phi, shift, Qd = _ou_transition(M, bvec, Qrate, eta)
        Ld = _psd_sqrt(Qd)
        step = I - eta * M
        x = x0.expand(n_paths, D).clone()
        X = x.clone()
        for _ in range(K):
            xi = torch.randn(n_paths, D, generator=gen, dtype=torch.float64)
            # Iterate: x - eta (P A (x - c) + beta lam_hat S x + P sigma xi) = step x + eta b - ..
            x = x @ step.T + eta * bvec - eta * sigma * xi @ P.T
            # SDE: exact OU transition driven by the same xi (-xi: the iterate subtracts noise).
            X = X @ Phi.T + shift - xi @ Ld.T
        diff = _quad_f(x, A, c) - _quad_f(X, A, c)
        errs.append(abs(diff.mean().item()))
        ses.append(diff.std().item() / math.sqrt(n_paths))
        f_it.append(_quad_f(x, A, c).mean().item())
        f_sde.append(_quad_f(X, A, c).mean().item())
        # Closed forms: iterate moments by recursion, SDE moments by one exact transition to T.
        m, S = x0.clone(), torch.zeros(D, D, dtype=torch.float64)
        for _ in range(K):
            m = step @ m + eta * bvec
            S = step @ S @ step.T + eta**2 * sigma**2 * P
        PhiT, shiftT, QT = _ou_transition(M, bvec, Qrate, horizon)
        f_sde_exact = _quad_f_moments(PhiT @ x0 + shiftT, QT, A, c)
        exact.append(abs(_quad_f_moments(m, S, A, c) - f_sde_exact))
    order, order_se = fit_order(etas, errs, ses)
    order_exact, _ = fit_order(etas, exact)
    return WeakErrorResult(
        problem="quadratic", etas=list(etas), horizon=horizon, weak_error=errs, mc_stderr=ses,
        order=order, order_stderr=order_se, exact_error=exact, order_exact=order_exact,
        mean_f_iterates=f_it, mean_f_sde=f_sde, n_paths=n_paths,
        settings={"d_out": d_out, "d_in": d_in, "k": k, "beta": beta, "lam_hat": lam_hat,
                  "sigma": sigma, "seed": seed, "basis": "fixed", "sde": "exact OU transition"},
    )


# --------------------------------------------------------------------------- (b) regression net
class _RegressionNet:
    """Batched (over paths) 2-layer tanh regression net; parameters flat (P, D).

    Layout: W1 (H, d_in) row-major | b1 (H) | w2 (H) | b2 (1). Per-sample loss
    ``0.5 (net(x) - y)^2``.
    """

    def __init__(self, X: torch.Tensor, Y: torch.Tensor, hidden: int, k: int, beta: float):
        self.X, self.Y = X, Y
        self.n, self.d = X.shape
        self.H, self.k, self.beta = hidden, k, beta
        self.nW1 = hidden * self.d
        self.dim = self.nW1 + 2 * hidden + 1

    def split(self, th: torch.Tensor):
        H, d, n1 = self.H, self.d, self.nW1
        return (th[:, :n1].view(-1, H, d), th[:, n1 : n1 + H], th[:, n1 + H : n1 + 2 * H],
                th[:, n1 + 2 * H])

    def forward(self, th: torch.Tensor):
        W1, b1, w2, b2 = self.split(th)
        Z = torch.einsum("nd,phd->pnh", self.X, W1) + b1[:, None, :]  # (P, n, H) layer-1 outputs
        out = torch.einsum("pnh,ph->pn", torch.tanh(Z), w2) + b2[:, None]
        return Z, out, 0.5 * (out - self.Y) ** 2  # losses (P, n)

    def weighted_grad(self, th: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``grad_theta sum_j weights[p, j] * loss_j(theta_p)`` for every path p: (P, D)."""
        th = th.detach().requires_grad_(True)
        with torch.enable_grad():
            _, _, losses = self.forward(th)
            (g,) = torch.autograd.grad((losses * weights).sum(), th)
        return g

    def basis(self, th: torch.Tensor):
        """Top-k eigenvectors (P, H, k) and lam_hat (P,) of layer 1's output covariance Z^T Z."""
        with torch.no_grad():
            Z, _, _ = self.forward(th)
            C = Z.transpose(1, 2) @ Z  # (P, H, H)
            vals, vecs = torch.linalg.eigh(C)
            E = vecs.flip(-1)[..., : self.k]
            lam_hat = vals[:, -1] / vals.sum(-1)
        return E, lam_hat

    def project(self, g: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
        """DSBP projection: layer-1 weight gradient -> E E^T G; the 1-row layer 2 keeps its
        gradient (rank clipped to d_out = 1 is the identity); biases unprojected."""
        out = g.clone()
        G1 = g[:, : self.nW1].view(-1, self.H, self.d)
        out[:, : self.nW1] = (E @ (E.transpose(1, 2) @ G1)).reshape(-1, self.nW1)
        return out

    def sharpness(self, th: torch.Tensor, E: torch.Tensor, lam_hat: torch.Tensor) -> torch.Tensor:
        """beta * (lam_hat e1 e1^T W1 on layer 1; W2 on layer 2, where d_out = 1 gives
        e1 = 1 and lam_hat = 1)."""
        W1, _, w2, _ = self.split(th)
        s = torch.zeros_like(th)
        e1 = E[..., 0]  # (P, H)
        s[:, : self.nW1] = (lam_hat[:, None, None] * e1[:, :, None]
                            * (e1[:, None, :] @ W1)).reshape(-1, self.nW1)
        s[:, self.nW1 + self.H : self.nW1 + 2 * self.H] = w2
        return self.beta * s

    def full_loss(self, th: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.forward(th)[2].mean(1)


def regression_net_weak_error(
    etas: Sequence[float] = (0.2, 0.1, 0.05, 0.025),
    horizon: float = 1.0,
    n_paths: int = 20000,
    *,
    n: int = 64,
    d_in: int = 3,
    hidden: int = 8,
    batch: int = 4,
    k: int = 3,
    beta: float = 0.1,
    refresh: str = "fixed",
    init_scale: float = 2.0,
    n_sub: int = 4,
    chunk: int = 5000,
    seed: int = 0,
) -> WeakErrorResult:
    """Weak error of DSBP iterates vs their SDE on a small regression net (problem (b)).

    Args:
        etas, horizon: step sizes and T (each eta divides T).
        n_paths: Monte Carlo paths per eta (independent for iterates and SDE).
        n, d_in, hidden: data size, input dimension, hidden width of the 2-layer tanh student.
            Data: ``x ~ N(0, I)``, ``y`` from a fixed random 2-layer teacher plus N(0, 0.1^2)
            noise (synthetic: the check needs a smooth problem, not a real data set).
        batch: mini-batch size B (sampled with replacement).
        k: DSBP rank of layer 1 (output side).
        beta: sharpness weight.
        init_scale: std of the initial weights (large enough that the O(eta) error stands
            out of the Monte Carlo noise).
        refresh: ``"fixed"`` (basis from x_0) or ``"every_step"`` (basis from the current
            weights of each path at every step, in iterates and SDE alike).
        n_sub: Euler-Maruyama substeps per eta for the SDE (plus the half-step run for
            Richardson extrapolation).
        chunk: paths simulated at once (memory).
        seed: seeds data, initial weights and paths.
    """
    if refresh not in ("fixed", "every_step"):
        raise ValueError(f"refresh must be 'fixed' or 'every_step', got {refresh!r}")
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    X = torch.randn(n, d_in, generator=g, dtype=dt)
    tW = torch.randn(4, d_in, generator=g, dtype=dt)
    tw = torch.randn(4, generator=g, dtype=dt)
    Y = torch.tanh(X @ tW.T) @ tw + 0.1 * torch.randn(n, generator=g, dtype=dt)
    net = _RegressionNet(X, Y, hidden, k, beta)
    th0 = init_scale * torch.randn(1, net.dim, generator=g, dtype=dt)
    E0, lam0 = net.basis(th0)

    def dsbp_parts(th: torch.Tensor):
        if refresh == "fixed":
            return E0.expand(th.shape[0], -1, -1), lam0.expand(th.shape[0])
        return net.basis(th)

    def em_step(th: torch.Tensor, tau: float, dB: torch.Tensor, eta: float) -> torch.Tensor:
        # X + b(X) tau + sqrt(eta / B) Pi Sigma^{1/2} dB, with Sigma = G_c^T G_c / n realised as
        # G_c^T dB / sqrt(n) = grad sum_j (dB_j - mean dB) loss_j / sqrt(n). Pi is linear, so
        # drift and noise come from one gradient of a weighted loss.
        E, lam = dsbp_parts(th)
        w = -tau / n + math.sqrt(eta / batch) * (dB - dB.mean(1, keepdim=True)) / math.sqrt(n)
        return th + net.project(net.weighted_grad(th, w), E) - tau * net.sharpness(th, E, lam)

    errs, ses, f_it, f_sde = [], [], [], []
    for eta in etas:
        K = _steps(horizon, eta)
        h = eta / n_sub
        sums = {"it": [0.0, 0.0], "sde": [0.0, 0.0]}  # sum f, sum f^2
        done = 0
        while done < n_paths:
            P = min(chunk, n_paths - done)
            done += P
            # --- DSBP iterates with mini-batch noise
            th = th0.expand(P, -1).clone()
            for _ in range(K):
                idx = torch.randint(0, n, (P, batch), generator=g)
                wts = torch.zeros(P, n, dtype=dt).scatter_add_(
                    1, idx, torch.full((P, batch), 1.0 / batch, dtype=dt))
                E, lam = dsbp_parts(th)
                grad = net.weighted_grad(th, wts)
                th = th - eta * (net.project(grad, E) + net.sharpness(th, E, lam))
            fi = net.full_loss(th)
            # --- SDE: EM with step h and h/2 on the same Brownian path, Richardson-combined
            Xc = th0.expand(P, -1).clone()
            Xf = Xc.clone()
            for _ in range(K * n_sub):
                dB_parts = []
                for _half in range(2):
                    dB = math.sqrt(h / 2) * torch.randn(P, n, generator=g, dtype=dt)
                    Xf = em_step(Xf, h / 2, dB, eta)
                    dB_parts.append(dB)
                Xc = em_step(Xc, h, dB_parts[0] + dB_parts[1], eta)
            fs = 2.0 * net.full_loss(Xf) - net.full_loss(Xc)
            for key, v in (("it", fi), ("sde", fs)):
                sums[key][0] += v.sum().item()
                sums[key][1] += (v * v).sum().item()
        means, variances = {}, {}
        for key, (s1, s2) in sums.items():
            means[key] = s1 / n_paths
            variances[key] = max(s2 / n_paths - means[key] ** 2, 0.0) * n_paths / (n_paths - 1)
        errs.append(abs(means["it"] - means["sde"]))
        ses.append(math.sqrt((variances["it"] + variances["sde"]) / n_paths))
        f_it.append(means["it"])
        f_sde.append(means["sde"])
    order, order_se = fit_order(etas, errs, ses)
    return WeakErrorResult(
        problem="regression_net", etas=list(etas), horizon=horizon, weak_error=errs,
        mc_stderr=ses, order=order, order_stderr=order_se, mean_f_iterates=f_it,
        mean_f_sde=f_sde, n_paths=n_paths,
        settings={"n": n, "d_in": d_in, "hidden": hidden, "batch": batch, "k": k, "beta": beta,
                  "refresh": refresh, "init_scale": init_scale, "n_sub": n_sub, "seed": seed,
                  "sde": "Euler-Maruyama h=eta/n_sub and h/2, Richardson-extrapolated"},
    )


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m dsbp.diagnostics.sde --out sde.json``: run both checks, print and save them."""
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--quad-paths", type=int, default=4000)
    ap.add_argument("--net-paths", type=int, default=10000)
    ap.add_argument("--net-n", type=int, default=32)
    ap.add_argument("--net-batch", type=int, default=16)
    ap.add_argument("--n-sub", type=int, default=2)
    ap.add_argument("--refresh", default="fixed,every_step")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = [quadratic_weak_error(n_paths=args.quad_paths)]
    for refresh in args.refresh.split(","):
        results.append(regression_net_weak_error(
            n_paths=args.net_paths, n=args.net_n, batch=args.net_batch, n_sub=args.n_sub,
            refresh=refresh))
    for r in results:
        print(f"{r.problem} {r.settings.get('refresh', r.settings.get('basis'))}: "
              f"order {r.order:.3f} +- {r.order_stderr:.3f}"
              + (f" (closed form {r.order_exact:.3f})" if r.order_exact is not None else ""))
        for i, eta in enumerate(r.etas):
            ex = f"  exact {r.exact_error[i]:.5f}" if r.exact_error else ""
            print(f"  eta {eta:<6} weak error {r.weak_error[i]:.5f}  MC s.e. "
                  f"{r.mc_stderr[i]:.5f}{ex}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump([r.to_dict() for r in results], fh, indent=2)


if __name__ == "__main__":
    main()
