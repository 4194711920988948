"""Cayley double-bracket basis tracking vs repeated block power iteration: cost at equal accuracy.

Extension 5 of METHOD.md §2 (Lie-algebra-inspired dynamics). Two synthetic experiments with a
known covariance (the truth is ``torch.linalg.eigh`` of it), both matrix-free like DSBP
(``C V = A^T (A V)`` on sampled rows ``A``):

A. Fixed covariance, warm start ``pert`` radians away from the top-k space: basis error (largest
   principal angle) against matrix-free products and seconds, for block power iteration and for
   Cayley steps (``eps = c / lambda_1``).
B. Drifting stream (the covariance rotates a little every step, a fresh batch each step): mean
   tracking error of the methods at the same number of products per step, and the paper's
   schedule (5 iterations every 100 steps).

    .venv/bin/python scripts/ext_lie.py --out results/extensions/lie

Writes ``report.md``, ``results.json`` and ``lie_cost.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

from dsbp.core.eigen import block_power_iteration, orthonormalize
from dsbp.core.lie import double_bracket_step
from dsbp.core.subspace import principal_angles


def spectrum(d: int, k: int) -> torch.Tensor:
    """Power-law activation-like spectrum with a modest gap after the top k [ours]."""
    i = torch.arange(1, d + 1, dtype=torch.float64)
    lam = i.pow(-1.0)
    lam[k:] *= 0.6
    return lam


def rows(Q: torch.Tensor, lam: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    z = torch.randn(n, Q.shape[0], generator=g, dtype=torch.float64)
    return ((z * lam.sqrt()) @ Q.T).float()


def max_angle(V: torch.Tensor, k: int, top: torch.Tensor) -> float:
    return float(principal_angles(V[:, :k], top).max())


def lie_step(A: torch.Tensor, V64: torch.Tensor, c: float) -> torch.Tensor:
    """One tracking step as in LieSpectralProjector: Ritz order, then a Cayley step."""
    Y = (A.T @ (A @ V64.float())).double()
    T = V64.T @ Y
    ev, R = torch.linalg.eigh(0.5 * (T + T.T))
    ev, R = ev.flip(0), R.flip(1)
    V, Y = V64 @ R, Y @ R
    return double_bracket_step(V, Y, c / ev[0])


def experiment_a(d, k, b, n, pert, budget, cs, seed):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    lam = spectrum(d, k)
    A = rows(Q, lam, n, g)
    C = (A.T @ A).double()
    top = torch.linalg.eigh(C).eigenvectors.flip(1)[:, :k]  # truth: the sampled rows' top-k
    truth_b = torch.linalg.eigh(C).eigenvectors.flip(1)[:, :b]
    # warm start: rotate the true top-b block by a random rotation of size ~pert
    N = torch.randn(d, b, generator=g, dtype=torch.float64)
    N = N - truth_b @ (truth_b.T @ N)
    V0 = orthonormalize(truth_b + pert * N / N.norm(dim=0, keepdim=True)).double()
    out = {"start": max_angle(V0, k, top)}

    def timed(fn):
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            res = fn()
            best = min(best, time.perf_counter() - t)
        return res, best

    curves = {}
    # power iteration: error after j iterations (j matvecs + 1 for the Rayleigh-Ritz)
    pw = []
    for j in range(0, budget + 1):
        (ev, V), sec = timed(lambda j=j: block_power_iteration(
            lambda X: A.T @ (A @ X), V0.float(), j))
        pw.append({"matvecs": j + 1, "angle": max_angle(V.double(), k, top), "seconds": sec})
    curves["power"] = pw
    for c in cs:
        V = V0.clone()
        cur = [{"matvecs": 0, "angle": out["start"], "seconds": 0.0}]
        spent = 0.0  # step time only, not the accuracy measurement
        for j in range(1, budget * 4 + 1):
            t = time.perf_counter()
            V = lie_step(A, V, c)
            spent += time.perf_counter() - t
            cur.append({"matvecs": j, "angle": max_angle(V, k, top), "seconds": spent})
        curves[f"cayley c={c}"] = cur
    out["curves"] = curves
    out["eig_gap_ratio"] = float(lam[k] / lam[k - 1])
    return out


def first_below(curve, tol):
    for p in curve:
        if p["angle"] <= tol:
            return p
    return None


def experiment_b(d, k, b, n, steps, drift_rate, c, seed):
    """Mean tracking error on a stream whose covariance rotates by exp(t S)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    lam = spectrum(d, k)
    S = torch.randn(d, d, generator=g, dtype=torch.float64)
    S = drift_rate * (S - S.T) / (2 * d**0.5)
    R = torch.linalg.matrix_exp(S)
    A0 = rows(Q, lam, 4 * n, g)
    _, V_init = block_power_iteration(lambda X: A0.T @ (A0 @ X),
                                      torch.randn(d, b, generator=g).float(), 30)
    methods = {
        "cayley every step (1 product/step)": {"kind": "lie"},
        "power 1 iter every step (1 product/step)": {"kind": "power", "p": 1, "iters": 1},
        "power 5 iters every 5 steps (1 product/step)": {"kind": "power", "p": 5, "iters": 5},
        "power 5 iters every 100 steps (paper, 0.05/step)": {"kind": "power", "p": 100,
                                                              "iters": 5},
    }
    state = {m: V_init.double().clone() for m in methods}
    err = {m: [] for m in methods}
    sec = {m: 0.0 for m in methods}
    for t in range(steps):
        Q = R @ Q
        A = rows(Q, lam, n, g)
        top = Q[:, :k]  # the truth: lam is sorted, so the first k columns of Q span the top-k
        for m, spec in methods.items():
            V = state[m]
            t0 = time.perf_counter()
            if spec["kind"] == "lie":
                V = lie_step(A, V, c)
            elif t % spec["p"] == 0:
                _, Vf = block_power_iteration(lambda X, A=A: A.T @ (A @ X), V.float(),
                                              spec["iters"])
                V = Vf.double()
            sec[m] += time.perf_counter() - t0
            state[m] = V
            err[m].append(max_angle(V, k, top))
    return {m: {"mean_angle": sum(e[steps // 5:]) / len(e[steps // 5:]),
                "final_angle": e[-1], "seconds_per_step": sec[m] / steps, "curve": e}
            for m, e in err.items()}


def conclusions(a: dict, bres: dict) -> list[str]:
    """Plain statements computed from the numbers (so the text cannot drift from them)."""
    out = []
    pw = first_below(a["curves"]["power"], 1e-2)
    cay = {m: first_below(c, 1e-2) for m, c in a["curves"].items() if m != "power"}
    reached = {m: p for m, p in cay.items() if p is not None}
    if pw is not None and reached:
        best = min(reached, key=lambda m: reached[m]["matvecs"])
        out.append(
            f"- A: to reach 1e-2 rad, block power iteration needed {pw['matvecs']} products and "
            f"the best Cayley step size ({best}) {reached[best]['matvecs']}: power iteration is "
            f"{reached[best]['matvecs'] / pw['matvecs']:.1f}x cheaper in products and "
            f"{reached[best]['seconds'] / max(pw['seconds'], 1e-12):.1f}x in seconds.")
    elif pw is not None:
        out.append(f"- A: block power iteration reached 1e-2 rad in {pw['matvecs']} products; no "
                   "Cayley step size did within the budget.")
    finals = ", ".join(f"{m}: {c[-1]['angle']:.2e} rad after {c[-1]['matvecs']}"
                       for m, c in a["curves"].items() if m != "power")
    out.append("- A: the Cayley flow contracts the error by about "
               "c (lambda_k - lambda_(k+1)) / lambda_1 per step, power iteration by "
               "lambda_(k+1) / lambda_k per product; with a decaying spectrum the first is far "
               f"slower. Final Cayley errors: {finals} products.")
    names = list(bres)
    lie, p1 = bres[names[0]], bres[names[1]]
    paper = bres[names[3]]
    out.append(
        f"- B: at one product per step, Cayley tracking followed the drifting top-k with a mean "
        f"error of {lie['mean_angle']:.3f} rad against {p1['mean_angle']:.3f} for one "
        "warm-started power iteration per step: "
        + ("better." if lie["mean_angle"] < p1["mean_angle"] else "worse.")
        + f" Both beat the paper's schedule (5 iterations every 100 steps: "
        f"{paper['mean_angle']:.3f} rad), whose basis goes stale between refreshes.")
    out.append("- Verdict: on this CPU measurement the Cayley / double-bracket tracker keeps "
               "bases exactly orthonormal and converges (tests), but it is not a cheaper way to "
               "reach a given basis accuracy than repeated power iteration.")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="results/extensions/lie")
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--oversample", type=int, default=8)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    d, k, b = args.d, args.k, args.k + args.oversample
    t0 = time.time()
    a = experiment_a(d, k, b, args.n, pert=0.3, budget=12, cs=(0.5, 1.0, 2.0), seed=args.seed)
    bres = experiment_b(d, k, b, args.n // 4, steps=300, drift_rate=0.05, c=1.0, seed=args.seed)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    meta = {"command": "python scripts/ext_lie.py " + " ".join(
        f"--{k_}={v}" for k_, v in vars(args).items()), "commit": commit, "seed": args.seed,
        "device": f"CPU ({args.threads} thread(s) of a shared 2-core machine)",
        "torch": torch.__version__, "python": platform.python_version(),
        "wall_seconds": round(time.time() - t0, 1)}
    (out / "results.json").write_text(json.dumps({"meta": meta, "A": a, "B": bres}, indent=1))

    lines = ["# Lie-algebra dynamics: Cayley tracking vs repeated power iteration", "",
             f"Regenerate: `{meta['command']}` (commit {commit}, seed {args.seed}, "
             f"{meta['device']}, synthetic covariance with a known spectrum; "
             f"{meta['wall_seconds']} s).", "",
             f"d = {d}, k = {k}, block b = {b} (k + oversample), spectrum lambda_i = 1/i with "
             f"the tail after k scaled by 0.6 (lambda_(k+1)/lambda_k = "
             f"{a['eig_gap_ratio']:.3f}).", "",
             "## A. Fixed covariance, warm start "
             f"{a['start']:.3f} rad from the top-k space", "",
             "Products = matrix-free `A^T (A V)` evaluations (the dominant cost: "
             f"n = {args.n} rows).", "",
             "| method | products to 1e-2 rad | seconds | products to 1e-3 rad | seconds |",
             "|---|---|---|---|---|"]
    for m, cur in a["curves"].items():
        cells = []
        for tol in (1e-2, 1e-3):
            p = first_below(cur, tol)
            cells += ([str(p["matvecs"]), f"{p['seconds'] * 1e3:.1f} ms"] if p else
                      [f"> {cur[-1]['matvecs']}", "-"])
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "## B. Drifting covariance, fresh batch of "
              f"{args.n // 4} rows each step, 300 steps", "",
              "| method | mean max angle (rad, after 60 steps) | final | ms / step |",
              "|---|---|---|---|"]
    for m, r in bres.items():
        lines.append(f"| {m} | {r['mean_angle']:.3f} | {r['final_angle']:.3f} | "
                     f"{r['seconds_per_step'] * 1e3:.2f} |")
    lines += ["", "## What it shows", ""] + conclusions(a, bres) + [""]
    (out / "report.md").write_text("\n".join(lines))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for m, cur in a["curves"].items():
        ax[0].semilogy([p["matvecs"] for p in cur], [max(p["angle"], 1e-8) for p in cur],
                       label=m)
    ax[0].set(xlabel="matrix-free products A^T(A V)", ylabel="max principal angle (rad)",
              title="A: fixed covariance, warm start")
    ax[0].legend(fontsize=8)
    for m, r in bres.items():
        ax[1].plot(r["curve"], label=m, lw=1)
    ax[1].set(xlabel="step", ylabel="max principal angle to true top-k (rad)",
              title="B: drifting covariance")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "lie_cost.png", dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
