"""Issue 7 probe: is DSBP's early eval-mode collapse (GPU, ResNet-18, Fashion-MNIST) BatchNorm?

CPU-sized rerun of the first few hundred steps of the GPU setting (ResNet-18 at reduced width,
Fashion-MNIST, batch 512, lr 0.2 with the GPU run's cosine schedule and 5 % warm-up, crop+flip,
SGD momentum 0.9, wd 5e-4; fp32 instead of bf16). Three methods from the same seed, the same
initial weights and the same batches:

- ``sgd``: plain SGD;
- ``dsbp``: ``dsbp.DSBP(..., rank=10, interval=P, sharpness=0.1)`` (the paper's setting);
- ``dsbp_b0``: the same with ``sharpness=0`` (no ``beta * lambda1/trC * e1 e1^T W`` term).

Every ``--every`` steps, on a fixed validation set held out from the training split (the
harness's ``val_split``, disjoint from the training images), it records:

- ``eval``: accuracy in eval mode (BatchNorm running statistics), what the harness reports;
- ``train_bn``: accuracy in train mode without grad (batch statistics of the 500-image
  validation batches); the running statistics are saved before and restored after;
- ``recal``: accuracy in eval mode after BatchNorm recalibration: running statistics reset,
  ``momentum=None`` (cumulative average), ``--recal-batches`` forward passes over training
  batches in train mode without grad, then eval. Done on saved/restored buffers, so training
  is untouched;
- ``batch``: mean training-batch accuracy over the steps since the last record (train mode,
  augmented batches, before each update);
- per BatchNorm layer, on the validation data: the mismatch between the batch statistics and
  the running ones, ``|mean_b - mean_r| / sqrt(var_r)`` and ``|log(var_b / var_r)|``
  averaged over channels;
- per conv/linear weight: ``||W_t - W_{t-every}|| / ||W_t||`` (relative step) and ``||W_t||``.

DSBP's capture hooks run only in train mode with grad enabled, so the no-grad passes above
feed nothing to the projector.

    .venv/bin/python scripts/dsbp_claims_bn_probe.py --seed 0 --steps 300 --width 0.25 \
        --out results/dsbp_claims_bn_probe
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import time
from pathlib import Path

import torch
from torch import nn

import dsbp
from dsbp.experiments.build import LRFactor, load_data
from dsbp.experiments.config import RunConfig
from dsbp.models.registry import build_model

METHODS = ("sgd", "dsbp", "dsbp_b0")
SUMMARY_FROM = 60  # first record after the 54-step LR warm-up


def bn_layers(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def save_bn(model: nn.Module) -> list[tuple]:
    return [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(),
             m.momentum) for _, m in bn_layers(model)]


def restore_bn(model: nn.Module, saved: list[tuple]) -> None:
    for (_, m), (rm, rv, nb, mom) in zip(bn_layers(model), saved, strict=True):
        m.running_mean.copy_(rm)
        m.running_var.copy_(rv)
        m.num_batches_tracked.copy_(nb)
        m.momentum = mom


@torch.no_grad()
def accuracy(model: nn.Module, loader, train_mode: bool) -> float:
    model.train(train_mode)
    correct = total = 0
    for x, y in loader.iter_epoch(0):
        correct += int((model(x).argmax(1) == y).sum())
        total += int(y.numel())
    model.train(True)
    return correct / total


@torch.no_grad()
def bn_mismatch(model: nn.Module, loader) -> dict[str, dict[str, float]]:
    """Per BN layer: channel-mean |mu_b - mu_r|/sqrt(var_r) and |log(var_b/var_r)| (val data)."""
    stats: dict[str, list] = {}
    hooks = []
    for name, m in bn_layers(model):
        def pre(mod, inp, name=name):
            x = inp[0].float()
            mu = x.mean(dim=(0, 2, 3))
            var = x.var(dim=(0, 2, 3), unbiased=False)
            rv = mod.running_var.clamp_min(1e-12)
            dm = ((mu - mod.running_mean).abs() / rv.sqrt()).mean().item()
            dv = (var.clamp_min(1e-12) / rv).log().abs().mean().item()
            stats.setdefault(name, []).append((dm, dv))
        hooks.append(m.register_forward_pre_hook(pre))
    model.eval()  # eval mode: running stats unchanged; the hook sees the layer's inputs
    for x, _ in loader.iter_epoch(0):
        model(x)
    model.train()
    for h in hooks:
        h.remove()
    return {n: {"dmean": sum(a for a, _ in v) / len(v), "dlogvar": sum(b for _, b in v) / len(v)}
            for n, v in stats.items()}


@torch.no_grad()
def recalibrated_accuracy(model: nn.Module, train_loader, val_loader, n_batches: int,
                          epoch: int) -> float:
    saved = save_bn(model)
    for _, m in bn_layers(model):
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the recalibration batches
    model.train()
    for i, (x, _) in enumerate(train_loader.iter_epoch(epoch)):
        if i >= n_batches:
            break
        model(x)
    acc = accuracy(model, val_loader, train_mode=False)
    restore_bn(model, saved)
    return acc


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d | nn.Linear)}


def run_method(method: str, args, data, init_state: dict) -> dict:
    torch.manual_seed(args.seed)
    model = build_model("resnet18", data.in_channels, data.num_classes, data.image_size,
                        width=args.width)
    model.load_state_dict(init_state)
    common = {"lr": args.lr, "momentum": 0.9, "weight_decay": 5e-4}
    if method == "sgd":
        opt = torch.optim.SGD(model.parameters(), **common)
    else:
        beta = 0.1 if method == "dsbp" else 0.0
        opt = dsbp.DSBP(model, torch.optim.SGD, rank=10, interval=args.interval,
                        sharpness=beta, **common)
    # The GPU run's schedule (cosine to 0 over its 10 epochs x 108 steps, 5 % linear warm-up);
    # this probe runs only its first --steps steps.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, LRFactor(args.nominal_steps, int(0.05 * args.nominal_steps), "cosine"))
    loss_fn = nn.CrossEntropyLoss()
    steps_per_epoch = len(data.train)
    records = []
    prev_w = weights(model)
    win_correct = win_total = 0
    win_loss = 0.0
    step = 0
    t0 = time.time()

    def record() -> None:
        nonlocal prev_w, win_correct, win_total, win_loss
        w = weights(model)
        rel = {n: ((w[n] - prev_w[n]).norm() / w[n].norm().clamp_min(1e-12)).item() for n in w}
        wn = {n: w[n].norm().item() for n in w}
        prev_w = w
        saved = save_bn(model)
        rec = {
            "step": step,
            "lr": opt.param_groups[0]["lr"],
            "eval": accuracy(model, data.val, train_mode=False),
            "train_bn": accuracy(model, data.val, train_mode=True),
        }
        restore_bn(model, saved)
        rec["recal"] = recalibrated_accuracy(model, data.train, data.val, args.recal_batches,
                                             epoch=10_000 + step)
        rec["batch"] = win_correct / win_total if win_total else None
        rec["batch_loss"] = win_loss / win_total if win_total else None
        rec["bn_mismatch"] = bn_mismatch(model, data.val)
        rec["rel_step"] = rel
        rec["weight_norm"] = wn
        rec["wall_s"] = time.time() - t0
        records.append(rec)
        win_correct = win_total = 0
        win_loss = 0.0
        mm = rec["bn_mismatch"]
        worst = max(v["dlogvar"] for v in mm.values())
        print(f"[{method}] step {step:4d} lr {rec['lr']:.3f} eval {rec['eval']:.3f} "
              f"train_bn {rec['train_bn']:.3f} recal {rec['recal']:.3f} batch "
              f"{rec['batch'] if rec['batch'] is None else round(rec['batch'], 3)} "
              f"max|dlogvar| {worst:.2f} ({rec['wall_s']:.0f}s)", flush=True)

    record()
    epoch = 0
    while step < args.steps:
        for x, y in data.train.iter_epoch(epoch):
            model.train()
            out = model(x)
            loss = loss_fn(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            win_correct += int((out.detach().argmax(1) == y).sum())
            win_total += int(y.numel())
            win_loss += float(loss.detach()) * int(y.numel())
            if not math.isfinite(float(loss.detach())):
                print(f"[{method}] non-finite loss at step {step}")
            if step % args.every == 0:
                record()
            if step >= args.steps:
                break
        epoch += 1
    return {"method": method, "steps_per_epoch": steps_per_epoch, "records": records,
            "wall_s": time.time() - t0}


def plot(out: Path) -> None:
    """Merge ``probe_seed*.json`` into ``probe.json`` and draw ``probe.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = sorted(out.glob("probe_seed*.json"))
    merged = {"seeds": {}}
    for f in files:
        r = json.loads(f.read_text())
        merged["seeds"][str(r["args"]["seed"])] = r
    # Summary over the records from step --summary-from on (after the LR warm-up): how far
    # eval mode falls below the recalibrated eval, and how often by more than 20 points.
    summary = {}
    for seed, r in sorted(merged["seeds"].items()):
        for m, run in r["runs"].items():
            recs = [q for q in run["records"] if q["step"] >= SUMMARY_FROM]
            gaps = [q["recal"] - q["eval"] for q in recs]
            summary.setdefault(m, {})[seed] = {
                "records": len(recs),
                "min_eval": min(q["eval"] for q in recs),
                "min_eval_step": min(recs, key=lambda q: q["eval"])["step"],
                "mean_eval": sum(q["eval"] for q in recs) / len(recs),
                "mean_recal": sum(q["recal"] for q in recs) / len(recs),
                "mean_train_bn": sum(q["train_bn"] for q in recs) / len(recs),
                "min_recal": min(q["recal"] for q in recs),
                "max_gap_recal_minus_eval": max(gaps),
                "n_gap_over_20pt": sum(g > 0.2 for g in gaps),
                "max_abs_recal_minus_train_bn": max(abs(q["recal"] - q["train_bn"]) for q in recs),
                "final": {k: recs[-1][k] for k in ("step", "eval", "train_bn", "recal", "batch")},
            }
    merged["summary"] = {"from_step": SUMMARY_FROM, "per_method_seed": summary}
    for m, per in summary.items():
        for seed, v in per.items():
            print(f"{m:8s} seed {seed}: n={v['records']} min eval {v['min_eval']:.3f} "
                  f"(step {v['min_eval_step']}) mean eval {v['mean_eval']:.3f} mean recal "
                  f"{v['mean_recal']:.3f} min recal {v['min_recal']:.3f} gaps>20pt "
                  f"{v['n_gap_over_20pt']} max|recal-train_bn| "
                  f"{v['max_abs_recal_minus_train_bn']:.3f} final {v['final']}")
    (out / "probe.json").write_text(json.dumps(merged, indent=1))
    methods = [m for m in METHODS if any(m in r["runs"] for r in merged["seeds"].values())]
    titles = {"sgd": "SGD", "dsbp": "DSBP (k=10, p={p}, beta=0.1)",
              "dsbp_b0": "DSBP (k=10, p={p}, beta=0 = no sharpness term)"}
    series = [("eval", "eval mode (running stats)", "C3"),
              ("train_bn", "train mode, no grad (batch stats)", "C0"),
              ("recal", "eval mode after BN recalibration", "C2"),
              ("batch", "training-batch accuracy", "0.4")]
    fig, axes = plt.subplots(2, len(methods), figsize=(5.2 * len(methods), 7.5), sharex=True,
                             squeeze=False, gridspec_kw={"height_ratios": [2, 1]})
    styles = ["-", "--", ":"]
    for j, m in enumerate(methods):
        ax, ax2 = axes[0, j], axes[1, j]
        for si, (seed, r) in enumerate(sorted(merged["seeds"].items())):
            if m not in r["runs"]:
                continue
            recs = r["runs"][m]["records"]
            steps = [q["step"] for q in recs]
            for key, label, color in series:
                pts = [(q["step"], 100 * q[key]) for q in recs if q[key] is not None]
                ax.plot(*zip(*pts, strict=True), styles[si % 3], color=color, marker="o", ms=3,
                        label=f"{label}, seed {seed}")
            mm = [sum(v["dlogvar"] for v in q["bn_mismatch"].values()) / len(q["bn_mismatch"])
                  for q in recs]
            mx = [max(v["dlogvar"] for v in q["bn_mismatch"].values()) for q in recs]
            ax2.plot(steps, mm, styles[si % 3], color="C4", marker="o", ms=3,
                     label=f"mean over BN layers, seed {seed}")
            ax2.plot(steps, mx, styles[si % 3], color="C1", marker="o", ms=3,
                     label=f"max over BN layers, seed {seed}")
            p = r["args"]["interval"]
            spe = r["runs"][m]["steps_per_epoch"]
        if m != "sgd":
            for t in range(p, max(steps) + 1, p):
                ax.axvline(t, color="k", lw=0.6, ls=":")
                ax2.axvline(t, color="k", lw=0.6, ls=":")
        for a in (ax, ax2):
            a.axvline(spe, color="0.7", lw=1.0)
        ax.set_title(titles[m].format(p=p))
        ax.set_ylabel("validation / batch accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax2.set_xlabel("optimizer step (grey line: epoch end; dotted: DSBP basis refresh)")
        ax2.set_ylabel("|log(batch var / running var)|\n(val data, channel mean)")
        ax2.set_yscale("log")
        ax2.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7, loc="lower right")
    axes[1, 0].legend(fontsize=7, loc="upper right")
    first = next(iter(merged["seeds"].values()))
    a = first["args"]
    fig.suptitle(f"BatchNorm probe, CPU: ResNet-18 width {a['width']}, Fashion-MNIST, batch "
                 f"{a['batch_size']}, lr {a['lr']}\n(first {a['steps']} of a {a['nominal_steps']}-"
                 f"step cosine schedule, 5 % warm-up), validation: {first['n_val']} held-out "
                 f"training images; seeds: "
                 f"{', '.join(sorted(merged['seeds']))}")
    fig.tight_layout()
    fig.savefig(out / "probe.png", dpi=110)
    print(f"wrote {out / 'probe.json'} and {out / 'probe.png'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--interval", type=int, default=100)
    ap.add_argument("--nominal-steps", type=int, default=1080,
                    help="length of the schedule the steps are taken from (GPU: 10 x 108)")
    ap.add_argument("--subset", type=int, default=None,
                    help="training images (class-balanced); default: all but the validation")
    ap.add_argument("--val", type=int, default=2000)
    ap.add_argument("--recal-batches", type=int, default=4)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/dsbp_claims_bn_probe")
    ap.add_argument("--plot", action="store_true",
                    help="only merge the probe_seed*.json in --out into probe.json and plot")
    args = ap.parse_args()
    if args.plot:
        plot(Path(args.out))
        return
    torch.set_num_threads(args.threads)

    cfg = RunConfig(dataset="fashion_mnist", model="resnet18", seed=args.seed,
                    batch_size=args.batch_size, lr=args.lr, subset=args.subset,
                    val_split=args.val, augment=True, device="cpu")
    data = load_data(cfg, torch.device("cpu"))
    torch.manual_seed(args.seed)
    init = build_model("resnet18", data.in_channels, data.num_classes, data.image_size,
                       width=args.width).state_dict()
    n_params = sum(v.numel() for k, v in init.items()
                   if "running" not in k and "num_batches" not in k)
    print(f"train {data.n_train} val {data.n_val} steps/epoch {len(data.train)} "
          f"params {n_params}", flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"probe_seed{args.seed}.json"
    result = {"args": vars(args), "commit": commit, "torch": torch.__version__,
              "n_train": data.n_train, "n_val": data.n_val, "n_params": n_params,
              "device": "cpu", "threads": args.threads, "runs": {}}
    for method in args.methods.split(","):
        result["runs"][method] = run_method(method, args, data,
                                            {k: v.clone() for k, v in init.items()})
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
