"""Read run directories (``config.json``, ``metrics.jsonl``, ``result.json``) for plotting.

Plots are functions of run directories only: this module imports no training code, so a
figure can be remade from a copied results folder without the model or data.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Run:
    """One run directory, read.

    Attributes:
        path: the directory.
        config: ``config.json`` as a dict.
        records: ``metrics.jsonl`` records (a torn last line is skipped).
        result: ``result.json`` as a dict, or None for an unfinished run.
        label: the curve label (method plus the settings that distinguish it; set by
            :func:`label_runs`).
    """

    path: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    result: dict[str, Any] | None
    label: str = field(default="")

    def series(self, kind: str, x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
        """``(x, y)`` arrays from the records of ``kind`` that have both keys."""
        pts = [(r[x], r[y]) for r in self.records if r.get("kind") == kind and x in r and y in r]
        if not pts:
            return np.zeros(0), np.zeros(0)
        a = np.asarray(pts, dtype=float)
        return a[:, 0], a[:, 1]


def read_run(path: str | Path) -> Run:
    """Read one run directory; ``ValueError`` if it has no ``config.json``."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise ValueError(f"{path} is not a run directory (no config.json)")
    config = json.loads((path / "config.json").read_text())
    records: list[dict[str, Any]] = []
    mp = path / "metrics.jsonl"
    if mp.exists():
        for line in mp.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line torn by a crash; the rest is intact
    rp = path / "result.json"
    result = json.loads(rp.read_text()) if rp.exists() else None
    return Run(path, config, records, result)


def _setting(cfg: dict[str, Any], key: str) -> Any:
    return cfg[key] if key in cfg else cfg.get("method_kwargs", {}).get(key)


def label_runs(runs: Sequence[Run]) -> list[Run]:
    """Set each run's ``label``: its method, plus ``key=value`` for every setting (config field
    or method kwarg, seed excluded) that differs between runs of the same data set and method."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        groups.setdefault((r.config["dataset"], r.config["method"]), []).append(r)
    skip = {"dataset", "method", "seed", "method_kwargs", "model_kwargs", "track"}
    for group in groups.values():
        keys = sorted({k for r in group for k in r.config if k not in skip})
        keys += sorted({k for r in group for k in r.config.get("method_kwargs", {})})
        varying = [k for k in keys
                   if len({json.dumps(_setting(r.config, k), sort_keys=True) for r in group}) > 1]
        for r in group:
            extra = " ".join(f"{k}={_setting(r.config, k)}" for k in varying)
            r.label = r.config["method"] + (f" {extra}" if extra else "")
    return list(runs)


def read_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Read and label several run directories."""
    return label_runs([read_run(p) for p in paths])


def mean_curve(
    curves: Sequence[tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and (population) std of several ``(x, y)`` curves over the x values all share.

    Seeds of one setting log at the same steps, so their x values agree; where they do not
    (a diverged or shorter run), only the common x values are kept.

    Returns:
        ``(x, mean, std)``; empty arrays when there is no common x.
    """
    curves = [c for c in curves if len(c[0])]
    if not curves:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    common = set(curves[0][0].tolist())
    for x, _ in curves[1:]:
        common &= set(x.tolist())
    xs = np.array(sorted(common), dtype=float)
    if not len(xs):
        return xs, xs, xs
    ys = np.stack([np.interp(xs, x, y) for x, y in curves])  # exact at shared x values
    finite = np.where(np.isfinite(ys), ys, math.nan)
    return xs, np.nanmean(finite, axis=0), np.nanstd(finite, axis=0)
