"""Issue 7, part 4: robustness of trained models (the paper's open question on flat minima).

For every finished run directory of a ``dsbp bench`` output (the issue-7 final stage), rebuild
the model from ``config.json`` + ``checkpoint.pt`` and measure test accuracy

- on the shifted streams of ``dsbp.data.shifts.apply_shift`` (rotate, noise, blur, contrast at
  severities 1, 3, 5), and
- the end-of-training top Hessian eigenvalue (the harness's ``hessian`` tracker estimator), and
- under L-infinity adversarial perturbations in pixel units ([0, 1] images, before the
  data set's normalisation): FGSM (one signed-gradient step of size eps) and PGD (``PGD_STEPS``
  steps of size ``2.5 eps / PGD_STEPS``, random start, projection onto the eps-ball and [0, 1]).

The model is in eval mode (BatchNorm running statistics). The same ``N_TEST`` class-balanced
test images (seed 0) are used for every model. CPU subset: shows the trend, not the final
figure.

Usage::

    python scripts/dsbp_claims_robustness.py results/dsbp_claims_cpu/final_fm \
        results/dsbp_claims_cpu/final_c10
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from dsbp.data import load_dataset
from dsbp.data.shifts import KINDS, apply_shift
from dsbp.data.subset import balanced_subset
from dsbp.diagnostics.hessian import hessian_top_eigenvalues
from dsbp.experiments.build import build_model_for, load_data
from dsbp.experiments.config import RunConfig
from dsbp.experiments.run import load_checkpoint
from dsbp.experiments.track import HESSIAN_BATCHES

N_TEST = 500
SEVERITIES = (1, 3, 5)
EPSILONS = (2 / 255, 8 / 255, 16 / 255)
PGD_STEPS = 5


class Normalised(torch.nn.Module):
    """``model((x - mean) / std)`` for pixel-unit inputs x in [0, 1], (N, C, H, W)."""

    def __init__(self, model: torch.nn.Module, mean, std) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


@torch.no_grad()
def accuracy(net: torch.nn.Module, x01: torch.Tensor, y: torch.Tensor, bs: int = 500) -> float:
    """Fraction of ``x01`` (N, C, H, W) in [0, 1] classified as ``y``."""
    return sum(int((net(x01[i:i + bs]).argmax(1) == y[i:i + bs]).sum())
               for i in range(0, len(y), bs)) / len(y)


def _grad_sign(net, x, y) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(net(x), y), x)
    return g.sign()


def fgsm(net, x01, y, eps: float) -> torch.Tensor:
    """x + eps sign(grad_x loss), clamped to [0, 1]."""
    return (x01 + eps * _grad_sign(net, x01, y)).clamp(0, 1)


def pgd(net, x01, y, eps: float, steps: int = PGD_STEPS, seed: int = 0) -> torch.Tensor:
    """L-inf PGD with a uniform random start in the eps-ball (Madry et al.)."""
    g = torch.Generator().manual_seed(seed)
    alpha = 2.5 * eps / steps
    noise = torch.rand(x01.shape, generator=g).to(x01.device)
    x = (x01 + (noise * 2 - 1) * eps).clamp(0, 1)
    for _ in range(steps):
        x = x + alpha * _grad_sign(net, x, y)
        x = torch.min(torch.max(x, x01 - eps), x01 + eps).clamp(0, 1)
    return x.detach()


def evaluate_run(run_dir: Path, cache: dict, device: torch.device | None = None,
                 n_test: int = N_TEST) -> dict:
    device = device or torch.device("cpu")
    cfg = RunConfig.from_json((run_dir / "config.json").read_text())
    if cfg.dataset not in cache:
        ds = load_dataset(cfg.dataset, root=cfg.data_root)
        x, y = balanced_subset(ds.x_test, ds.y_test, n_test, seed=0)
        cache[cfg.dataset] = (ds, x, y)
    ds, x_u8, y = cache[cfg.dataset]
    x_u8, y = x_u8.to(device), y.to(device)
    data = load_data(cfg, device, dataset=ds)
    model = build_model_for(cfg, data)
    ckpt = load_checkpoint(run_dir / "checkpoint.pt", "cpu")  # tensors only: weights_only
    model.load_state_dict(ckpt["model"])
    model = model.to(device)
    net = Normalised(model, ds.mean, ds.std).to(device).eval()
    out = {"method": cfg.method, "seed": cfg.seed, "dataset": cfg.dataset,
           "run": run_dir.name, "clean": accuracy(net, x_u8.float() / 255, y)}
    # Norm of all conv weights: with BatchNorm after them the loss is invariant to their scale,
    # so Hessian eigenvalues scale like 1 / ||w||^2 and are comparable only beside it.
    out["weight_norm"] = float(sum(float((m.weight.detach().float() ** 2).sum())
                                   for m in model.modules()
                                   if isinstance(m, torch.nn.Conv2d)) ** 0.5)
    # End-of-training sharpness: the harness's `hessian` tracker estimator (top eigenvalue of
    # the training-loss Hessian on the first HESSIAN_BATCHES batches of epoch 0, Lanczos,
    # fixed start vector), computed once from the final checkpoint.
    batches = list(itertools.islice(data.train.iter_epoch(0), HESSIAN_BATCHES))
    eig = hessian_top_eigenvalues(model, F.cross_entropy, batches, k=1,
                                  generator=torch.Generator().manual_seed(0))
    out["hessian_top"] = float(eig.eigenvalues[0])
    for kind in KINDS:
        for s in SEVERITIES:
            out[f"{kind}{s}"] = accuracy(net, apply_shift(x_u8, kind, s).float() / 255, y)
    x01 = x_u8.float() / 255
    for eps in EPSILONS:
        tag = f"{round(eps * 255)}/255"
        out[f"fgsm{tag}"] = accuracy(net, fgsm(net, x01, y, eps), y)
        out[f"pgd{tag}"] = accuracy(net, pgd(net, x01, y, eps), y)
    return out


def summarise(rows: list[dict], label_of) -> str:
    """Markdown table: one row per method label, mean ± std over seeds (accuracies in
    percent; ``hessian_top`` as is)."""
    keys = [k for k in rows[0] if k not in ("method", "seed", "dataset", "run", "label")]
    groups = defaultdict(list)
    for r in rows:
        groups[label_of(r)].append(r)
    lines = ["| method (seeds) | " + " | ".join(keys) + " |",
             "|---|" + "---|" * len(keys)]
    for label, rs in groups.items():
        cells = []
        for k in keys:
            v = [(1 if k in ("hessian_top", "weight_norm") else 100) * r[k] for r in rs]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            cells.append(f"{statistics.mean(v):.1f} ± {sd:.1f}")
        lines.append(f"| {label} ({len(rs)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stages", nargs="+", help="folders holding dsbp bench outputs (one per method)")
    ap.add_argument("--out", default="results/dsbp_claims_cpu/robustness")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--n-test", type=int, default=N_TEST, help="class-balanced test images")
    ap.add_argument("--title", default="CPU subset: shows the trend, not the final figure",
                    help="parenthesised note in the heading of the markdown table")
    ap.add_argument("--only", help="comma-separated configuration names (default: all)")
    ap.add_argument("--tag", default="", help="suffix of the output files (parallel workers)")
    ap.add_argument("--match", help="only run directories whose name contains this "
                    "(e.g. --match=-s2)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache: dict = {}
    for stage in map(Path, args.stages):
        rows = []
        for run_dir in sorted(stage.glob("*/runs/*")):
            if not (run_dir / "result.json").exists():
                continue
            if args.only and run_dir.parent.parent.name not in args.only.split(","):
                continue
            if args.match and args.match not in run_dir.name:
                continue
            r = evaluate_run(run_dir, cache, device, args.n_test)
            r["label"] = run_dir.parent.parent.name  # the configuration name of the sweep
            print(json.dumps(r), flush=True)
            rows.append(r)
        if not rows:
            continue
        stem = f"{stage.name}_{args.tag}" if args.tag else stage.name
        (out / f"{stem}.json").write_text(json.dumps(rows, indent=1))
        (out / f"{stem}.md").write_text(
            f"# Robustness, {stage.name} ({args.title})\n\n"
            f"Test accuracy (%) on {args.n_test} class-balanced test images; shifts at severities "
            f"{SEVERITIES}; FGSM / PGD-{PGD_STEPS} L-inf in pixel units.\n\n"
            + summarise(rows, lambda r: r["label"]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
