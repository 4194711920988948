"""``report.md`` of a sweep: measured mean ± std per data set x method beside the paper's claim.

The paper's numbers below are *claims* copied from ``METHOD.md`` §4 (the paper's Table of
accuracies); this project has not reproduced them. The report says so next to every use.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dsbp.experiments import atomic
from dsbp.experiments.config import RunConfig

# The paper's claimed test accuracies in percent (METHOD.md §4), by data set and method.
PAPER_CLAIMED_ACC: dict[str, dict[str, float]] = {
    "CIFAR-10": {"DSBP": 96.3, "SAM": 95.5, "LoRA": 95.1, "MAML": 94.8},
    "Fashion-MNIST": {"DSBP": 93.8, "SAM": 93.2},
    "MedMNIST": {"DSBP": 78.7, "SAM": 74.5},
    "Tiny ImageNet": {"DSBP": 65.4, "SAM": 64.1},
}
PAPER_METHODS = ("DSBP", "SAM", "LoRA", "MAML")

# Our method names -> the paper's column (only methods the paper reports).
_PAPER_METHOD = {"dsbp": "DSBP", "sam": "SAM", "lora": "LoRA", "maml": "MAML"}


def paper_dataset(name: str) -> str | None:
    """The paper's data set row for one of our data set names (None if the paper has none).

    ``bundled`` (a 6000-image Fashion-MNIST subset) maps to Fashion-MNIST; all MedMNIST flags
    map to the paper's single "MedMNIST" row (the paper does not say which subset it used).
    """
    if name in ("fashion_mnist", "bundled"):
        return "Fashion-MNIST"
    if name == "cifar10":
        return "CIFAR-10"
    if name.startswith("medmnist"):
        return "MedMNIST"
    if name == "tiny_imagenet":
        return "Tiny ImageNet"
    return None


def paper_claim(dataset: str, method: str) -> float | None:
    """The paper's claimed accuracy (%) for our ``dataset`` and ``method`` names, or None."""
    row = paper_dataset(dataset)
    col = _PAPER_METHOD.get(method)
    if row is None or col is None:
        return None
    return PAPER_CLAIMED_ACC[row].get(col)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; NaN for fewer than two values)."""
    if not values:
        return math.nan, math.nan
    m = statistics.fmean(values)
    return m, statistics.stdev(values) if len(values) > 1 else math.nan


def _pm(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    if not values:
        return "n/a"
    m, s = mean_std([v * scale for v in values])
    return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if not math.isnan(s) else " (n=1)")


def summarise(rows: Sequence[Mapping[str, Any]], varying: Sequence[str]) -> list[dict[str, Any]]:
    """Group finished (status ``ok``) runs by data set, model, method and ablated settings.

    Returns:
        One dict per group with ``dataset, model, method, settings`` (``"k=v ..."``),
        ``n_ok, n_failed``, ``acc`` / ``loss`` / ``wall`` (lists of per-seed values).
    """
    groups: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        # A setting a method does not read (e.g. SGD under --ablate rank) is left out.
        settings = " ".join(f"{k}={r.get(k)}" for k in varying if r.get(k) not in (None, ""))
        key = (r["dataset"], r["model"], r["method"], settings)
        g = groups.setdefault(key, {"dataset": key[0], "model": key[1], "method": key[2],
                                    "settings": settings, "n_ok": 0, "n_failed": 0,
                                    "acc": [], "loss": [], "wall": [], "seeds": []})
        if r["status"] == "ok":
            g["n_ok"] += 1
            g["acc"].append(float(r["test_acc"]))
            g["loss"].append(float(r["test_loss"]))
            g["wall"].append(float(r["wall_s"]))
            g["seeds"].append(int(r["seed"]))
        else:
            g["n_failed"] += 1
    return list(groups.values())


def _config_lines(configs: Sequence[RunConfig], varying: Sequence[str] = ()) -> list[str]:
    """Markdown lines: settings shared by every run, then per method what differs from them.

    Method kwargs are shown only for the methods that read them (per the method registry);
    the ablated settings (``varying``) are in the results table, not here.
    """
    from dsbp.experiments.build import METHODS

    def settings(c: RunConfig) -> dict[str, str]:
        d = {k: v for k, v in c.to_dict().items()
             if k not in ("dataset", "method", "seed", "method_kwargs", "track", "log_every",
                          "checkpoint_every")}
        spec = METHODS.get(c.method)
        d.update({k: v for k, v in c.method_kwargs.items() if spec is None or k in spec.settings})
        return {k: json.dumps(v, sort_keys=True) for k, v in d.items() if k not in varying}

    per = [settings(c) for c in configs]
    common = {k: v for k, v in per[0].items() if all(p.get(k) == v for p in per)}
    lines = ["Shared by every run: " + ", ".join(f"`{k}={v}`" for k, v in common.items()), ""]
    seen: dict[str, str] = {}
    for c, p in zip(configs, per, strict=True):
        own = ", ".join(f"`{k}={v}`" for k, v in p.items() if k not in common)
        seen.setdefault(c.method, own)
    lines += [f"- {m}: {own or 'nothing else'}" for m, own in seen.items()]
    if varying:
        lines += ["", "Ablated (values per row of the table): " + ", ".join(varying)]
    return lines


def write_report(
    path: str | Path,
    rows: Sequence[Mapping[str, Any]],
    varying: Sequence[str],
    info: Mapping[str, Any],
    plots: Sequence[str] = (),
    configs: Sequence[RunConfig] = (),
) -> Path:
    """Write ``report.md`` for a sweep.

    Args:
        path: the report file.
        rows: ``results.csv`` rows (see ``dsbp.experiments.sweep.collect_rows``).
        varying: ablated setting names (extra columns).
        info: ``bench.json`` content: ``command``, ``preset``, ``label``, ``env``, ``seeds``;
            and ``data_files`` (data set, path, bytes, sha256 of each data file the runs read)
            and ``problems`` (unreadable files, named), when known.
        plots: PNG file names next to the report.
        configs: the runs' configs (for the configuration section).
    """
    order = {name: i for i, name in enumerate(info.get("runs", []))}
    rows = sorted(rows, key=lambda r: order.get(r["run"], len(order)))
    env = info.get("env", {})
    devices = sorted({str(r["device"]) for r in rows if r.get("device")})
    seeds = sorted({int(r["seed"]) for r in rows})
    commit = env.get("commit") or "unknown"
    if env.get("dirty"):
        commit += " (with uncommitted changes in tracked files)"
    label = info.get("label") or (
        "the paper preset" if info.get("preset") == "paper"
        else "[ours] settings, not the paper's setting"
    )
    n = {s: sum(1 for r in rows if r["status"] == s) for s in ("ok", "diverged", "error",
                                                                "incomplete")}
    lines = [
        f"# dsbp bench report: {label}",
        "",
        f"- **Setting:** {label}. Preset: `{info.get('preset') or 'none'}`.",
        f"- **Regenerate:** `{info.get('command', 'unknown')}`",
        f"- **Commit:** `{commit}`",
        f"- **Seeds:** {', '.join(map(str, seeds))}",
        f"- **Device:** {', '.join(devices) or 'unknown'}; torch {env.get('torch', '?')}, "
        f"python {env.get('python', '?')}, host `{env.get('host', '?')}`",
        f"- **Runs:** {len(rows)} ({n['ok']} ok, {n['diverged']} diverged, {n['error']} error"
        + (f", {n['incomplete']} incomplete" if n["incomplete"] else "") + ")",
    ]
    for f in info.get("data_files") or []:
        lines.append(f"- **Data ({f.get('dataset')}):** `{f.get('path')}` ({f.get('bytes')} "
                     f"bytes, sha256 `{f.get('sha256')}`)")
    for problem in info.get("problems") or []:
        lines.append(f"- **Unreadable, left out:** {problem}")
    lines += [
        "",
        "## Measured by this project",
        "",
        "Test accuracy after the last epoch, mean ± sample std over seeds (runs with status ok). "
        "Train time excludes evaluation; on a shared CPU it is noisy. The last column is "
        "**the paper's claim** (METHOD.md §4) for the same data set and method, shown for "
        "reference only: it is not measured here"
        + (", and this setting is not the paper's." if info.get("preset") != "paper" else "."),
        "",
    ]
    header = ["data set", "model", "method"] + (["settings"] if varying else []) + [
        "runs ok", "test acc (%)", "test loss", "train time (s)", "paper's claim (%)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for g in summarise(rows, varying):
        claim = paper_claim(g["dataset"], g["method"])
        cells = [g["dataset"], g["model"], g["method"]] + ([g["settings"]] if varying else []) + [
            f"{g['n_ok']}/{g['n_ok'] + g['n_failed']}", _pm(g["acc"], 100.0),
            _pm(g["loss"], 1.0, 3), _pm(g["wall"], 1.0, 1),
            f"{claim:.1f} (paper's claim)" if claim is not None else ""]
        lines.append("| " + " | ".join(cells) + " |")
    if configs:
        lines += ["", "## Configuration", ""] + _config_lines(configs, varying)
    lines += [
        "",
        "## The paper's claimed accuracies (METHOD.md §4)",
        "",
        "These are **the paper's claims**, copied from METHOD.md §4; no code was published "
        "with the paper and this project has not reproduced them.",
        "",
        "| data set | " + " | ".join(PAPER_METHODS) + " |",
        "|---|" + "---|" * len(PAPER_METHODS),
    ]
    for ds, accs in PAPER_CLAIMED_ACC.items():
        lines.append(f"| {ds} | " + " | ".join(
            f"{accs[m]:.1f}" if m in accs else "" for m in PAPER_METHODS) + " |")
    if plots:
        lines += ["", "## Plots", "", "Made by `dsbp.plots` from the run directories only "
                  "(`dsbp report <out>` remakes them).", ""]
        lines += [f"![{p}]({p})" for p in plots]
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        lines += ["", "## Runs that did not finish", ""]
        lines += [f"- `{r['run']}`: {r['status']}: {r.get('message', '')}" for r in failed]
    return atomic.write_text(path, "\n".join(lines) + "\n")
