"""Low-rank backward (``dsbp.layers.lowrank``): step time against SGD, and accuracy, on the CPU.

Does the paper's O(k d) claim pay where the weight-gradient GEMM dominates? Two parts:

``speed`` -- an MLP ``784 -> d -> d -> 10`` (ReLU) on real Fashion-MNIST batches of n rows, one
full training step (forward, backward, SGD momentum 0.9 step, ``zero_grad``) per arm, arms
interleaved in a rotating order, ratios to the ``sgd`` arm of the same round. Arms:

* ``sgd``: plain layers;
* ``lowrank_k{k}``: the two hidden Linears (784 -> d, d -> d) get the low-rank backward at
  output-side rank k (d/32, d/16, d/8) and the same SGD; the classifier is ordinary;
* ``project_after_k{d/16}``: what a projector does today: the full gradient, then
  ``E (E^T G)`` (two thin products) before the SGD step (the pure projection, no residual);
* ``coords_k{d/16}``: ``coords=True``: no (d_out, d_in) gradient at all; momentum kept in the
  k-dim coordinates and the update applied as one ``W.addmm_(E, M, alpha=-lr)``.

Bases are fixed random orthonormal matrices here (the values do not change the time). The cost of
keeping them up to date is reported separately: ``refresh_ms`` is one block power iteration
(5 iterations, block k + 8, warm-started, QR) per hidden layer on the n output rows of the batch,
and ``refresh_at_p100`` its share of an SGD step when done every 100 steps.

``accuracy`` -- Fashion-MNIST (training subset, full test split), MLP 784-1024-1024-10, SGD
(lr 0.05, momentum 0.9, constant, the same for every arm: not tuned per arm), seeds 0-2. The
low-rank arms use the pure projection on both hidden layers at k = 32, 64, 128 (d/32 .. d/8).
Bases: computed in this script, not by ``SpectralProjector``: every ``p`` steps a forward hook
keeps the layer's output rows of that batch, and after the step the top-k eigenvectors of
``Y^T Y`` come from ``torch.linalg.eigh`` (exact). They are used from the next step on (the
basis must be known at forward time); the first step, with no basis yet, is ordinary.

``nice -n 10 python benchmarks/lowrank_backward.py speed`` then ``... accuracy``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, env_info, summary, write_json  # noqa: E402

from dsbp.layers.lowrank import LowRankBackward, low_rank_backward  # noqa: E402

LR, MOMENTUM = 0.05, 0.9


def mlp(d_in: int, d: int, depth: int = 2, classes: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(d_in if i == 0 else d, d), nn.ReLU()]
    layers.append(nn.Linear(d, classes))
    return nn.Sequential(*layers)


def hidden_linears(model: nn.Sequential) -> list[nn.Linear]:
    lin = [m for m in model if isinstance(m, nn.Linear)]
    return lin[:-1]


def fmnist_batches(n: int, count: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from dsbp.data import load_dataset

    ds = load_dataset("fashion_mnist")
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        idx = torch.randint(0, ds.x_train.shape[0], (n,), generator=g)
        x = (ds.x_train[idx].float() / 255.0 - ds.mean[0]) / ds.std[0]
        out.append((x.flatten(1), ds.y_train[idx]))
    return out


def orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=g)).Q.contiguous()


# ------------------------------------------------------------------------------------ speed
class Arm:
    """One timed configuration: a model copy and its step."""

    def __init__(self, name: str, model0: nn.Sequential, kind: str, k: int) -> None:
        self.name, self.kind = name, kind
        self.model = copy.deepcopy(model0)
        self.hidden = hidden_linears(self.model)
        self.bases = [orthonormal(m.out_features, k, i) for i, m in enumerate(self.hidden)]
        self.handles: list[LowRankBackward] = []
        if kind in ("lowrank", "coords"):
            for m, E in zip(self.hidden, self.bases, strict=True):
                self.handles.append(low_rank_backward(m, (lambda E=E: E), side="output",
                                                      coords=kind == "coords"))
        if kind == "coords":  # SGD on everything else; momentum of hidden weights in coords
            hid = {id(m.weight) for m in self.hidden}
            rest = [p for p in self.model.parameters() if id(p) not in hid]
            self.opt = torch.optim.SGD(rest, lr=LR, momentum=MOMENTUM)
            self.mom = [torch.zeros(E.shape[1], m.in_features)
                        for m, E in zip(self.hidden, self.bases, strict=True)]
        else:
            self.opt = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        F.cross_entropy(self.model(x), y).backward()
        if self.kind == "project_after":
            with torch.no_grad():
                for m, E in zip(self.hidden, self.bases, strict=True):
                    G = m.weight.grad
                    assert G is not None
                    torch.mm(E, E.T @ G, out=G)
        if self.kind == "coords":
            with torch.no_grad():
                for m, h, M in zip(self.hidden, self.handles, self.mom, strict=True):
                    assert h.grad_coords is not None and h.coords_basis is not None
                    M.mul_(MOMENTUM).add_(h.grad_coords)
                    m.weight.addmm_(h.coords_basis, M, alpha=-LR)
                    h.zero_coords()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def power_refresh_s(Y: torch.Tensor, V: torch.Tensor, iters: int = 5) -> float:
    """Seconds of one warm-started block power iteration on rows Y (n, d), block V (d, b)."""
    t0 = time.perf_counter()
    for _ in range(iters):
        V = torch.linalg.qr(Y.T @ (Y @ V)).Q
    H = V.T @ (Y.T @ (Y @ V))
    torch.linalg.eigh(H)
    return time.perf_counter() - t0


def speed(args: argparse.Namespace) -> dict:
    res: dict[str, Any] = {"command": "python benchmarks/lowrank_backward.py " + " ".join(
        sys.argv[1:]), "env": env_info(torch.device("cpu")), "part": "speed",
        "machine_note": "2 CPU cores shared with four other agents' jobs; ratios are "
        "interleaved in one run", "configs": []}
    out = args.out or "lowrank_backward_speed_cpu.json"
    for d in args.widths:
        for n in args.batches:
            batches = fmnist_batches(n, 4)
            torch.manual_seed(0)
            model0 = mlp(784, d)
            ks = [d // 32, d // 16, d // 8]
            arms = [Arm("sgd", model0, "sgd", 1)]
            arms += [Arm(f"lowrank_k{k}", model0, "lowrank", k) for k in ks]
            arms += [Arm(f"project_after_k{d // 16}", model0, "project_after", d // 16),
                     Arm(f"coords_k{d // 16}", model0, "coords", d // 16)]
            # steps per block: about 0.2 s of SGD work per block, at least 1
            t0 = time.perf_counter()
            arms[0].step(*batches[0])
            t_sgd = time.perf_counter() - t0
            per_block = max(1, int(0.2 / max(t_sgd, 1e-4)))
            rounds = args.rounds
            times: dict[str, list[float]] = {a.name: [] for a in arms}
            it = 0
            for r in range(rounds + 1):  # round 0 is warm-up
                order = arms[r % len(arms):] + arms[: r % len(arms)]
                for a in order:
                    t0 = time.perf_counter()
                    for s in range(per_block):
                        a.step(*batches[(it + s) % len(batches)])
                    if r:
                        times[a.name].append((time.perf_counter() - t0) / per_block)
                it += per_block
            # basis upkeep: a warm-started block power iteration per hidden layer
            with torch.no_grad():
                x = batches[0][0]
                h1 = model0[0](x)
                h2 = model0[2](torch.relu(h1))
                refresh = []
                for _ in range(3):
                    refresh.append(sum(power_refresh_s(Y, orthonormal(d, d // 16 + 8, 0))
                                       for Y in (h1, h2)))
            sgd_med = statistics.median(times["sgd"])
            cfg: dict[str, Any] = {"d": d, "n": n, "steps_per_block": per_block,
                                   "rounds": rounds, "sgd_step_s": summary(times["sgd"]),
                                   "refresh_k_d16_s": statistics.median(refresh),
                                   "refresh_at_p100": statistics.median(refresh) / 100 / sgd_med,
                                   "arms": {}}
            for a in arms:
                ratios = [t / s for t, s in zip(times[a.name], times["sgd"], strict=True)]
                cfg["arms"][a.name] = {"kind": a.kind, "step_s": summary(times[a.name]),
                                       "ratio_to_sgd": summary(ratios)}
                for h in a.handles:
                    h.remove()
            res["configs"].append(cfg)
            write_json(out, res)
            print(f"d {d:5d} n {n:5d}: sgd {1e3 * sgd_med:8.1f} ms | " + "  ".join(
                f"{nm} {v['ratio_to_sgd']['median']:.3f}" for nm, v in cfg["arms"].items()
                if nm != "sgd") + f" | refresh(k=d/16) {1e3 * cfg['refresh_k_d16_s']:.1f} ms",
                flush=True)
    print(f"-> {RESULTS / out}")
    return res


# --------------------------------------------------------------------------------- accuracy
class EighBases:
    """Top-k eigenvectors of each hidden layer's output covariance, refreshed every p steps."""

    def __init__(self, layers: list[nn.Linear], k: int, p: int) -> None:
        self.k, self.p, self.step = k, p, 0
        self.E: dict[int, torch.Tensor | None] = {id(m): None for m in layers}
        self.rows: dict[int, torch.Tensor] = {}
        self.hooks = [m.register_forward_hook(self._capture) for m in layers]

    def _capture(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if module.training and torch.is_grad_enabled() and self.step % self.p == 0:
            self.rows[id(module)] = output.detach().reshape(-1, output.shape[-1])

    def basis_fn(self, module: nn.Linear):
        return lambda: self.E[id(module)]

    def after_step(self) -> None:
        for key, Y in self.rows.items():
            _, V = torch.linalg.eigh((Y.T @ Y).double())
            self.E[key] = V[:, -self.k:].flip(1).float().contiguous()
        self.rows = {}
        self.step += 1

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def accuracy_run(data, k: int | None, p: int, seed: int, epochs: int, width: int) -> dict:
    torch.manual_seed(seed)
    model = mlp(784, width)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    hidden = hidden_linears(model)
    bases = handles = None
    if k is not None:
        bases = EighBases(hidden, k, p)
        handles = [low_rank_backward(m, bases.basis_fn(m), side="output") for m in hidden]
    curve = []
    wall = 0.0
    for epoch in range(epochs):
        model.train()
        for x, y in data.train.iter_epoch(epoch):
            t0 = time.perf_counter()
            F.cross_entropy(model(x.flatten(1)), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if bases is not None:
                bases.after_step()
            wall += time.perf_counter() - t0
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(x.flatten(1)).argmax(1) == y).sum())
                          for x, y in data.test.iter_epoch(0))
        curve.append({"epoch": epoch + 1, "test_acc": correct / data.n_test})
    for h in handles or []:
        h.remove()
    if bases is not None:
        bases.remove()
    return {"k": k, "seed": seed, "curve": curve, "final_test_acc": curve[-1]["test_acc"],
            "train_wall_s": wall}


