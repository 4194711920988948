"""The paper's figures (1a, 1b, 2, 3a, 3b, 4) from run directories: ``dsbp figures RUN_DIR...``.

Reads only run directories (``config.json``, ``metrics.jsonl``, and the
``diagnostics/diagnostics.json`` written by ``dsbp diagnose``); imports no training code.

- 1a ``fig1a_alignment.png``: gradient energy kept in the DSBP subspace vs epoch
  (``alignment/energy_kept/mean`` eval records, from ``--track alignment``).
- 1b ``fig1b_hessian.png``: top Hessian eigenvalue vs epoch (``hessian/top_eigenvalue``, from
  ``--track hessian``).
- 2 ``fig2_stratification.png``: one layer's activation rows in their 3 leading principal
  coordinates, before and after projection onto the rank-k subspace (``dsbp diagnose``).
- 3a ``fig3a_landscape.png``: 1-D loss slices along a filter-normalised random direction and the
  top Hessian eigenvector.
- 3b ``fig3b_eigvar.png``: variance of the top-k normalised activation eigenvalues by layer index
  [ours: our reading of the paper's "eigenvalue variance across layer index"].
- 4 ``fig4_perturbation.png``: loss increase vs relative perturbation radius.

Every figure draws one curve (mean over seeds, shaded +- std where there are several) per
method label, so a folder holding SGD, SAM and DSBP runs compares the three. A method without
the data a figure needs (e.g. SGD has no DSBP subspace for 1a) is listed as "n/a" in the legend.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dsbp.plots.rundir import Run, mean_curve, read_runs

__all__ = ["add_parser", "find_run_dirs", "make_figures"]

FIGURES = ("1a", "1b", "2", "3a", "3b", "4")


def find_run_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Run directories (holding ``config.json``) at or below each path, sorted."""
    found: set[Path] = set()
    for p in map(Path, paths):
        if (p / "config.json").exists():
            found.add(p)
        elif p.is_dir():
            found.update(c.parent for c in p.rglob("config.json"))
        else:
            raise ValueError(f"{p} is not a directory")
    if not found:
        raise ValueError(f"no run directories (with config.json) under {list(map(str, paths))}")
    return sorted(found)


def _diagnostics(run: Run) -> dict[str, Any] | None:
    p = run.path / "diagnostics" / "diagnostics.json"
    return json.loads(p.read_text()) if p.exists() else None


def _groups(runs: Sequence[Run]) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = {}
    for r in runs:
        label = r.label if len({x.config["dataset"] for x in runs}) == 1 else \
            f"{r.label} ({r.config['dataset']})"
        out.setdefault(label, []).append(r)
    return out


def _plot_mean(ax: Any, label: str, curves: list[tuple[np.ndarray, np.ndarray]], **kw: Any
               ) -> bool:
    x, m, s = mean_curve(curves)
    if not len(x):
        ax.plot([], [], " ", label=f"{label}: n/a")
        return False
    n = len([c for c in curves if len(c[0])])
    line, = ax.plot(x, m, marker="o", ms=3, label=f"{label} (n={n})", **kw)
    if n > 1:
        ax.fill_between(x, m - s, m + s, color=line.get_color(), alpha=0.2)
    return True


