"""Issue 7 on the GPU: tables and plots from the ``dsbp bench`` runs and the robustness JSONs.

Reads every run present under ``results/dsbp_claims_gpu/runs/<data set>/<config>/runs/<run>/``
(``config.json``, ``result.json``, ``metrics.jsonl``; one ``dsbp bench`` run each, as written by
``scripts/gpu_dsbp_claims.sh``) and every ``results/dsbp_claims_gpu/robustness/*.json``
(``scripts/dsbp_claims_robustness.py``: clean accuracy, ``hessian_top``, shifted streams, FGSM/PGD,
and ``weight_norm`` where a run recorded it). Writes ``results/dsbp_claims_gpu/tables.md`` and
``docs/img/dsbp_claims_gpu_*.png``. Every number comes from those files: configurations, seeds and
data sets are discovered, a mean over seeds combines only the runs that exist and says n.

Selection rule (the only place a choice is made): among the DSBP configurations (names starting
with ``dsbp``) present on every data set, the one with the highest final-epoch validation
accuracy, averaged over seeds and then over data sets. The test split is never used to choose.

Usage::

    .venv/bin/python scripts/dsbp_claims_gpu_report.py            # default: results/dsbp_claims_gpu
    .venv/bin/python scripts/dsbp_claims_gpu_report.py --res DIR --img DIR
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAMES = {"c10": "CIFAR-10", "fm": "Fashion-MNIST", "cifar10": "CIFAR-10",
         "fashion_mnist": "Fashion-MNIST"}
FULL = {"c10": "cifar10", "fm": "fashion_mnist"}
KINDS = ("rotate", "noise", "blur", "contrast")
SEVERITIES = (1, 3, 5)
EPS = (2, 8, 16)  # /255, pixel units
# Fixed order and colours for the configurations of batch 1; others follow alphabetically.
ORDER = ["sgd", "sgd_r2", "sgd2", "dsbp_tuned", "dsbp_tuned_r2", "dsbp", "sam", "sam_eqtime"]
BASE_COLOURS = {"sgd": "black", "sgd_r2": "dimgray", "sgd2": "dimgray", "dsbp_tuned": "tab:blue",
                "dsbp_tuned_r2": "tab:cyan", "dsbp": "tab:red", "sam": "tab:green",
                "sam_eqtime": "tab:olive"}
EXTRA_COLOURS = ["tab:purple", "tab:orange", "tab:pink", "tab:brown", "tab:gray",
                 "gold", "navy", "teal", "crimson"]
MARKERS = "osD^v<>pPX*h"
MIN_SEEDS = 3  # the issue asks for >= 3 seeds


@dataclass
class Run:
    ds: str  # short data-set folder name (c10, fm)
    config: str  # configuration folder name
    name: str  # run folder name
    seed: int
    method: str
    epochs: int
    test_acc: float
    wall_s: float
    evals: list[dict]  # one eval record per epoch, in order
    robust: dict = field(default_factory=dict)

    @property
    def val_final(self) -> float | None:
        return self.evals[-1].get("val_acc") if self.evals else None

    @property
    def best_val(self) -> tuple[float, int] | None:
        pts = [(e["val_acc"], e["epoch"]) for e in self.evals if "val_acc" in e]
        return max(pts, key=lambda p: (p[0], -p[1])) if pts else None


# ------------------------------------------------------------------------------------ loading
def load(res: Path) -> tuple[dict[str, dict[str, list[Run]]], list[str]]:
    """{data set: {config: [runs sorted by seed]}} and notes on skipped runs/rows."""
    notes: list[str] = []
    data: dict[str, dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for rdir in sorted((res / "runs").glob("*/*/runs/*")):
        ds, config = rdir.parts[-4], rdir.parts[-3]
        if not (rdir / "result.json").exists():
            notes.append(f"{ds}/{config}/{rdir.name}: no result.json (unfinished), left out")
            continue
        res_j = json.loads((rdir / "result.json").read_text())
        cfg = json.loads((rdir / "config.json").read_text())
        if res_j.get("status", "ok") != "ok":
            notes.append(f"{ds}/{config}/{rdir.name}: status {res_j.get('status')!r} "
                         f"({res_j.get('message', '')}), left out")
            continue
        evals: dict[int, dict] = {}
        for line in (rdir / "metrics.jsonl").read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                if rec.get("kind") == "eval":
                    evals[int(rec["epoch"])] = rec  # last record of an epoch wins (resume)
        data[ds][config].append(Run(
            ds=ds, config=config, name=rdir.name, seed=int(cfg["seed"]), method=cfg["method"],
            epochs=int(res_j.get("epochs_done", cfg["epochs"])), test_acc=res_j["test_acc"],
            wall_s=res_j["wall_s"], evals=[evals[k] for k in sorted(evals)]))
    # robustness rows: keyed by (data set, configuration label, run folder name); a later file
    # (sorted by name) overrides an earlier one for the same run
    rows: dict[tuple[str, str, str], dict] = {}
    for f in sorted((res / "robustness").glob("*.json")):
        for r in json.loads(f.read_text()):
            rows[(r["dataset"], r.get("label", r["method"]), r["run"])] = r
    used = set()
    for ds, configs in data.items():
        for config, runs in configs.items():
            runs.sort(key=lambda r: r.seed)
            for run in runs:
                key = (FULL.get(ds, ds), config, run.name)
                if key in rows:
                    run.robust = rows[key]
                    used.add(key)
    for key in sorted(set(rows) - used):
        notes.append(f"robustness row {key} matches no finished run, left out")
    return {d: dict(c) for d, c in data.items()}, notes


# ------------------------------------------------------------------------------------ helpers
def ms(v: list[float]) -> tuple[float, float]:
    return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else float("nan"))


def fmt(v: list[float], scale: float = 1.0, nd: int = 1) -> str:
    v = [x for x in v if x is not None]
    if not v:
        return "n/a"
    m, s = ms([scale * x for x in v])
    return f"{m:.{nd}f}" if len(v) == 1 else f"{m:.{nd}f} ± {s:.{nd}f}"


def order(configs) -> list[str]:
    known = [c for c in ORDER if c in configs]
    return known + sorted(c for c in configs if c not in ORDER)


def colours(all_configs) -> dict[str, str]:
    out, extra = {}, iter(EXTRA_COLOURS * 3)
    for c in order(all_configs):
        out[c] = BASE_COLOURS.get(c) or next(extra)
    return out


def shift3(r: dict) -> float | None:
    v = [r[f"{k}3"] for k in KINDS if f"{k}3" in r]
    return statistics.mean(v) if len(v) == len(KINDS) else None


def robust_vals(runs: list[Run], key) -> list[float]:
    out = []
    for run in runs:
        if run.robust:
            v = key(run.robust) if callable(key) else run.robust.get(key)
            if v is not None:
                out.append(v)
    return out


def has_weight_norm(runs: list[Run]) -> bool:
    return any("weight_norm" in r.robust for r in runs)


def repeat_of(config: str, configs) -> str | None:
    """``sgd_r2`` / ``sgd2`` -> ``sgd`` when that configuration exists: a repeat of the same
    configuration on the same seeds (GPU run-to-run spread), not a new candidate."""
    m = re.fullmatch(r"(.+?)(?:_r)?(\d+)", config)
    return m.group(1) if m and m.group(1) in configs and m.group(1) != config else None


def repeats_table(data) -> list[str]:
    lines = []
    for ds in order_ds(data):
        cf = data[ds]
        for c in order(cf):
            base = repeat_of(c, cf)
            if base is None:
                continue
            a = {r.seed: r for r in cf[base]}
            b = {r.seed: r for r in cf[c]}
            seeds = sorted(set(a) & set(b))
            if not seeds:
                continue
            dt = [100 * (b[k].test_acc - a[k].test_acc) for k in seeds]
            dh = [f"{b[k].robust['hessian_top'] / a[k].robust['hessian_top']:.2f}" for k in seeds
                  if "hessian_top" in a[k].robust and "hessian_top" in b[k].robust]
            lines.append(f"| {NAMES.get(ds, ds)} | {c} vs {base} | {','.join(map(str, seeds))} | "
                         f"{', '.join(f'{d:+.2f}' for d in dt)} | "
                         f"{statistics.mean(abs(d) for d in dt):.2f} | {', '.join(dh) or 'n/a'} |")
    if not lines:
        return []
    return ["| data set | repeat vs original | seeds | test acc difference per seed (points) | "
            "mean abs difference | hessian_top ratio per seed |", "|---|---|---|---|---|---|",
            *lines]


def select(data) -> tuple[str | None, dict[str, float], dict[str, list[int]]]:
    """Selection rule: the DSBP configuration with the best final-epoch validation accuracy,
    mean over seeds, then mean over data sets. Eligible: present on every data set with at
    least MIN_SEEDS finished seeds on each (the others are listed, not chosen)."""
    score: dict[str, float] = {}
    nseeds: dict[str, list[int]] = {}
    dss = order_ds(data)
    for c in sorted({c for d in dss for c in data[d]}):
        if not c.startswith("dsbp") or any(repeat_of(c, data[d]) for d in dss):
            continue
        vals, ns = [], []
        for d in dss:
            v = [r.val_final for r in data[d].get(c, []) if r.val_final is not None]
            ns.append(len(v))
            if v:
                vals.append(statistics.mean(v))
        nseeds[c] = ns
        if len(vals) == len(dss):
            score[c] = statistics.mean(vals)
    eligible = [c for c in score if min(nseeds[c]) >= MIN_SEEDS]
    best = max(eligible, key=lambda c: score[c]) if eligible else None
    return best, score, nseeds


def reference(configs: dict[str, list[Run]], method: str, epochs: int | None) -> str | None:
    """The configuration named like the method (sgd, sam), else the first one of that method
    with the given number of epochs."""
    for c in order(configs):
        runs = configs[c]
        if runs and all(r.method == method for r in runs) and (
                epochs is None or runs[0].epochs == epochs):
            return c
    return None


# ------------------------------------------------------------------------------------ tables
def table(ds: str, configs: dict[str, list[Run]]) -> list[str]:
    ref = reference(configs, "sgd", None)
    ref_wall = statistics.mean(r.wall_s for r in configs[ref]) if ref else None
    wn = any(has_weight_norm(rs) for rs in configs.values())
    head = ["config", "method", "epochs", "n", "test acc %", "val acc % (final)",
            "best val % (epochs)", "wall s (x sgd)*", "n robust", "hessian_top"]
    if wn:
        head += ["weight_norm", "hessian_top x weight_norm^2"]
    head += ["clean % (2000)", "shift sev 3 %", "FGSM 2/255 %", "PGD 2/255 %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = sorted(configs, key=lambda c: -statistics.mean(
        [r.val_final for r in configs[c] if r.val_final is not None] or [0.0]))
    for c in rows:
        runs = configs[c]
        wall = [r.wall_s for r in runs]
        best = [r.best_val for r in runs if r.best_val is not None]
        ratio = f" ({statistics.mean(wall) / ref_wall:.2f}x)" if ref_wall else ""
        methods = sorted({r.method for r in runs})
        epochs = sorted({r.epochs for r in runs})
        cells = [c, ",".join(methods), ",".join(map(str, epochs)), str(len(runs)),
                 fmt([r.test_acc for r in runs], 100, 2),
                 fmt([r.val_final for r in runs], 100, 2),
                 f"{fmt([b[0] for b in best], 100, 2)} ({','.join(str(b[1]) for b in best)})",
                 f"{statistics.mean(wall):.0f}{ratio}",
                 str(sum(1 for r in runs if r.robust)),
                 fmt(robust_vals(runs, "hessian_top"), 1, 0)]
        if wn:
            cells += [fmt(robust_vals(runs, "weight_norm"), 1, 2),
                      fmt(robust_vals(runs, lambda r: r["hessian_top"] * r["weight_norm"] ** 2
                                      if "weight_norm" in r else None), 1, 0)]
        cells += [fmt(robust_vals(runs, "clean"), 100, 1),
                  fmt(robust_vals(runs, shift3), 100, 1),
                  fmt(robust_vals(runs, "fgsm2/255"), 100, 1),
                  fmt(robust_vals(runs, "pgd2/255"), 100, 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def robust_table(configs: dict[str, list[Run]]) -> list[str]:
    keys = ["clean"] + [f"{k}{s}" for k in KINDS for s in SEVERITIES] + [
        f"{a}{e}/255" for e in EPS for a in ("fgsm", "pgd")]
    lines = ["| config (n) | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for c in order(configs):
        runs = [r for r in configs[c] if r.robust]
        if runs:
            lines.append(f"| {c} ({len(runs)}) | " + " | ".join(
                fmt(robust_vals(runs, k), 100, 1) for k in keys) + " |")
    return lines


def gap(a: list[float], b: list[float], scale: float = 100) -> str:
    ma, sa = ms([scale * x for x in a])
    mb, sb = ms([scale * x for x in b])
    return f"{ma - mb:+.2f} (std {sa:.2f} / {sb:.2f})"


def targets(data, chosen: str | None) -> list[str]:
    """Mechanical comparisons for targets (a), (b), (c); the verdict text is in report.md."""
    lines = ["| data set | comparison | candidate | reference | difference |",
             "|---|---|---|---|---|"]
    cands = [c for c in ["dsbp_tuned", chosen] if c]
    cands = list(dict.fromkeys(cands))
    for ds in order_ds(data):
        cf = data[ds]
        sgds = [c for c in order(cf) if cf[c] and all(r.method == "sgd" for r in cf[c])]
        if not sgds:
            continue
        sgd = sgds[0]
        ep = cf[sgd][0].epochs
        sam_eq = reference(cf, "sam", ep)
        sam_half = reference(cf, "sam", ep // 2)
        for c in cands:
            if c not in cf:
                continue
            t = [r.test_acc for r in cf[c]]
            for g in sgds:
                s = [r.test_acc for r in cf[g]]
                lines.append(f"| {NAMES.get(ds, ds)} | (a) test acc vs SGD, equal epochs | {c} "
                             f"{fmt(t, 100, 2)} (n={len(t)}) | {g} {fmt(s, 100, 2)} (n={len(s)}) | "
                             f"{gap(t, s)} |")
            if sam_half:
                s = [r.test_acc for r in cf[sam_half]]
                lines.append(f"| {NAMES.get(ds, ds)} | (b) test acc vs SAM at SGD's wall-clock "
                             f"({cf[sam_half][0].epochs} epochs) | {c} {fmt(t, 100, 2)} | "
                             f"{sam_half} {fmt(s, 100, 2)} (n={len(s)}) | {gap(t, s)} |")
            if sam_eq:
                s = [r.test_acc for r in cf[sam_eq]]
                lines.append(f"| {NAMES.get(ds, ds)} | (ref.) test acc vs SAM, equal epochs | "
                             f"{c} {fmt(t, 100, 2)} | {sam_eq} {fmt(s, 100, 2)} (n={len(s)}) | "
                             f"{gap(t, s)} |")
            h, hs = robust_vals(cf[c], "hessian_top"), robust_vals(cf[sgd], "hessian_top")
            if h and hs:
                lines.append(f"| {NAMES.get(ds, ds)} | (c) end hessian_top vs SGD | {c} "
                             f"{fmt(h, 1, 0)} (n={len(h)}) | {sgd} {fmt(hs, 1, 0)} (n={len(hs)}) "
                             f"| {statistics.mean(h) / statistics.mean(hs):.2f}x SGD's mean "
                             f"(per-run range {min(h):.0f}-{max(h):.0f} vs {min(hs):.0f}-"
                             f"{max(hs):.0f}) |")
    return lines


def order_ds(data) -> list[str]:
    known = ("c10", "fm")
    return [d for d in known if d in data] + sorted(d for d in data if d not in known)


# ------------------------------------------------------------------------------------ plots
def curve_stats(runs: list[Run], key: str) -> tuple[list[int], list[float], list[float], list[int]]:
    by_ep: dict[int, list[float]] = defaultdict(list)
    for r in runs:
        for e in r.evals:
            if key in e:
                by_ep[int(e["epoch"])].append(100 * e[key])
    eps = sorted(by_ep)
    m = [statistics.mean(by_ep[e]) for e in eps]
    s = [statistics.stdev(by_ep[e]) if len(by_ep[e]) > 1 else 0.0 for e in eps]
    return eps, m, s, [len(by_ep[e]) for e in eps]


def plot_curves(data, col, img: Path) -> None:
    dss = order_ds(data)
    fig, axes = plt.subplots(2, len(dss), figsize=(6.5 * len(dss), 8.5), squeeze=False,
                             constrained_layout=True)
    for j, ds in enumerate(dss):
        for i, key in enumerate(("val_acc", "test_acc")):
            ax = axes[i][j]
            for c in order(data[ds]):
                runs = data[ds][c]
                eps, m, s, n = curve_stats(runs, key)
                if not eps:
                    continue
                ax.plot(eps, m, marker=".", color=col[c], lw=1.5,
                        label=f"{c} (n={max(n)})")
                ax.fill_between(eps, [a - b for a, b in zip(m, s, strict=True)],
                                [a + b for a, b in zip(m, s, strict=True)],
                                color=col[c], alpha=0.15, lw=0)
            split = "validation (5000 held-out training images)" if key == "val_acc" \
                else "test split"
            ax.set(xlabel="epoch", ylabel=f"{split.split(' ')[0]} accuracy %",
                   title=f"{NAMES.get(ds, ds)}: {split}")
            ax.set_ylim(0, 100)
            ax.axhline(10, color="gray", lw=0.6, ls=":")  # chance level (10 classes)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("Issue 7, ResNet-18 on H100: accuracy per epoch, mean over seeds, shaded ± 1 std "
                 "(dotted: chance, 10 %)", fontsize=10)
    fig.savefig(img / "dsbp_claims_gpu_curves.png", dpi=100)
    plt.close(fig)


def plot_final(data, col, img: Path) -> None:
    dss = order_ds(data)
    width = max(6.5, 1.15 * max(len(data[d]) for d in dss))
    fig, axes = plt.subplots(1, len(dss), figsize=(width * len(dss), 4.8), squeeze=False,
                             constrained_layout=True)
    for j, ds in enumerate(dss):
        ax = axes[0][j]
        cs = order(data[ds])
        sgd = reference(data[ds], "sgd", None)
        if sgd:
            ax.axhline(100 * statistics.mean(r.test_acc for r in data[ds][sgd]), color="k",
                       lw=0.8, ls=":", label=f"{sgd} mean (test)")
        for x, c in enumerate(cs):
            runs = data[ds][c]
            t = [100 * r.test_acc for r in runs]
            v = [100 * r.val_final for r in runs if r.val_final is not None]
            m, s = ms(t)
            ax.errorbar(x - 0.12, m, yerr=0 if math.isnan(s) else s, fmt="o", color=col[c],
                        capsize=4, ms=7)
            ax.scatter([x - 0.12] * len(t), t, s=10, color="k", zorder=3)
            if v:
                mv, sv = ms(v)
                ax.errorbar(x + 0.12, mv, yerr=0 if math.isnan(sv) else sv, fmt="s",
                            mfc="white", color=col[c], capsize=4, ms=6)
        ax.set_xticks(range(len(cs)))
        ax.set_xticklabels([f"{c}\n(n={len(data[ds][c])}, {data[ds][c][0].epochs} ep)" for c in cs],
                           fontsize=8)
        ax.set(ylabel="accuracy % (final epoch)", title=f"{NAMES.get(ds, ds)}: final accuracy")
        ax.errorbar([], [], fmt="o", color="gray", label="test, mean ± std (dots: seeds)")
        ax.errorbar([], [], fmt="s", mfc="white", color="gray", label="validation, mean ± std")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    fig.suptitle("Issue 7, ResNet-18 on H100: final accuracy over seeds", fontsize=10)
    fig.savefig(img / "dsbp_claims_gpu_final.png", dpi=100)
    plt.close(fig)


def plot_hessian(data, col, img: Path) -> None:
    dss = order_ds(data)
    wn = any(has_weight_norm(rs) for d in dss for rs in data[d].values())
    rows = 2 if wn else 1
    fig, axes = plt.subplots(rows, len(dss), figsize=(8.0 * len(dss), 4.8 * rows), squeeze=False,
                             constrained_layout=True)
    mk = {c: MARKERS[i % len(MARKERS)] for i, c in enumerate(order(col))}
    for j, ds in enumerate(dss):
        for i in range(rows):
            ax = axes[i][j]
            for c in order(data[ds]):
                pts = [(100 * r.test_acc, r.robust["hessian_top"] * (
                    r.robust["weight_norm"] ** 2 if i else 1.0))
                       for r in data[ds][c] if "hessian_top" in r.robust
                       and (i == 0 or "weight_norm" in r.robust)]
                if pts:
                    ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=col[c],
                               marker=mk[c], s=45, label=f"{c} (n={len(pts)})")
            ax.set_yscale("log")
            ax.set(xlabel="test accuracy % (final)",
                   ylabel="top Hessian eigenvalue" + (" x weight_norm^2" if i else ""),
                   title=f"{NAMES.get(ds, ds)}: end-of-training sharpness per run"
                   + (" (scale-adjusted)" if i else ""))
            ax.grid(alpha=0.3, which="both")
            # outside the axes: inside, it hid points of one configuration or another
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.suptitle("Top eigenvalue of the training-loss Hessian (2 batches of 512, Lanczos, final "
                 "checkpoint). BatchNorm makes conv weights scale-invariant: lambda ~ 1/||w||^2",
                 fontsize=9)
    fig.savefig(img / "dsbp_claims_gpu_hessian.png", dpi=100)
    plt.close(fig)


def plot_robustness(data, col, img: Path) -> None:
    dss = order_ds(data)
    panels = list(KINDS) + ["fgsm", "pgd"]
    fig, axes = plt.subplots(len(dss), len(panels), figsize=(3.3 * len(panels), 3.6 * len(dss)),
                             squeeze=False, constrained_layout=True)
    for i, ds in enumerate(dss):
        for j, p in enumerate(panels):
            ax = axes[i][j]
            xs = [0, *SEVERITIES] if p in KINDS else [0, *EPS]
            keys = ["clean"] + ([f"{p}{s}" for s in SEVERITIES] if p in KINDS
                                else [f"{p}{e}/255" for e in EPS])
            for c in order(data[ds]):
                runs = [r for r in data[ds][c] if r.robust]
                if not runs:
                    continue
                m = [100 * statistics.mean(robust_vals(runs, k)) for k in keys]
                ax.plot(xs, m, marker="o", ms=4, color=col[c], label=f"{c} (n={len(runs)})")
            ax.set_xticks(xs)
            ax.set(xlabel="severity (0 = clean)" if p in KINDS else "eps x 255 (0 = clean)",
                   title=f"{NAMES.get(ds, ds)}: {p if p in KINDS else p.upper()}", ylim=(0, 100))
            if j == 0:
                ax.set_ylabel("accuracy % (2000 test images)")
            ax.grid(alpha=0.3)
        axes[i][-1].legend(fontsize=7, loc="upper right")
    fig.suptitle("Issue 7, ResNet-18 on H100: accuracy under shifted streams and L-inf "
                 "FGSM / PGD-5 (pixel units), mean over seeds", fontsize=10)
    fig.savefig(img / "dsbp_claims_gpu_robustness.png", dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--res", default=str(ROOT / "results" / "dsbp_claims_gpu"))
    ap.add_argument("--img", default=str(ROOT / "docs" / "img"))
    args = ap.parse_args()
    res, img = Path(args.res), Path(args.img)
    img.mkdir(parents=True, exist_ok=True)
    data, notes = load(res)
    if not data:
        print(f"no finished runs under {res}/runs", file=sys.stderr)
        return 1
    col = colours({c for d in data.values() for c in d})
    chosen, score, nseeds = select(data)

    shown = res.relative_to(ROOT) if res.is_relative_to(ROOT) else res
    out = ["# Issue 7 on the GPU: tables", "",
           f"Generated by `scripts/dsbp_claims_gpu_report.py` from `{shown}`"
           " (run directories and robustness JSONs); do not edit by hand. Accuracies in %, "
           "mean ± sample std over the n seeds that exist (no ± when n = 1).", "",
           "Columns: *test acc* from `result.json` (full test split, final epoch); *val acc* the "
           "final-epoch accuracy on the 5000 held-out training images; *best val* the best epoch's "
           "validation accuracy (and which epoch, per seed), shown, not used to choose; "
           "*hessian_top* the top eigenvalue of the training-loss Hessian at the final "
           "checkpoint (2 training batches of 512, Lanczos, eval mode); *clean / shift / FGSM / "
           "PGD* on 2000 class-balanced test images (shift sev 3 = mean over rotate, noise, blur, "
           "contrast at severity 3; PGD-5, L-inf, pixel units). *n robust*: runs with a "
           "robustness row.", "",
           "\\* **wall s** is `result.json`'s `wall_s` (training time, evaluation and "
           "checkpoints excluded), mean over seeds, with the ratio to SGD's mean. The runs ran "
           "six at a time on one H100 (one process per (data set, seed), configurations in "
           "sequence), so each includes contention that differed between configurations: a "
           "rough comparison only, not a cost measurement (the clean per-step ratio is in "
           "BENCHMARKS.md, section 1).", ""]
    for ds in order_ds(data):
        out += [f"## {NAMES.get(ds, ds)}", "", "Sorted by final validation accuracy.", ""]
        out += table(ds, data[ds]) + [""]
        wn = any(has_weight_norm(rs) for rs in data[ds].values())
        if wn:
            out += ["*weight_norm*: as written by `scripts/dsbp_claims_robustness.py` (at the time "
                    "of writing: the L2 norm of all Conv2d weights; in this ResNet-18 every conv "
                    "is followed by BatchNorm, only `fc` is not). *hessian_top x weight_norm^2* "
                    "removes a common scale of the conv weights; it does not correct per-channel "
                    "scale differences or the `fc` layer, so read it as a rough scale-adjusted "
                    "sharpness.", ""]
    out += ["## Selection on the validation split", "",
            "Rule: among the DSBP configurations present on every data set with at least "
            f"{MIN_SEEDS} finished seeds on each, the highest final-epoch validation accuracy "
            "(mean over seeds, then mean over data sets). Test accuracy plays no part. Repeats "
            "of a configuration on the same seeds (`<config>_r2`) are not candidates; they are "
            "compared with the original below.", "",
            "| DSBP config | n per data set (" + ", ".join(order_ds(data)) + ") | "
            "mean final val acc % over data sets | eligible |", "|---|---|---|---|"]
    for c in sorted(nseeds, key=lambda c: -score.get(c, -1.0)):
        sc = f"{100 * score[c]:.2f}" if c in score else "n/a (missing on a data set)"
        ok = "selected" if c == chosen else ("yes" if c in score and min(nseeds[c]) >= MIN_SEEDS
                                             else "no")
        out.append(f"| {c} | {', '.join(map(str, nseeds[c]))} | {sc} | {ok} |")
    rep = repeats_table(data)
    if rep:
        out += ["", "## Repeats (same configuration, same seeds, run again)", "",
                "How far a rerun of the same seed moves the result (GPU run-to-run "
                "nondeterminism): a yardstick for differences between configurations.",
                ""] + rep
    out += ["", "## Target comparisons (test split; difference = candidate - reference)", "",
            "(a)'s cost half and the verdicts are in `report.md`; (b) compares with SAM given "
            "half the epochs, i.e. about SGD's wall-clock (two gradient evaluations per step).", ""]
    out += targets(data, chosen) + [""]
    for ds in order_ds(data):
        out += [f"## Robustness, all columns: {NAMES.get(ds, ds)}", ""]
        out += robust_table(data[ds]) + [""]
    if notes:
        out += ["## Left out", ""] + [f"- {n}" for n in notes] + [""]
    out += ["## Plots", ""] + [f"![{p}](../../docs/img/dsbp_claims_gpu_{p}.png)"
                               for p in ("curves", "final", "hessian", "robustness")] + [""]
    (res / "tables.md").write_text("\n".join(out))

    plot_curves(data, col, img)
    plot_final(data, col, img)
    plot_hessian(data, col, img)
    plot_robustness(data, col, img)
    print(f"wrote {res / 'tables.md'} and "
          f"{img}/dsbp_claims_gpu_{{curves,final,hessian,robustness}}.png")
    for n in notes:
        print("note:", n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