def accuracy(args: argparse.Namespace) -> dict:
    from dsbp.experiments.build import load_data
    from dsbp.experiments.config import RunConfig

    width = args.acc_width
    out = args.out or "lowrank_backward_accuracy_fmnist.json"
    res: dict[str, Any] = {"command": "python benchmarks/lowrank_backward.py " + " ".join(
        sys.argv[1:]), "env": env_info(torch.device("cpu")), "part": "accuracy",
        "task": {"dataset": "fashion_mnist", "train_subset": args.subset, "test": "full (10000)",
                 "model": f"MLP 784-{width}-{width}-10", "epochs": args.epochs, "batch": 128,
                 "lr": LR, "momentum": MOMENTUM, "schedule": "constant", "p": args.p,
                 "bases": "exact eigh of Y^T Y on one batch's output rows every p steps, "
                          "used from the next step", "side": "output",
                 "layers": "both hidden Linears; classifier ordinary"},
        "seeds": args.seeds, "runs": []}
    ks: list[int | None] = [None, width // 32, width // 16, width // 8]
    for seed in args.seeds:
        cfg = RunConfig(dataset="fashion_mnist", seed=seed, batch_size=128, subset=args.subset)
        data = load_data(cfg, torch.device("cpu"))
        for k in ks:
            r = accuracy_run(data, k, args.p, seed, args.epochs, width)
            res["runs"].append(r)
            write_json(out, res)
            print(f"seed {seed} {'sgd' if k is None else f'k={k}':6s}: test "
                  f"{r['final_test_acc']:.4f} ({r['train_wall_s']:.0f}s)", flush=True)
    res["summary"] = {}
    for k in ks:
        accs = [r["final_test_acc"] for r in res["runs"] if r["k"] == k]
        res["summary"]["sgd" if k is None else f"k{k}"] = {
            "k": k, "mean": statistics.mean(accs),
            "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "runs": accs}
    write_json(out, res)
    print(json.dumps(res["summary"], indent=1))
    return res


def step_flops(kind: str, n: int, d: int, k: int, d_in: int = 784, classes: int = 10) -> int:
    """Matmul flops of one training step of ``mlp(d_in, d)`` (elementwise work ignored)."""
    shapes = [(d, d_in), (d, d)]  # hidden (d_out, d_in); the first needs no input gradient
    f = 6 * n * d * classes  # classifier: forward, input and weight gradients
    for i, (o, m) in enumerate(shapes):
        f += 2 * n * o * m + (2 * n * o * m if i else 0)  # forward, input gradient
        if kind in ("sgd", "project_after"):
            f += 2 * n * o * m + (4 * k * o * m if kind == "project_after" else 0)
        else:  # lowrank: thin products + expansion; coords: thin products + addmm update
            f += 2 * n * k * (o + m) + 2 * k * o * m
    return f


def render(args: argparse.Namespace) -> str:
    """Store model flop ratios in the speed JSON; print the Markdown tables of both parts."""
    lines = []
    speed_files = [RESULTS / args.out] if args.out else sorted(
        RESULTS.glob("lowrank_backward_speed_cpu*.json"))
    for sp in speed_files:
        res = json.loads(sp.read_text())
        lines += [f"`{sp.name}`: `{res['command']}`", "",
                  "| d | batch n | SGD step (ms, median) | low-rank k = d/32 | k = d/16 | "
                  "k = d/8 | project after backward, k = d/16 | coordinates, k = d/16 | "
                  "matmul flops, low-rank k = d/16 / SGD | basis refresh at p = 100 |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for c in res["configs"]:
            d, n = c["d"], c["n"]
            for name, a in c["arms"].items():
                k = int(name.rsplit("_k", 1)[1]) if "_k" in name else 1
                a["flops_ratio_to_sgd"] = step_flops(a["kind"], n, d, k) / step_flops(
                    "sgd", n, d, 1)
            ar = c["arms"]

            def r(name: str, ar: dict = ar) -> str:
                return f"{ar[name]['ratio_to_sgd']['median']:.2f}x"

            lines.append(
                f"| {d} | {n} | {1e3 * c['sgd_step_s']['median']:.1f} | {r(f'lowrank_k{d // 32}')}"
                f" | {r(f'lowrank_k{d // 16}')} | {r(f'lowrank_k{d // 8}')} | "
                f"{r(f'project_after_k{d // 16}')} | {r(f'coords_k{d // 16}')} | "
                f"{ar[f'lowrank_k{d // 16}']['flops_ratio_to_sgd']:.2f} | "
                f"{100 * c['refresh_at_p100']:.2f}% |")
        sp.write_text(json.dumps(res, indent=2) + "\n")
        lines.append("")
    ap_ = RESULTS / "lowrank_backward_accuracy_fmnist.json"
    if ap_.exists():
        acc = json.loads(ap_.read_text())
        if "summary" in acc:
            lines += ["| arm | k | test accuracy, mean (sd) | per seed |", "|---|---|---|---|"]
            sgd_mean = acc["summary"]["sgd"]["mean"]
            for row in acc["summary"].values():
                row["mean_pct"], row["std_pct"] = 100 * row["mean"], 100 * row["std"]
                row["minus_sgd_points"] = 100 * (sgd_mean - row["mean"])
                per = ", ".join(f"{100 * v:.2f}%" for v in row["runs"])
                lines.append(f"| {'SGD' if row['k'] is None else 'low-rank backward'} | "
                             f"{row['k'] or '-'} | {row['mean_pct']:.2f}% ({row['std_pct']:.2f}%)"
                             f" | {per} |")
            ap_.write_text(json.dumps(acc, indent=2) + "\n")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("part", choices=("speed", "accuracy", "render"),
                    help="render: measure nothing; store derived numbers and print tables")
    ap.add_argument("--widths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--batches", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--subset", type=int, default=20000)
    ap.add_argument("--acc-width", type=int, default=1024)
    ap.add_argument("--p", type=int, default=20, help="basis refresh interval (accuracy part)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.part == "render":
        print(render(args))
        return {}
    return speed(args) if args.part == "speed" else accuracy(args)


if __name__ == "__main__":
    main()