def _epoch_figure(plt: Any, groups: dict[str, list[Run]], key: str, ylabel: str, title: str,
                  path: Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for label, runs in groups.items():
        _plot_mean(ax, label, [r.series("eval", "epoch", key) for r in runs])
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _diag_curves(runs: list[Run], get: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for r in runs:
        d = _diagnostics(r)
        if d is None:
            continue
        xy = get(d)
        if xy is not None:
            out.append((np.asarray(xy[0], float), np.asarray(xy[1], float)))
    return out


def _fig2(plt: Any, groups: dict[str, list[Run]], path: Path) -> Path:
    items = []
    for label, runs in groups.items():
        d = next((x for x in map(_diagnostics, runs) if x and x.get("stratification")), None)
        if d is not None:
            items.append((label, d["stratification"]))
    n = max(len(items), 1)
    fig = plt.figure(figsize=(8, 3.6 * n), layout="constrained")
    for i, (label, s) in enumerate(items):
        before, after = np.asarray(s["before"]), np.asarray(s["after"])
        for j, (pts, what) in enumerate(((before, "before projection"),
                                         (after, f"after projection (rank {s['rank']}, "
                                                 f"{s['basis']})"))):
            ax = fig.add_subplot(n, 2, 2 * i + j + 1, projection="3d")
            ax.scatter(pts[:, 0], pts[:, 1], pts[:, 2], s=2, alpha=0.5,
                       c=np.arange(len(pts)), cmap="viridis")
            ax.set_title(f"{label}, layer {s['layer']}: {what}", fontsize=8)
            ax.set_xlabel("PC 1 (activation units)", fontsize=7)
            ax.set_ylabel("PC 2", fontsize=7)
            ax.set_zlabel("PC 3", fontsize=7)
    if not items:
        fig.text(0.5, 0.5, "no diagnostics.json with stratification data (run dsbp diagnose)",
                 ha="center")
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def make_figures(paths: Sequence[str | Path], out: str | Path, which: Sequence[str] = FIGURES
                 ) -> list[Path]:
    """Draw the requested figures from the runs under ``paths`` into ``out``; returns the PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    bad = [w for w in which if w not in FIGURES]
    if bad:
        raise ValueError(f"unknown figure(s) {bad}; known: {list(FIGURES)}")
    runs = read_runs(find_run_dirs(paths))
    groups = _groups(runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    made = []
    if "1a" in which:
        made.append(_epoch_figure(
            plt, groups, "alignment/energy_kept/mean",
            "energy kept ||E E^T G|| / ||G|| (layer mean)",
            "Fig. 1a: gradient / spectral-subspace alignment", out / "fig1a_alignment.png"))
    if "1b" in which:
        made.append(_epoch_figure(
            plt, groups, "hessian/top_eigenvalue", "top Hessian eigenvalue (nats / weight unit^2)",
            "Fig. 1b: sharpness during training", out / "fig1b_hessian.png"))
    if "2" in which:
        made.append(_fig2(plt, groups, out / "fig2_stratification.png"))
    if "3a" in which:
        fig, ax = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
        for label, rs in groups.items():
            for a, key in zip(ax, ("random_filter_normalised", "top_hessian_eigenvector"),
                              strict=True):
                _plot_mean(a, label, _diag_curves(
                    rs, lambda d, key=key: (d["slice_1d"]["alphas"], d["slice_1d"][key])))
        ax[0].set_title("Fig. 3a: slice along a filter-normalised random direction")
        ax[1].set_title("slice along the top Hessian eigenvector (|d| = ||w|| / 10)")
        for a in ax:
            a.set_xlabel("alpha (step along the direction, direction units)")
            a.set_ylabel("training loss (cross-entropy, nats)")
            a.legend(fontsize=8)
        made.append(out / "fig3a_landscape.png")
        fig.savefig(made[-1], dpi=130)
        plt.close(fig)
    if "3b" in which:
        fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
        for label, rs in groups.items():
            _plot_mean(ax, label, _diag_curves(rs, lambda d: (
                [s["index"] for s in d["activation_spectra"]],
                [s["variance"] for s in d["activation_spectra"]])))
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer index (Linear / Conv2d, input to output)")
        ax.set_ylabel("variance of top-k eigenvalues of C_l / tr C_l")
        ax.set_title("Fig. 3b: eigenvalue variance by layer")
        ax.legend(fontsize=8)
        made.append(out / "fig3b_eigvar.png")
        fig.savefig(made[-1], dpi=130)
        plt.close(fig)
    if "4" in which:
        fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
        for label, rs in groups.items():
            curves = _diag_curves(rs, lambda d: (d["perturbation"]["radii"],
                                                 d["perturbation"]["mean_increase"]))
            _plot_mean(ax, label, curves)
            spreads = _diag_curves(rs, lambda d: (d["perturbation"]["radii"],
                                                  d["perturbation"].get("std_increase")))
            if len(curves) == 1 and spreads and np.all(np.isfinite(spreads[0][1])):
                # one run: shade +- one std over the noise draws (spread, not a CI)
                (x, m), (_, sd) = curves[0], spreads[0]
                ax.fill_between(x, m - sd, m + sd, color=ax.lines[-1].get_color(), alpha=0.15)
        ax.set_xlabel("relative perturbation radius r (noise norm / filter norm)")
        ax.set_ylabel("training-loss increase (nats), mean ± std over draws")
        ax.set_title("Fig. 4: perturbation dynamics")
        ax.legend(fontsize=8)
        made.append(out / "fig4_perturbation.png")
        fig.savefig(made[-1], dpi=130)
        plt.close(fig)
    return made


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``dsbp figures`` to an ``argparse`` subparsers object."""
    p = subparsers.add_parser("figures", help="the paper's figures from run directories",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="run directories or folders holding them")
    p.add_argument("--out", help="output folder (default: FIRST_PATH/figures)")
    p.add_argument("--only", help="comma-separated subset of " + ",".join(FIGURES))
    p.set_defaults(func=_cmd)
    return p


def _cmd(args: argparse.Namespace) -> int:
    out = args.out or str(Path(args.paths[0]) / "figures")
    which = [w.strip() for w in args.only.split(",")] if args.only else list(FIGURES)
    for p in make_figures(args.paths, out, which):
        print(f"wrote {p}")
    return 0
