"""Scaling curve: step time and optimizer memory of SGD, DSBP and SAM as width, depth, batch grow.

Model: an MLP on real Fashion-MNIST batches (784 -> width x depth -> 10), SGD with momentum as
the base everywhere. Per configuration the three arms run interleaved (rotating order), and we
report median full training-step times (forward + backward + step; SAM does two passes) and the
ratios to SGD taken in the same run. DSBP's time includes its refresh amortised over p=100
steps (refresh steps are timed separately). Memory: exact bytes of optimizer state (momentum,
DSBP bases) plus the largest transient the method allocates per step (DSBP: activation rows
captured on a refresh step; SAM: the weight backup during its ascent), read from the objects.

``python benchmarks/scaling.py`` (CPU; a few minutes). ``--device cuda`` for a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, env_info, summary, timed, write_json  # noqa: E402

from dsbp import DSBP  # noqa: E402
from dsbp.optim.subspace_state import state_bytes  # noqa: E402

ARMS = ("sgd", "dsbp", "sam")
P = 100  # refresh interval the DSBP time is amortised over


def mlp(width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(784, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def make(arm: str, model: nn.Module):
    kw = dict(lr=0.01, momentum=0.9)
    if arm == "sgd":
        return torch.optim.SGD(model.parameters(), **kw)
    if arm == "dsbp":
        return DSBP(model, torch.optim.SGD, rank=10, interval=10**9, **kw)
    from dsbp.baselines.sam import SAM

    return SAM(model.parameters(), torch.optim.SGD, rho=0.05, model=model, **kw)


def measure(width: int, depth: int, batch: int, data, device, repeats: int) -> dict:
    xs, ys = data
    torch.manual_seed(0)
    m0 = mlp(width, depth).to(device)
    models = {a: mlp(width, depth).to(device) for a in ARMS}
    for m in models.values():
        m.load_state_dict(m0.state_dict())
    opts = {a: make(a, models[a]) for a in ARMS}
    times = {a: [] for a in ARMS}
    refresh, transient = [], {a: 0 for a in ARMS}
    n_batches = xs.shape[0] // batch

    def step(arm: str, i: int, force_refresh: bool = False) -> float:
        m, opt = models[arm], opts[arm]
        x, y = xs[(i % n_batches) * batch:][:batch], ys[(i % n_batches) * batch:][:batch]

        def closure():
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            return loss

        def run():
            if arm == "sam":
                opt.step(closure)
                return
            opt.zero_grad(set_to_none=True)
            closure()
            if arm == "dsbp":
                rows = sum(r.numel() * r.element_size() for n in opt.projector.layer_names()
                           for r in opt.projector.layer_state(n).rows)
                transient["dsbp"] = max(transient["dsbp"], rows)
            opt.step()

        if force_refresh:
            for n in opt.projector.layer_names():
                opt.projector.layer_state(n).last_refresh = -1  # due now: capture + re-solve
        return timed(run, device)

    for r in range(2 + repeats):
        order = ARMS[r % 3:] + ARMS[: r % 3]
        for a in order:
            t = step(a, r)
            if r >= 2:
                times[a].append(t)
        if r >= 2 and r % 3 == 0:  # a refresh step of DSBP, timed on its own
            refresh.append(step("dsbp", r, force_refresh=True))
    transient["sam"] = sum(p.numel() * p.element_size() for p in models["sam"].parameters())
    t_dsbp = statistics.median(times["dsbp"])
    amort = max(statistics.median(refresh) - t_dsbp, 0.0) / P
    out = {"width": width, "depth": depth, "batch": batch,
           "params": sum(p.numel() for p in m0.parameters()),
           "time_s": {a: summary(times[a]) for a in ARMS},
           "dsbp_refresh_step_s": summary(refresh), "dsbp_amortised_s": t_dsbp + amort,
           "state_bytes": {a: state_bytes(opts[a]) for a in ARMS},
           "transient_bytes": transient}
    t_sgd = statistics.median(times["sgd"])
    out["ratio_vs_sgd"] = {"dsbp": (t_dsbp + amort) / t_sgd,
                           "sam": statistics.median(times["sam"]) / t_sgd}
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = [("width", "width (depth 4, batch 128)"), ("depth", "depth (width 512, batch 128)"),
              ("batch", "batch (width 512, depth 4)")]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    for j, (key, label) in enumerate(sweeps):
        rs = sorted((r for r in rows if r["sweep"] == key), key=lambda r: r[key])
        xs = [r[key] for r in rs]
        for arm, c in (("sgd", "C0"), ("dsbp", "C1"), ("sam", "C2")):
            t = [1e3 * (r["dsbp_amortised_s"] if arm == "dsbp" else r["time_s"][arm]["median"])
                 for r in rs]
            axes[0, j].plot(xs, t, marker="o", color=c, label=arm.upper())
            mem = [(r["state_bytes"][arm] + r["transient_bytes"][arm]) / 2**20 for r in rs]
            axes[1, j].plot(xs, mem, marker="o", color=c, label=arm.upper())
        for r, x in zip(rs, xs, strict=True):
            axes[0, j].annotate(f"{r['ratio_vs_sgd']['dsbp']:.2f}x", (x, 1e3 * r[
                "dsbp_amortised_s"]), fontsize=7, color="C1", textcoords="offset points",
                xytext=(0, 5))
        for i in range(2):
            axes[i, j].set_xscale("log", base=2)
            axes[i, j].set_yscale("log")
            axes[i, j].set_xlabel(label)
        axes[0, j].set_ylabel("training step (ms, median)")
        axes[1, j].set_ylabel("optimizer state + transient (MiB)")
    axes[0, 0].legend()
    fig.suptitle("MLP on Fashion-MNIST, CPU: DSBP labels = time ratio to SGD (refresh amortised,"
                 " p=100)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--widths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    ap.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 128, 512, 2048])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from dsbp.data import load_dataset

    ds = load_dataset("fashion_mnist")
    x = ((ds.x_train[:8192].float() / 255.0 - ds.mean[0]) / ds.std[0]).to(device)
    data = (x, ds.y_train[:8192].to(device))
    rows = []
    grid = ([("width", w, 4, 128) for w in args.widths]
            + [("depth", 512, d, 128) for d in args.depths]
            + [("batch", 512, 4, b) for b in args.batches])
    for sweep, w, d, b in grid:
        r = measure(w, d, b, data, device, args.repeats)
        r["sweep"] = sweep
        rows.append(r)
        print(f"{sweep:5s} w={w:5d} d={d:2d} b={b:5d}: SGD {1e3 * r['time_s']['sgd']['median']:.1f}"
              f" ms, DSBP x{r['ratio_vs_sgd']['dsbp']:.3f}, SAM x{r['ratio_vs_sgd']['sam']:.2f}",
              flush=True)
    res = {"env": env_info(device), "args": vars(args), "rows": rows,
           "command": "python benchmarks/scaling.py"}
    write_json(f"scaling_{device.type}.json", res)
    plot(rows, RESULTS / f"scaling_{device.type}.png")
    return res


if __name__ == "__main__":
    main()
