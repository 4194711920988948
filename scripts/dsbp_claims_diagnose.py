"""Issue 7, part 1: where does DSBP's accuracy go? Per-step diagnostics of a DSBP run against
an SGD run with the same seed, data order and learning rate.

Recorded per step and per projected layer (``side="output"``, the paper's shapes):

- ``energy``: ``||E E^T G|| / ||G||``, the fraction of the raw gradient's norm the projection
  keeps (``dsbp.core.subspace.energy_kept``) with the basis that step uses;
- ``radial``: for a conv followed by BatchNorm the loss is invariant to scaling each output
  channel, so SGD's gradient rows are orthogonal to the weight rows; the fraction
  ``sum_i <g_i, w_i>^2 / ||w_i||^2 / ||g||^2`` of the *projected* gradient that points along
  the rows is a step that BatchNorm undoes (wasted) [ours];
- ``drift``: ``sqrt(1 - ||E_old^T E_new||^2 / k)`` between consecutive refreshes;
- the global parameter step norm ``||theta_{t+1} - theta_t||`` of DSBP and of SGD.

CPU subset: shows the trend, not the final figure. Writes
``results/dsbp_claims_cpu/diagnose/*.json`` and the plots ``docs/img/dsbp_claims_*.png``.

Usage::

    python scripts/dsbp_claims_diagnose.py cnn_fm       # SmallCNN, Fashion-MNIST subset
    python scripts/dsbp_claims_diagnose.py resnet_c10   # ResNet-18 (width 0.125), CIFAR-10 subset
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dsbp import DSBP
from dsbp.core.projection import project
from dsbp.core.subspace import drift, energy_kept
from dsbp.data import load_dataset
from dsbp.data.loader import DeviceLoader
from dsbp.data.subset import balanced_subset
from dsbp.layers.adapters import as_matrix
from dsbp.models.registry import build_model

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    # name: (dataset, model, model kwargs, train subset, epochs, DSBP interval p)
    "cnn_fm": ("fashion_mnist", "cnn", {}, 4000, 3, 20),
    "resnet_c10": ("cifar10", "resnet18", {"width": 0.125}, 2000, 2, 10),
}


def _bn_followed(model: nn.Module) -> set[str]:
    """Names of Conv2d layers whose output goes straight into a BatchNorm2d (module order)."""
    mods = list(model.named_modules())
    out = set()
    for (n, m), (_, m2) in zip(mods, mods[1:], strict=False):
        if isinstance(m, nn.Conv2d) and isinstance(m2, nn.BatchNorm2d):
            out.add(n)
    # ResNet blocks register conv1, bn1, conv2, bn2, shortcut(conv, bn) in order.
    return out


def _radial(G: torch.Tensor, W: torch.Tensor) -> float:
    """Fraction of ||G||^2 along the weight rows: sum_i <g_i, w_i>^2 / ||w_i||^2 / ||G||^2."""
    g, w = G.double(), W.double()
    num = ((g * w).sum(1) ** 2 / w.pow(2).sum(1).clamp_min(1e-30)).sum()
    return float(num / g.pow(2).sum().clamp_min(1e-30))


def run(name: str, method: str, lr: float, seed: int = 0) -> dict:
    ds_name, model_name, mkw, subset, epochs, interval = SETTINGS[name]
    ds = load_dataset(ds_name)
    x, y = balanced_subset(ds.x_train, ds.y_train, subset, seed=seed)
    xt, yt = balanced_subset(ds.x_test, ds.y_test, 2000, seed=0)
    common = {"device": "cpu", "mean": ds.mean, "std": ds.std}
    train = DeviceLoader(x, y, 128, shuffle=True, augment=False, seed=seed, **common)
    test = DeviceLoader(xt, yt, 500, shuffle=False, augment=False, seed=0, **common)
    torch.manual_seed(seed)
    model = build_model(model_name, in_channels=x.shape[1], num_classes=10,
                        image_size=x.shape[-1], **mkw)
    sgd_kw = {"lr": lr, "momentum": 0.9, "weight_decay": 5e-4}
    if method == "dsbp":
        opt = DSBP(model, torch.optim.SGD, rank=10, interval=interval, sharpness=0.1,
                   projector_kwargs={"seed": seed}, **sgd_kw)
        proj = opt.projector
        names = proj.layer_names()
    else:
        opt = torch.optim.SGD(model.parameters(), **sgd_kw)
        proj = None
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    total = epochs * len(train)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1 + torch.cos(torch.tensor(torch.pi * t / total)).item()))
    mods = {n: model.get_submodule(n) for n in names}
    bn = _bn_followed(model)
    rec = {"name": name, "method": method, "lr": lr, "seed": seed, "layers": names,
           "bn_layers": sorted(bn & set(names)),
           "widths": {n: int(as_matrix(mods[n].weight).shape[0]) for n in names},
           "step_norm": [], "grad_norm": [], "energy": {n: [] for n in names},
           "radial_raw": {n: [] for n in names}, "radial_proj": {n: [] for n in names},
           "drift": {n: [] for n in names}, "k_active": {n: [] for n in names}}
    prev_basis: dict[str, torch.Tensor] = {}
    t0 = time.time()
    step = 0
    for epoch in range(epochs):
        model.train()
        for xb, yb in train.iter_epoch(epoch):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            raw = {n: mods[n].weight.grad.detach().clone() for n in names}
            before = [p.detach().clone() for p in model.parameters()]
            opt.step()
            sched.step()
            with torch.no_grad():
                rec["step_norm"].append(float(torch.sqrt(sum(
                    (p - b).pow(2).sum() for p, b in zip(model.parameters(), before,
                                                         strict=True)))))
                rec["grad_norm"].append(float(torch.sqrt(sum(g.pow(2).sum()
                                                             for g in raw.values()))))
                for n in names:
                    G, W = as_matrix(raw[n]), as_matrix(mods[n].weight.detach())
                    rec["radial_raw"][n].append(_radial(G, W))
                    if proj is None:
                        continue
                    E = proj.basis(n)
                    st = proj.layer_state(n)
                    rec["energy"][n].append(float(energy_kept(G, E, "output")))
                    rec["radial_proj"][n].append(_radial(project(G, E, "output"), W))
                    rec["k_active"][n].append(int(E.shape[1]))
                    if st.last_refresh == step:
                        if n in prev_basis and prev_basis[n].shape == E.shape:
                            rec["drift"][n].append([step, float(drift(prev_basis[n], E))])
                        prev_basis[n] = E.detach().clone()
            step += 1
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in test.iter_epoch(0))
    rec["test_acc"] = correct / len(yt)
    rec["seconds"] = time.time() - t0
    print(f"{name} {method} lr={lr}: test_acc={rec['test_acc']:.4f} ({rec['seconds']:.0f}s)",
          flush=True)
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("setting", choices=sorted(SETTINGS))
    ap.add_argument("--lr", type=float, default=0.05)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = ROOT / "results" / "dsbp_claims_cpu" / "diagnose"
    out.mkdir(parents=True, exist_ok=True)
    for method in ("dsbp", "sgd"):
        rec = run(args.setting, method, args.lr)
        (out / f"{args.setting}_{method}.json").write_text(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
