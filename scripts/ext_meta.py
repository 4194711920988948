"""Spectral meta-learning vs MAML: N-way K-shot episodes from disjoint class splits.

For each data set and shot count, MAML (:class:`dsbp.baselines.maml.MAML`) and spectral MAML
(:class:`dsbp.extensions.meta.SpectralMAML`) are meta-trained from the same initialisation on
the same training episodes (meta-train classes), then scored on the same test episodes
(disjoint meta-test classes): mean query accuracy and its 95% confidence interval
(1.96 * std / sqrt(n_episodes)). Both use first-order meta-gradients (FOMAML), Adam in the
outer loop, and BatchNorm with per-task batch statistics (the usual MAML practice). Results go
to ``<out>/results_<dataset>.json`` (one file per data set, so data sets can run in parallel
processes) and a markdown table in ``<out>/table.md`` (``--report-only`` rebuilds it).

CPU-sized defaults (a conv-4 with 32 channels, a few hundred meta-iterations), e.g.::

    python scripts/ext_meta.py --datasets fashion_mnist cifar10 tiny_imagenet --seed 0

Class splits: Fashion-MNIST and CIFAR-10 have 10 classes, so 5-way episodes leave exactly one
5/5 split (``dsbp.data.episodes.class_split(10, (0.5, 0.5), seed)``): every test episode uses the
same 5 unseen classes in a random order. Tiny ImageNet (the 200-class subset in
``../shared/data``): 140 meta-train / 60 meta-test classes; its 64x64 images are average-pooled
to 32x32 for CPU time [ours]. Meta-train episodes come from the train split, meta-test episodes
from the test split (Tiny ImageNet: train + test images of the meta-test classes, 40 each).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dsbp.baselines.maml import MAML
from dsbp.data import load_dataset
from dsbp.data.episodes import EpisodeSampler, class_split
from dsbp.extensions.meta import SpectralMAML


def conv4(in_channels: int, n_way: int, width: int, image_size: int) -> nn.Module:
    """The MAML paper's conv-4: 4 x [conv3x3 -> BN -> ReLU -> maxpool 2], then a Linear head."""
    layers: list[nn.Module] = []
    c, s = in_channels, image_size
    for _ in range(4):
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                   nn.MaxPool2d(2)]
        c, s = width, s // 2
    layers += [nn.Flatten(), nn.Linear(width * s * s, n_way)]
    return nn.Sequential(*layers)


def prepare(name: str, seed: int):
    """(x_meta_train, y, train classes, x_meta_test, y, test classes, mean, std, channels, size)."""
    ds = load_dataset(name)
    x_tr, y_tr, x_te, y_te = ds.x_train, ds.y_train, ds.x_test, ds.y_test
    n_cls = len(ds.classes)
    if name == "tiny_imagenet":
        # 64x64 -> 32x32 by 2x2 average pooling, kept uint8 [ours: CPU budget]
        def pool(x):
            return F.avg_pool2d(x.float(), 2).round().to(torch.uint8)
        x_tr, x_te = pool(x_tr), pool(x_te)
        train_cls, test_cls = class_split(n_cls, (0.7, 0.3), seed=seed)
        # meta-test classes use all their images (30 train + 10 test each); disjoint classes
        x_te, y_te = torch.cat([x_tr, x_te]), torch.cat([y_tr, y_te])
    else:
        train_cls, test_cls = class_split(n_cls, (0.5, 0.5), seed=seed)
    return (x_tr, y_tr, train_cls, x_te, y_te, test_cls, torch.tensor(ds.mean),
            torch.tensor(ds.std), int(x_tr.shape[1]), int(x_tr.shape[-1]))


