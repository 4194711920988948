"""What the recommended DSBP configuration costs against SGD, refreshes included.

Question: does the configuration README recommends (rank 10, p = 20, residual 0.5, sharpness
0.1) cost what SGD costs on every CPU benchmark model? Each arm trains its own copy of the model
(same initialisation, same real batches) in *blocks of p consecutive steps*, so every DSBP block
holds exactly one refresh, as training does; the arms' blocks are interleaved in a rotating order
and the ratios are taken block by block against the SGD block of the same round.

Arms: ``sgd`` (momentum 0.9); ``recommended`` (DSBP around the same SGD, the settings above;
the warm-up of the recommendation only delays projection, so it is left out: this is the
steady-state cost); ``no_refresh`` (the same, never refreshing after the first step: isolates
the refresh); ``paper`` (k = 10, p = 100, residual 0; one refresh per 5 blocks);
``paper_lowrank`` (the same with ``backward="lowrank"``: Linear weights get the projected
gradient from the backward pass, so the full weight-gradient product is skipped off refresh
steps).

Models: ``mlp`` (784-512-512-512-10, batch 128), the scaling benchmark's MLPs (``mlp_w256``,
``mlp_w1024``: 784 -> width x 2 -> 10), ``smallcnn`` (bundled Fashion-MNIST), ``resnet18``
(width 0.25, CIFAR-10); all on real data.

``python benchmarks/recommended_cost.py`` (CPU, a few minutes);
``--models mlp smallcnn --blocks 15``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import env_info, image_batches, summary, timed, write_json  # noqa: E402

from dsbp import DSBP  # noqa: E402
from dsbp.models.registry import build_model  # noqa: E402

P = 20
NEVER = 10**9
RECOMMENDED = dict(rank=10, interval=P, residual=0.5, sharpness=0.1)
ARMS = ("sgd", "recommended", "no_refresh", "paper", "paper_lowrank")


def mlp(widths: list[int]) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


MODELS = {  # name -> (builder, dataset, batch)
    "mlp": (lambda: mlp([784, 512, 512, 512, 10]), "bundled", 128),
    "mlp_w256": (lambda: mlp([784, 256, 256, 10]), "bundled", 128),
    "mlp_w1024": (lambda: mlp([784, 1024, 1024, 10]), "bundled", 128),
    "smallcnn": (lambda: build_model("cnn", 1, 10, 28), "bundled", 128),
    "resnet18": (lambda: build_model("resnet18", 3, 10, 32, width=0.25), "cifar10", 128),
}


def make(arm: str, model: nn.Module, path: str) -> torch.optim.Optimizer:
    kw = dict(lr=0.01, momentum=0.9)
    if arm == "sgd":
        return torch.optim.SGD(model.parameters(), **kw)
    if arm.startswith("paper"):
        return DSBP(model, torch.optim.SGD, rank=10, interval=100, sharpness=0.1, path=path,
                    backward="lowrank" if arm == "paper_lowrank" else "full", **kw)
    settings = dict(RECOMMENDED, interval=NEVER) if arm == "no_refresh" else RECOMMENDED
    return DSBP(model, torch.optim.SGD, path=path, **settings, **kw)


def measure(name: str, blocks: int, path: str, device: torch.device) -> dict:
    build, dataset, batch = MODELS[name]
    torch.manual_seed(0)
    m0 = build().to(device)
    batches = image_batches(dataset, batch, 8, device)
    arms = {}
    for a in ARMS:
        m = copy.deepcopy(m0)
        arms[a] = (m, make(a, m, path))
    it = {a: 0 for a in ARMS}

    def block(arm: str) -> float:
        m, opt = arms[arm]

        def steps() -> None:
            for _ in range(P):
                x, y = batches[it[arm] % len(batches)]
                F.cross_entropy(m(x), y).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                it[arm] += 1

        return timed(steps, device) / P

    times: dict[str, list[float]] = {a: [] for a in ARMS}
    for r in range(1 + blocks):  # round 0 is warm-up (and the first refresh)
        order = ARMS[r % len(ARMS):] + ARMS[: r % len(ARMS)]
        for a in order:
            t = block(a)
            if r:
                times[a].append(t)
    out: dict = {"batch": batch, "dataset": dataset, "step_s": {a: summary(times[a])
                                                                 for a in ARMS}}
    for a in ARMS[1:]:
        out[f"{a}_ratio"] = summary([t / s for t, s in zip(times[a], times["sgd"], strict=True)])
    out["refresh_amortised_fraction"] = summary(
        [(r - n) / s for r, n, s in zip(times["recommended"], times["no_refresh"], times["sgd"],
                                        strict=True)])
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    ap.add_argument("--blocks", type=int, default=12, help=f"timed blocks of {P} steps per arm")
    ap.add_argument("--path", default="auto", help="DSBP's projection path")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    ap.add_argument("--out", default=None, help="results JSON name under benchmarks/results/")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cmd = "python benchmarks/recommended_cost.py " + " ".join(argv or sys.argv[1:])
    res: dict = {"command": cmd,
                 "args": vars(args), "env": env_info(device), "p": P, "seed": 0,
                 "recommended": RECOMMENDED, "models": {}}
    for name in args.models:
        r = res["models"][name] = measure(name, args.blocks, args.path, device)
        print(f"{name}: sgd {1e3 * r['step_s']['sgd']['median']:.2f} ms/step; recommended "
              f"{r['recommended_ratio']['median']:.3f}x (IQR {r['recommended_ratio']['q1']:.3f}-"
              f"{r['recommended_ratio']['q3']:.3f}), refresh amortised "
              f"{100 * r['refresh_amortised_fraction']['median']:.2f}%, no-refresh "
              f"{r['no_refresh_ratio']['median']:.3f}x, paper {r['paper_ratio']['median']:.3f}x, "
              f"paper low-rank backward {r['paper_lowrank_ratio']['median']:.3f}x")
    res["max_recommended_ratio"] = max(r["recommended_ratio"]["median"]
                                       for r in res["models"].values())
    path = write_json(args.out or f"recommended_cost_{device.type}.json", res)
    print(f"-> {path}")
    return res


if __name__ == "__main__":
    main()
