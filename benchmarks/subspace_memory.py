"""Memory mode: optimizer-state bytes and peak memory of SubspaceAdam vs AdamW (and GaLore).

Two parts:

* ``memory``: a transformer-sized MLP block stack (LayerNorm, Linear d->4d, GELU, Linear 4d->d,
  residual) at d = 1024, 2048, 4096 with rank k = d/16. Each (d, optimizer) runs in its own
  subprocess for a few steps; we record the exact bytes of the optimizer's state tensors
  (``dsbp.optim.subspace_state.state_bytes``: moments, and for DSBP / SubspaceAdam the bases)
  and the process's peak resident memory above its level after building the model (CPU), or
  ``torch.cuda.max_memory_allocated`` (CUDA). The inputs are shapes only (random tokens): the
  byte counts do not depend on the data.
* ``curves``: a real task, Fashion-MNIST (full 60k/10k) with an MLP 784-1024-1024-10, batch 128:
  train loss and test accuracy of AdamW, SubspaceAdam (k = 64 = d/16) and GaLore (rank 64, if
  ``galore-torch`` is installed) at the same learning rate; PNG + JSON.

``python benchmarks/subspace_memory.py memory`` / ``curves`` (``all`` runs both).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, env_info, write_json  # noqa: E402

from dsbp import DSBP  # noqa: E402
from dsbp.optim.subspace_state import SubspaceAdam, state_bytes  # noqa: E402

ARMS = ("adamw", "subspace", "galore", "dsbp_adamw")


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


def make_optimizer(arm: str, model: nn.Module, rank: int, lr: float, interval: int = 200):
    """One of the compared optimizers on ``model``; GaLore needs ``galore-torch``."""
    if arm == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr)
    if arm == "subspace":
        return SubspaceAdam(model, lr=lr, rank=rank, interval=interval)
    if arm == "dsbp_adamw":
        return DSBP(model, torch.optim.AdamW, rank=rank, interval=interval, lr=lr)
    if arm == "galore":
        from galore_torch import GaLoreAdamW

        mats = [m.weight for m in model.modules()
                if isinstance(m, nn.Linear) and min(m.weight.shape) > rank]
        ids = {id(p) for p in mats}
        rest = [p for p in model.parameters() if id(p) not in ids]
        # scale=1: the same step size as the other arms (GaLore's default 0.25 assumes a larger lr)
        return GaLoreAdamW([{"params": rest},
                            {"params": mats, "rank": rank, "update_proj_gap": interval,
                             "scale": 1.0, "proj_type": "std"}], lr=lr, weight_decay=0.01)
    raise ValueError(f"unknown arm {arm!r}; choose from {ARMS}")


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def one_arm(d: int, arm: str, depth: int, tokens: int, steps: int, device: str) -> dict:
    """Build, train ``steps`` steps, measure; run in a fresh process per arm."""
    torch.manual_seed(0)
    dev = torch.device(device)
    model = nn.Sequential(*[Block(d) for _ in range(depth)]).to(dev)
    x = torch.randn(tokens, d, device=dev)
    # load the kernels and LAPACK once on a toy problem, so the RSS baseline excludes them
    toy = Block(32).to(dev)
    warm = make_optimizer(arm, toy, rank=2, lr=1e-4)
    toy(torch.randn(8, 32, device=dev)).sum().backward()
    warm.step()
    torch.linalg.svd(torch.randn(40, 30, device=dev), full_matrices=False)
    del toy, warm
    base = rss_bytes()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base_cuda = torch.cuda.memory_allocated(dev)
    opt = make_optimizer(arm, model, rank=d // 16, lr=1e-4)
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()
    out = {"d": d, "arm": arm, "rank": d // 16, "depth": depth, "tokens": tokens,
           "params_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
           "state_bytes": state_bytes(opt), "seconds": time.perf_counter() - t0}
    if dev.type == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated(dev) - base_cuda
        out["peak_kind"] = "torch.cuda.max_memory_allocated above the model's own bytes"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        out["peak_bytes"] = peak - base
        out["peak_kind"] = "process peak RSS above RSS after building the model"
    return out


def run_memory(args) -> dict:
    rows = []
    for d in args.dims:
        for arm in ARMS:
            cmd = [sys.executable, __file__, "_arm", "--d", str(d), "--arm", arm,
                   "--depth", str(args.depth), "--tokens", str(args.tokens),
                   "--steps", str(args.steps), "--device", args.device]
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.arm_timeout)
                if p.returncode != 0:
                    rows.append({"d": d, "arm": arm, "error": p.stderr.strip()[-400:]})
                else:
                    rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
            except subprocess.TimeoutExpired:
                rows.append({"d": d, "arm": arm, "error": f"timeout {args.arm_timeout}s"})
            r = rows[-1]
            print(d, arm, {k: r[k] for k in ("state_bytes", "peak_bytes", "error") if k in r})
    by = {(r["d"], r["arm"]): r for r in rows}
    for r in rows:
        a = by.get((r["d"], "adamw"))
        if "state_bytes" in r and a and "state_bytes" in a:
            r["state_reduction_vs_adamw"] = a["state_bytes"] / r["state_bytes"]
            r["peak_reduction_vs_adamw"] = a["peak_bytes"] / max(r["peak_bytes"], 1)
    res = {"env": env_info(torch.device(args.device)), "args": vars(args), "rows": rows,
           "command": "python benchmarks/subspace_memory.py memory"}
    write_json(f"subspace_memory_{args.device}.json", res)
    return res


def fmnist(device: torch.device):
    from dsbp.data import load_dataset

    ds = load_dataset("fashion_mnist")

    def prep(x):
        return ((x.float() / 255.0 - ds.mean[0]) / ds.std[0]).flatten(1).to(device)

    return prep(ds.x_train), ds.y_train.to(device), prep(ds.x_test), ds.y_test.to(device)


def run_curves(args) -> dict:
    device = torch.device(args.device)
    xtr, ytr, xte, yte = fmnist(device)
    arms = ["adamw", "subspace", "galore"]
    curves = {}
    for arm in arms:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(784, 1024), nn.GELU(), nn.Linear(1024, 1024), nn.GELU(),
                              nn.Linear(1024, 10)).to(device)
        try:
            opt = make_optimizer(arm, model, rank=64, lr=args.lr)
        except ImportError as e:
            curves[arm] = {"error": f"not installed: {e}"}
            continue
        g = torch.Generator().manual_seed(1)  # the same batch order for every arm
        losses, accs, t0 = [], [], time.perf_counter()
        n, step = xtr.shape[0], 0
        for _epoch in range(args.epochs):
            perm = torch.randperm(n, generator=g).to(device)
            for i in range(0, n - args.batch + 1, args.batch):
                idx = perm[i:i + args.batch]
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
                loss.backward()
                opt.step()
                losses.append(loss.item())
                step += 1
                if step % args.eval_every == 0:
                    with torch.no_grad():
                        acc = (model(xte).argmax(1) == yte).float().mean().item()
                    accs.append((step, acc))
        curves[arm] = {"train_loss": losses, "test_acc": accs,
                       "seconds": time.perf_counter() - t0, "state_bytes": state_bytes(opt)}
        print(arm, f"final test acc {accs[-1][1]:.4f}, state {state_bytes(opt) / 2**20:.2f} MiB")
    res = {"env": env_info(device), "args": vars(args), "curves": curves,
           "command": "python benchmarks/subspace_memory.py curves"}
    write_json("subspace_curves_fmnist.json", res)
    plot_curves(curves, RESULTS / "subspace_curves_fmnist.png")
    return res


def plot_curves(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    labels = {"adamw": "AdamW (full state)", "subspace": "SubspaceAdam k=64 (DSBP bases)",
              "galore": "GaLore-AdamW rank 64"}
    for arm, c in curves.items():
        if "error" in c:
            continue
        mb = c["state_bytes"] / 2**20
        loss = torch.tensor(c["train_loss"])
        w = 50
        smooth = loss.unfold(0, w, 1).mean(1) if len(loss) > w else loss
        a1.plot(range(w - 1, w - 1 + len(smooth)), smooth, label=f"{labels[arm]}, {mb:.1f} MiB")
        s, acc = zip(*c["test_acc"], strict=True)
        a2.plot(s, acc, marker="o", ms=3, label=labels[arm])
    a1.set(xlabel="step", ylabel="train loss (moving avg 50)", yscale="log",
           title="Fashion-MNIST MLP 784-1024-1024-10")
    a2.set(xlabel="step", ylabel="test accuracy")
    a1.legend(fontsize=7)
    a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("part", choices=("memory", "curves", "all", "_arm"))
    ap.add_argument("--dims", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--arm", choices=ARMS, default="adamw")
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--arm-timeout", type=int, default=240)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.part == "_arm":
        print(json.dumps(one_arm(args.d, args.arm, args.depth, args.tokens, args.steps,
                                 args.device)))
        return
    if args.part in ("memory", "all"):
        run_memory(args)
    if args.part in ("curves", "all"):
        run_curves(args)


if __name__ == "__main__":
    main()
