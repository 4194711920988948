"""Spectral transfer regularisation vs full fine-tuning and LoRA, on a class-split transfer task.

Source task: Fashion-MNIST classes 0-4 (T-shirt, Trouser, Pullover, Dress, Coat), all 30000
training images; a SmallCNN (``dsbp.models.cnn.SmallCNN``, width 32) is pretrained on it once
(seed 0) to weights ``W0``. Target task: classes 5-9 (Sandal, Shirt, Sneaker, Bag, Ankle boot),
relabelled 0-4, in a low-data regime: ``--per-class`` training images per class (a different
class-balanced draw per seed), ``--per-class`` more per class for validation, and the full
target test split (5000 images). Every method gets a freshly initialised classifier
(``head.3``), trained in full; the body layers ``features.0`` (conv), ``features.4`` (conv) and
``head.1`` (Linear) are adapted as follows:

- ``head_only``: body frozen (a linear probe on the pretrained features; reference).
- ``full``: every parameter trains.
- ``full+penalty``: every parameter trains, plus the spectral penalty
  ``mu * ||(I - E_src E_src^T)(W - W0)||_F^2`` on the three body layers.
- ``spectral_adapter``: ``W = W0 + E_src K``, only ``K`` (k x d_in per layer) trains.
- ``lora``: peft LoRA (``dsbp.baselines.lora.apply_lora``) on the same layers, its rank r chosen
  so that its trainable count matches the spectral adapter's (counts reported).

``E_src``: top-k output-side eigenvectors of each body layer's activation covariance on 1024
source training images at ``W0`` (:func:`dsbp.extensions.transfer.activation_bases`).
Each method's SGD learning rate is picked from ``--lrs`` by validation accuracy (per seed);
the test accuracy at that rate is reported, mean and std over seeds. Output:
``<out>/results.json`` and ``<out>/table.md``.

    python scripts/ext_transfer.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dsbp.baselines.lora import apply_lora, lora_param_count
from dsbp.data import load_dataset
from dsbp.data.subset import balanced_subset
from dsbp.extensions.transfer import (
    SpectralTransferPenalty,
    activation_bases,
    apply_spectral_adapter,
    spectral_adapter_param_count,
)
from dsbp.models.cnn import SmallCNN

BODY = ("features.0", "features.4", "head.1")
HEAD = "head.3"
SOURCE, TARGET = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)


def normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (x.float() / 255.0 - m) / s


def select(x, y, classes):
    keep = torch.isin(y, torch.tensor(classes))
    y_new = torch.searchsorted(torch.tensor(classes), y[keep])  # relabel to 0..len-1
    return x[keep], y_new


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int = 1000) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + bs]).argmax(1) == y[i:i + bs]).sum())
                  for i in range(0, len(x), bs))
    model.train()
    return correct / len(x)


def train(model, params, x, y, *, lr, epochs, bs, seed, penalty=None) -> None:
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    if penalty is not None:
        penalty.attach(opt)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), bs):
            idx = perm[i:i + bs]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


def pretrain(x, y, args) -> nn.Module:
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=len(SOURCE), width=32)
    train(model, model.parameters(), x, y, lr=0.05, epochs=args.pretrain_epochs, bs=128, seed=0)
    return model


def matched_lora_rank(base: nn.Module, k: int) -> tuple[int, int, int]:
    """(r, lora count, spectral count) with the LoRA rank whose count is closest to the
    spectral adapter's at rank k on the body layers."""
    target = spectral_adapter_param_count(base, k, "output", BODY)
    r = min(range(1, 4 * k + 1), key=lambda r: abs(lora_param_count(base, r, BODY) - target))
    return r, lora_param_count(base, r, BODY), target


