"""Spectral architecture optimisation on Fashion-MNIST (CPU subset): factorise / prune, fine-tune.

Trains a SmallCNN, takes each layer's output spectrum on calibration batches, then for each
energy threshold tau_E builds (a) the factorised network (W ~ E_r E_r^T W, a layer only where
it saves FLOPs) and (b) the leverage-pruned network, fine-tunes each for ``--ft-epochs`` and
reports parameters, analytic FLOPs, measured CPU latency (median) and test accuracy. The
unchanged network fine-tuned for the same epochs is the baseline.

    .venv/bin/python scripts/ext_architecture.py --out results/extensions/architecture

Writes report.md, results.json and architecture.png to --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ext_common import accuracy, load_subset, loader, provenance, train_cnn  # noqa: E402

from dsbp.extensions.architecture import (  # noqa: E402
    choose_ranks,
    count_flops,
    count_params,
    factorize,
    fine_tune,
    measure_latency,
    output_spectra,
    prune,
)


def total_flops(model, shape) -> int:
    return sum(v["flops"] for v in count_flops(model, shape).values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="results/extensions/architecture")
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--ft-epochs", type=int, default=1)
    ap.add_argument("--ft-train", type=int, default=1500, help="fine-tuning subset size")
    ap.add_argument("--spectra", default="uncentred,centred",
                    help="uncentred (METHOD's A^T A) and/or centred [ours] output spectra")
    ap.add_argument("--ft-lr", type=float, default=0.01)
    ap.add_argument("--taus", default="0.8,0.9,0.95,0.99")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ds, x_tr, y_tr, x_te, y_te = load_subset(args.dataset, args.train, args.test, args.seed)
    shape = tuple(x_tr.shape[1:])
    base = train_cnn(ds, x_tr, y_tr, args.epochs, args.seed)
    test = loader(x_te, y_te, ds, 500)
    train = loader(x_tr[: args.ft_train], y_tr[: args.ft_train], ds, 128, shuffle=True,
                   seed=args.seed + 1)
    calib = [x for _, (x, _) in zip(range(8), train.iter_epoch(0), strict=False)]
    kinds = args.spectra.split(",")
    all_spectra = {k: output_spectra(base, calib, center=(k == "centred")) for k in kinds}
    x1 = next(iter(test.iter_epoch(0)))[0][:1]
    xb = next(iter(test.iter_epoch(0)))[0][:64]

    def measure(model, label, tau, variant, ranks, spectra_kind="-"):
        acc0 = accuracy(model, test)
        tuned = fine_tune(copy.deepcopy(model), lambda e: train.iter_epoch(100 + e),
                          args.ft_epochs, lr=args.ft_lr)
        row = {"variant": variant, "spectra": spectra_kind, "tau": tau,
               "params": count_params(model),
               "flops": total_flops(model, shape),
               "acc_before_ft": acc0, "acc_after_ft": accuracy(tuned, test), "ranks": ranks}
        print(label, {k: v for k, v in row.items() if k != "ranks"}, flush=True)
        built.append(model)
        return row

    built = []

    rows = [measure(base, "original", None, "original", {})]
    for kind, spectra in all_spectra.items():
        # The logits layer is never factorised (nor pruned): its rank is the classifier's.
        last = list(spectra)[-1]
        fac_spectra = {n: s for n, s in spectra.items() if n != last}
        for tau in [float(t) for t in args.taus.split(",")]:
            fac, info = factorize(base, fac_spectra, tau, shape)
            rows.append(measure(fac, f"factorise {kind} {tau}", tau, "factorise",
                                {n: (v["rank"] if v["factorised"] else f"{v['d_out']} (kept)")
                                 for n, v in info.items()}, kind))
            pr, pinfo = prune(base, spectra, tau, check_input=calib[0])
            rows.append(measure(pr, f"prune {kind} {tau}", tau, "prune",
                                {n: f"{v['rank']}/{v['d_out']}" for n, v in pinfo.items()},
                                kind))
    # Latency last, interleaved: round r times every model once, so load spikes from other jobs
    # on the shared machine hit all variants alike; the median over rounds is reported.
    torch.set_num_threads(1)  # one intra-op thread: spin-waiting threads stall under load
    for x, key, rounds in ((x1, "latency_b1_ms", 60), (xb, "latency_b64_ms", 20)):
        times = [[] for _ in built]
        for m in built:
            measure_latency(m, x, repeats=1, warmup=3)
        for _ in range(rounds):
            for i, m in enumerate(built):
                times[i].append(measure_latency(m, x, repeats=1, warmup=0))
        for r, t in zip(rows, times, strict=True):
            r[key] = 1e3 * statistics.median(t)
            r[key.replace("_ms", "_min_ms")] = 1e3 * min(t)
    meta = provenance(args.seed, t0)
    ranks_by_tau = {f"{k} {t}": choose_ranks(s, t) for k, s in all_spectra.items()
                    for t in (0.8, 0.9, 0.95, 0.99, 1.0)}
    (out / "results.json").write_text(json.dumps(
        {"meta": meta, "args": vars(args), "rows": rows,
         "spectra": {k: {n: s.eigenvalues.tolist() for n, s in sp.items()}
                     for k, sp in all_spectra.items()},
         "ranks_by_tau": {str(t): r for t, r in ranks_by_tau.items()}}, indent=1))

    lines = [
        "# Spectral architecture optimisation (METHOD.md §2.2)", "",
        f"Regenerate: `{meta['command']}` (commit {meta['commit']}, seed {args.seed}, "
        f"{meta['device']}; {meta['wall_seconds']} s).", "",
        f"SmallCNN (width 32) trained {args.epochs} epochs on a balanced {args.train}-image "
        f"{args.dataset} subset; accuracy on a balanced {args.test}-image test subset. Spectra: "
        "output covariance on 8 calibration batches of 128, uncentred (METHOD.md's A^T A) and "
        "mean-centred [ours]. The logits layer is left whole. Every "
        f"variant, the original included, is then fine-tuned {args.ft_epochs} epoch(s) on "
        f"{args.ft_train} training images (SGD, lr {args.ft_lr}). "
        "FLOPs: 2 x MACs of the Linear/Conv layers per image (analytic). Latency: median "
        "eval-mode forward time on this CPU with 1 thread, variants timed round-robin "
        "(batch 1: 60 rounds; "
        "batch 64: 20 rounds; the minimum is in results.json). The machine was shared with "
        "other jobs (load average ~14 on 2 cores), so latencies are noisy.", "",
        "| variant | spectra | tau_E | params | MFLOPs | latency b=1 (ms) | latency b=64 (ms) | "
        "acc before FT | acc after FT | per-layer rank |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['spectra']} | {r['tau'] if r['tau'] is not None else '-'} "
            f"| {r['params']:,} "
            f"| {r['flops'] / 1e6:.2f} | {r['latency_b1_ms']:.3f} | {r['latency_b64_ms']:.1f} "
            f"| {100 * r['acc_before_ft']:.1f} | {100 * r['acc_after_ft']:.1f} | "
            + ", ".join(f"{n}: {v}" for n, v in r["ranks"].items()) + " |")
    lines += ["", "Energy-threshold ranks per layer: " + "; ".join(
        f"{t}: " + ", ".join(f"{n} {r}" for n, r in rk.items())
        for t, rk in ranks_by_tau.items()), ""]
    (out / "report.md").write_text("\n".join(lines))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"uncentred": "-", "centred": "--"}
    for kind in kinds:
        for variant, marker in (("factorise", "o"), ("prune", "s")):
            rs = [r for r in rows if r["variant"] == variant and r["spectra"] == kind]
            lab = f"{variant} ({kind})"
            ax[0].plot([r["flops"] / 1e6 for r in rs], [100 * r["acc_after_ft"] for r in rs],
                       marker=marker, ls=styles.get(kind, "-"), label=lab)
            ax[1].plot([r["latency_b64_ms"] for r in rs], [100 * r["acc_after_ft"] for r in rs],
                       marker=marker, ls=styles.get(kind, "-"), label=lab)
            for r in rs:
                ax[0].annotate(str(r["tau"]), (r["flops"] / 1e6, 100 * r["acc_after_ft"]),
                               fontsize=7)
    o = rows[0]
    ax[0].plot([o["flops"] / 1e6], [100 * o["acc_after_ft"]], "k*", ms=12, label="original")
    ax[1].plot([o["latency_b64_ms"]], [100 * o["acc_after_ft"]], "k*", ms=12, label="original")
    ax[0].set(xlabel="MFLOPs per image", ylabel="test accuracy after fine-tune (%)",
              xscale="log")
    ax[1].set(xlabel="CPU latency, batch 64 (ms, median)", ylabel="test accuracy (%)")
    for a in ax:
        a.legend(fontsize=7)
    fig.suptitle(f"Spectral factorisation / pruning, {args.dataset} subset, labels = tau_E")
    fig.tight_layout()
    fig.savefig(out / "architecture.png", dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
