"""Learning curves and accuracy against wall-clock, from run directories only.

Each figure has one column per data set; each curve is one label (method plus ablated
settings), the mean over seeds with a band of ± one standard deviation.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from dsbp.plots.rundir import Run, mean_curve, read_runs


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    """Save ``fig`` as PNG atomically (temporary file + os.replace) and close it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        _pyplot().close(fig)
    return path


def _by_dataset(runs: Sequence[Run]) -> dict[str, dict[str, list[Run]]]:
    out: dict[str, dict[str, list[Run]]] = {}
    for r in runs:
        out.setdefault(r.config["dataset"], {}).setdefault(r.label, []).append(r)
    return out


def _band(ax: Any, curves: list, label: str, marker: str | None = None) -> None:
    x, m, s = mean_curve(curves)
    if not len(x):
        return
    n = len([c for c in curves if len(c[0])])
    (line,) = ax.plot(x, m, label=f"{label} (n={n})", marker=marker, markersize=3)
    if n > 1:
        ax.fill_between(x, m - s, m + s, color=line.get_color(), alpha=0.2, linewidth=0)


def plot_learning_curves(run_dirs: Iterable[str | Path], path: str | Path) -> Path | None:
    """Training loss against epoch (top row) and test accuracy against epoch (bottom row).

    Args:
        run_dirs: run directories (any mix of data sets and methods).
        path: the PNG to write.

    Returns:
        ``path``, or None when there is no run to plot.
    """
    runs = read_runs(run_dirs)
    if not runs:
        return None
    plt = _pyplot()
    data = _by_dataset(runs)
    fig, axes = plt.subplots(2, len(data), figsize=(5 * len(data), 7), squeeze=False,
                             layout="constrained")
    for j, (ds, by_label) in enumerate(sorted(data.items())):
        top, bottom = axes[0, j], axes[1, j]
        for label, group in sorted(by_label.items()):
            _band(top, [r.series("train", "epoch", "train_loss") for r in group], label)
            acc = [r.series("eval", "epoch", "test_acc") for r in group]
            _band(bottom, [(x, 100 * y) for x, y in acc], label, marker="o")
        top.set(title=f"{ds}: training loss", xlabel="epoch", ylabel="train loss (mean per step)")
        bottom.set(title=f"{ds}: test accuracy", xlabel="epoch", ylabel="test accuracy (%)")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    return _save(fig, Path(path))


def plot_accuracy_vs_wallclock(run_dirs: Iterable[str | Path], path: str | Path) -> Path | None:
    """Test accuracy against training wall-clock seconds (evaluation time excluded).

    Each point is one evaluation; the x value is the mean over seeds of its ``wall_s``.

    Returns:
        ``path``, or None when there is no run to plot.
    """
    runs = read_runs(run_dirs)
    if not runs:
        return None
    plt = _pyplot()
    data = _by_dataset(runs)
    fig, axes = plt.subplots(1, len(data), figsize=(5 * len(data), 3.8), squeeze=False,
                             layout="constrained")
    for j, (ds, by_label) in enumerate(sorted(data.items())):
        ax = axes[0, j]
        for label, group in sorted(by_label.items()):
            # Align seeds on the epoch, then place each epoch at its mean wall-clock time.
            ex, acc, acc_sd = mean_curve([r.series("eval", "epoch", "test_acc") for r in group])
            _, wall, _ = mean_curve([r.series("eval", "epoch", "wall_s") for r in group])
            if not len(ex) or len(wall) != len(ex):
                continue
            (line,) = ax.plot(wall, 100 * acc, marker="o", markersize=3,
                              label=f"{label} (n={len(group)})")
            if len(group) > 1:
                ax.fill_between(wall, 100 * (acc - acc_sd), 100 * (acc + acc_sd),
                                color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set(title=f"{ds}: test accuracy vs training time", xlabel="training wall-clock (s)",
               ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, Path(path))