def build(method: str, w0: nn.Module, bases, args, k: int, seed: int):
    """(model, trainable params, penalty or None) for one method, from the pretrained ``w0``."""
    model = copy.deepcopy(w0)
    torch.manual_seed(1000 + seed)  # the new classifier: same init for every method
    model.head[3] = nn.Linear(model.head[3].in_features, len(TARGET))
    penalty = None
    if method == "head_only":
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith(HEAD + "."))
    elif method == "full":
        pass
    elif method == "full+penalty":
        penalty = SpectralTransferPenalty(model, bases, mu=args.mu)
    elif method == "spectral_adapter":
        apply_spectral_adapter(model, bases, trainable=(HEAD,))
    elif method == "lora":
        r, _, _ = matched_lora_rank(w0, k)
        model, _ = apply_lora(model, r, list(BODY), modules_to_save=[HEAD])
    else:
        raise ValueError(method)
    return model, [p for p in model.parameters() if p.requires_grad], penalty


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--ranks", nargs="+", type=int, default=[7], help="spectral adapter k")
    p.add_argument("--per-class", type=int, default=50, help="target train (and val) per class")
    p.add_argument("--epochs", type=int, default=20, help="fine-tuning epochs")
    p.add_argument("--batch-size", type=int, default=25)
    p.add_argument("--lrs", nargs="+", type=float, default=[0.01, 0.03, 0.1])
    p.add_argument("--mu", type=float, default=1.0, help="penalty weight")
    p.add_argument("--pretrain-epochs", type=int, default=2)
    p.add_argument("--methods", nargs="+",
                   default=["head_only", "full", "full+penalty", "spectral_adapter", "lora"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="results/extensions/transfer")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    ds = load_dataset("fashion_mnist")
    xs, ys = select(ds.x_train, ds.y_train, SOURCE)
    xt_all, yt_all = select(ds.x_train, ds.y_train, TARGET)
    xt_test, yt_test = select(ds.x_test, ds.y_test, TARGET)
    nrm = {"mean": ds.mean, "std": ds.std}
    xs = normalise(xs, **nrm)
    t0 = time.perf_counter()
    w0 = pretrain(xs, ys, args)
    xs_test, ys_test = select(ds.x_test, ds.y_test, SOURCE)
    src_acc = accuracy(w0, normalise(xs_test, **nrm), ys_test)
    print(f"pretrained in {time.perf_counter() - t0:.0f}s, source test acc {src_acc:.4f}",
          flush=True)
    xt_test = normalise(xt_test, **nrm)
    src_batch = xs[torch.randperm(len(xs), generator=torch.Generator().manual_seed(0))[:1024]]

    rows = []
    for k in args.ranks:
        bases = activation_bases(w0, [src_batch], rank=k, side="output", layers=BODY)
        r, n_lora, n_spec = matched_lora_rank(w0, k)
        for seed in args.seeds:
            # 2 * per_class per class from the target train split: first half train, rest val
            x2, y2 = balanced_subset(xt_all, yt_all, 2 * args.per_class * len(TARGET), seed=seed)
            perm = torch.randperm(len(x2), generator=torch.Generator().manual_seed(seed))
            x2, y2 = normalise(x2[perm], **nrm), y2[perm]
            tr_idx = torch.cat([torch.nonzero(y2 == c).flatten()[:args.per_class]
                                for c in range(len(TARGET))])
            va_mask = torch.ones(len(y2), dtype=torch.bool)
            va_mask[tr_idx] = False
            xtr, ytr, xva, yva = x2[tr_idx], y2[tr_idx], x2[va_mask], y2[va_mask]
            for method in args.methods:
                best = None
                for lr in args.lrs:
                    model, params, pen = build(method, w0, bases, args, k, seed)
                    n_train = sum(q.numel() for q in params)
                    t1 = time.perf_counter()
                    train(model, params, xtr, ytr, lr=lr, epochs=args.epochs,
                          bs=args.batch_size, seed=seed, penalty=pen)
                    va = accuracy(model, xva, yva)
                    if best is None or va > best["val_acc"]:
                        best = {"lr": lr, "val_acc": va, "test_acc": accuracy(model, xt_test,
                                                                              yt_test),
                                "train_s": time.perf_counter() - t1}
                row = {"method": method, "k": k, "lora_rank": r if method == "lora" else None,
                       "seed": seed, "trainable": n_train, **best}
                print(json.dumps(row), flush=True)
                rows.append(row)
                meta = {"args": vars(args), "commit": git_commit(), "torch": torch.__version__,
                        "device": f"CPU (2 cores), torch threads {args.threads}, "
                                  f"{platform.machine()}",
                        "source_test_acc": src_acc, "counts": {"spectral_adapter_body": n_spec,
                                                               "lora_body": n_lora}}
                (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                             indent=1))
    render(out)


def render(out: Path) -> None:
    blob = json.loads((out / "results.json").read_text())
    rows = blob["rows"]
    lines = ["| k | method | trainable params | test acc. % (mean ± std over seeds) | seeds "
             "| chosen lr per seed |", "|---|---|---|---|---|---|"]
    for k in sorted({r["k"] for r in rows}):
        for method in dict.fromkeys(r["method"] for r in rows):
            rs = [r for r in rows if r["k"] == k and r["method"] == method]
            if not rs:
                continue
            a = torch.tensor([r["test_acc"] for r in rs], dtype=torch.float64) * 100
            sd = a.std(unbiased=True).item() if len(a) > 1 else float("nan")
            name = method + (f" (r={rs[0]['lora_rank']})" if rs[0]["lora_rank"] else "")
            lines.append(f"| {k} | {name} | {rs[0]['trainable']} | {a.mean():.2f} ± {sd:.2f} "
                         f"| {len(rs)} | {', '.join(str(r['lr']) for r in rs)} |")
    md = blob["meta"]
    lines += ["", f"Commit {md['commit']}, {md['device']}, torch {md['torch']}; source test "
              f"accuracy of the pretrained model {100 * md['source_test_acc']:.2f}%; "
              f"settings `{json.dumps(md['args'])}`"]
    (out / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