def to_task(ep, mean, std):
    def norm(x):
        return (x.float() / 255.0 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    return norm(ep.support_x), ep.support_y, norm(ep.query_x), ep.query_y


def run_method(method: str, args, data, n_way: int, k_shot: int) -> dict:
    x_tr, y_tr, train_cls, x_te, y_te, test_cls, mean, std, ch, size = data
    torch.manual_seed(args.seed)  # same initialisation for both methods
    model = conv4(ch, n_way, args.width, size)
    common = {"inner_lr": args.inner_lr, "inner_steps": args.inner_steps}
    if method == "maml":
        learner = MAML(model, first_order=True, **common)
    else:
        learner = SpectralMAML(model, rank=args.rank, side=args.side, first_order=True,
                               seed=args.seed, **common)
    train_eps = EpisodeSampler(x_tr, y_tr, train_cls, n_way, k_shot, args.n_query,
                               seed=args.seed)
    test_eps = EpisodeSampler(x_te, y_te, test_cls, n_way, k_shot, args.n_query,
                              seed=10_000 + args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.outer_lr)
    model.train()  # BatchNorm uses per-task batch statistics, in training and at test
    t0 = time.perf_counter()
    for it in range(args.meta_iters):
        tasks = [to_task(e, mean, std) for e in
                 train_eps.episodes(args.meta_batch, start=it * args.meta_batch)]
        opt.zero_grad()
        learner.meta_loss(tasks).backward()
        opt.step()
    train_s = time.perf_counter() - t0
    learner.inner_steps = args.test_inner_steps
    t0 = time.perf_counter()
    accs = []
    for ep in test_eps.episodes(args.test_episodes):
        _, acc = learner.evaluate([to_task(ep, mean, std)])
        accs.append(acc)
    test_s = time.perf_counter() - t0
    a = torch.tensor(accs, dtype=torch.float64)
    ci = 1.96 * a.std(unbiased=True).item() / math.sqrt(len(accs))
    return {"mean": a.mean().item(), "ci95": ci, "n_episodes": len(accs),
            "train_s": train_s, "test_s": test_s}


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=["fashion_mnist", "cifar10", "tiny_imagenet"])
    p.add_argument("--shots", nargs="+", type=int, default=[1, 5])
    p.add_argument("--n-way", type=int, default=5)
    p.add_argument("--n-query", type=int, default=10, help="query images per class")
    p.add_argument("--width", type=int, default=32, help="conv-4 channels")
    p.add_argument("--meta-iters", type=int, default=100)
    p.add_argument("--meta-batch", type=int, default=4, help="tasks per meta-iteration")
    p.add_argument("--inner-steps", type=int, default=3)
    p.add_argument("--test-inner-steps", type=int, default=5)
    p.add_argument("--inner-lr", type=float, default=0.1)
    p.add_argument("--outer-lr", type=float, default=1e-3)
    p.add_argument("--test-episodes", type=int, default=200)
    p.add_argument("--rank", type=int, default=10, help="k of spectral MAML")
    p.add_argument("--side", default="output", choices=["output", "input"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="results/extensions/meta")
    p.add_argument("--report-only", action="store_true", help="only rebuild table.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        render(out)
        return
    for name in args.datasets:
        path = out / f"results_{name}.json"
        rows = json.loads(path.read_text())["rows"] if path.exists() else []
        data = prepare(name, args.seed)
        for k_shot in args.shots:
            for method in ("maml", "spectral_maml"):
                r = run_method(method, args, data, args.n_way, k_shot)
                r.update(dataset=name, method=method, n_way=args.n_way, k_shot=k_shot,
                         seed=args.seed)
                print(json.dumps(r), flush=True)
                key = (name, method, args.n_way, k_shot, args.seed)
                rows = [x for x in rows if (x["dataset"], x["method"], x["n_way"], x["k_shot"],
                                            x["seed"]) != key]
                rows.append(r)
                meta = {"args": vars(args), "commit": git_commit(), "torch": torch.__version__,
                        "device": f"CPU (2 cores), torch threads {args.threads}, "
                                  f"{platform.machine()}"}
                path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        render(out)


def render(out: Path) -> None:
    """The markdown table of every ``results_*.json`` in ``out``, written to README.md."""
    lines = ["| data set | N-way K-shot | MAML acc. % (95% CI) | spectral MAML acc. % (95% CI) "
             "| test episodes | train s (MAML / spectral) |", "|---|---|---|---|---|---|"]
    metas = []
    for path in sorted(out.glob("results_*.json")):
        blob = json.loads(path.read_text())
        metas.append(blob["meta"])
        by = {(r["k_shot"], r["method"]): r for r in blob["rows"]}
        for k in sorted({k for k, _ in by}):
            m, s = by.get((k, "maml")), by.get((k, "spectral_maml"))
            if m is None or s is None:
                continue
            lines.append(
                f"| {m['dataset']} | {m['n_way']}-way {k}-shot "
                f"| {100 * m['mean']:.1f} ± {100 * m['ci95']:.1f} "
                f"| {100 * s['mean']:.1f} ± {100 * s['ci95']:.1f} | {m['n_episodes']} "
                f"| {m['train_s']:.0f} / {s['train_s']:.0f} |")
    runs = "\n".join(
        f"- `{md['args']['datasets']}`: commit {md['commit']}, seed {md['args']['seed']}, "
        f"{md['device']}, torch {md['torch']}; settings `{json.dumps(md['args'])}`"
        for md in metas)
    (out / "table.md").write_text("\n".join(lines) + "\n\n" + runs + "\n")


if __name__ == "__main__":
    main()
