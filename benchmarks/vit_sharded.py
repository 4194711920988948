"""A small ViT on Tiny ImageNet: AdamW, SubspaceAdam, DSBP around AdamW and GaLore, on 1 process
and on 2 FSDP2 processes (gloo, CPU), at equal steps.

Per world size W, one launch trains every arm *interleaved step by step* on each rank (the same
global batches, each rank its slice), so the step-time ratios to AdamW come from one run on one
machine. Under W = 2 the model is wrapped with ``fully_shard`` per transformer block and at the
root, and the DSBP arms are the distributed ones (``DistributedDSBP``, ``SubspaceAdam(...,
distributed=True)``; output side, the default, and input side). GaLore (``galore-torch``) is
tried under FSDP2 too; if it fails there its error is recorded instead of numbers.

Recorded per arm and W: test accuracy on the 2000 test images (all ranks evaluate the full
split with the same weights), the last logged train loss, optimizer state bytes on each rank
(moments and bases; DTensors counted by their local shard), the median step time and its ratio
to AdamW in the same run, and, from a separate short launch per arm (a fresh process, so that
the peak belongs to that arm), the peak resident set size (``ru_maxrss``) of each rank and its
increase over the RSS right before training.

    nice -n 10 .venv/bin/python benchmarks/vit_sharded.py              # ~15 min on 2 shared cores
    nice -n 10 .venv/bin/python benchmarks/vit_sharded.py --render     # plot from the JSON

The machine is shared: absolute times are noisy, ratios are taken within one interleaved run.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, env_info, write_json  # noqa: E402

import dsbp  # noqa: E402
from dsbp.models.vit import ViT  # noqa: E402
from dsbp.optim.comm import is_dtensor  # noqa: E402
from dsbp.optim.distributed import launch  # noqa: E402

ARMS = ("adamw", "subspace_adam", "subspace_adam_input", "dsbp_adamw", "galore")
VIT = dict(image_size=64, patch=8, num_classes=200, dim=64, depth=4, heads=4)
CFG = dict(steps=200, batch=64, lr=2e-3, weight_decay=0.05, rank=16, interval=50,
           eval_every=50, memory_steps=8, seed=0)
OUT = "vit_sharded_cpu.json"


def _data() -> dict:
    from dsbp.data.registry import load_dataset

    ds = load_dataset("tiny_imagenet")
    return {"x": ds.x_train, "y": ds.y_train, "xt": ds.x_test, "yt": ds.y_test,
            "mean": torch.tensor(ds.mean).view(1, 3, 1, 1),
            "std": torch.tensor(ds.std).view(1, 3, 1, 1)}


def _norm(d: dict, x: torch.Tensor) -> torch.Tensor:
    return (x.float() / 255.0 - d["mean"]) / d["std"]


def _order(n: int, steps: int, batch: int, seed: int) -> torch.Tensor:
    """Indices of every global batch: seeded permutations of the training split, epoch after
    epoch (the same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    need = steps * batch
    perms = [torch.randperm(n, generator=g) for _ in range(-(-need // n))]
    return torch.cat(perms)[:need].view(steps, batch)


def make_optimizer(arm: str, model: nn.Module, distributed: bool) -> torch.optim.Optimizer:
    lr, wd, k, p = CFG["lr"], CFG["weight_decay"], CFG["rank"], CFG["interval"]
    if arm == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    if arm in ("subspace_adam", "subspace_adam_input"):  # output side (default) / input side
        from dsbp.optim.subspace_state import SubspaceAdam

        return SubspaceAdam(model, lr=lr, weight_decay=wd, rank=k, interval=p,
                            side="input" if arm.endswith("input") else "output",
                            distributed=distributed)
    if arm == "dsbp_adamw":
        if distributed:
            from dsbp.optim.distributed import DistributedDSBP

            return DistributedDSBP(model, torch.optim.AdamW, rank=k, interval=p, lr=lr,
                                   weight_decay=wd)
        from dsbp import DSBP

        return DSBP(model, torch.optim.AdamW, rank=k, interval=p, lr=lr, weight_decay=wd)
    if arm == "galore":
        from galore_torch import GaLoreAdamW

        mats = [m.weight for m in model.modules()
                if isinstance(m, nn.Linear) and min(m.weight.shape) > k]
        ids = {id(q) for q in mats}
        rest = [q for q in model.parameters() if id(q) not in ids]
        # scale=1: the same step size as the other arms (GaLore's default 0.25 assumes a larger lr)
        return GaLoreAdamW([{"params": rest},
                            {"params": mats, "rank": k, "update_proj_gap": p, "scale": 1.0,
                             "proj_type": "std"}], lr=lr, weight_decay=wd)
    raise ValueError(f"unknown arm {arm!r}")


def local_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Optimizer state on this rank: every tensor in the state (DTensors: the local shard),
    GaLore's projection matrices and DSBP's bases included; step counters left out."""
    seen: set[int] = set()

    def count(obj: object) -> int:
        if isinstance(obj, torch.Tensor):
            t = obj.to_local() if is_dtensor(obj) else obj  # type: ignore[attr-defined]
            if t.numel() <= 1 or t.data_ptr() in seen:
                return 0
            seen.add(t.data_ptr())
            return t.numel() * t.element_size()
        if isinstance(obj, dict):
            return sum(count(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(count(v) for v in obj)
        if hasattr(obj, "__dict__") and not isinstance(obj, nn.Module):
            return sum(count(v) for v in vars(obj).values())
        return 0

    inner = getattr(opt, "base_optimizer", opt)
    total = sum(count(s) for s in inner.state.values())
    proj = getattr(opt, "projector", None)
    if proj is not None:
        for n in proj.layer_names():
            st = proj.layer_state(n)
            total += count(st.block) + count(st.eigenvalues)
    return total


def _build(world: int) -> nn.Module:
    torch.manual_seed(CFG["seed"])
    net = ViT(**VIT)
    if world > 1:
        from dsbp.optim.distributed import shard_model

        shard_model(net)
    return net


def _sum(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t)
    return t


@torch.no_grad()
def _evaluate(net: nn.Module, d: dict) -> float:
    net.eval()
    correct = 0
    for i in range(0, d["xt"].shape[0], 250):
        correct += int((net(_norm(d, d["xt"][i:i + 250])).argmax(1) == d["yt"][i:i + 250]).sum())
    net.train()
    return correct / d["xt"].shape[0]


def _train_rank(rank: int, world: int, out_dir: str, cfg: dict) -> None:
    """Every arm, interleaved step by step, on this rank's slice of each global batch."""
    CFG.update(cfg)  # a spawned process re-imports this module: take the parent's settings
    torch.set_num_threads(1)
    d = _data()
    order = _order(d["x"].shape[0], CFG["steps"], CFG["batch"], CFG["seed"])
    local = CFG["batch"] // world
    arms: dict[str, dict] = {}
    for arm in ARMS:
        net = _build(world)
        try:
            opt = make_optimizer(arm, net, world > 1)
            if world > 1 and arm == "galore":  # its first step is where DTensors would fail
                xb = _norm(d, d["x"][order[0, :local]])
                opt.zero_grad()
                F.cross_entropy(net(xb), d["y"][order[0, :local]]).backward()
                opt.step()
                net = _build(world)
                opt = make_optimizer(arm, net, True)
        except Exception as err:  # recorded, not hidden: e.g. GaLore on DTensors
            arms[arm] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
            continue
        arms[arm] = {"net": net, "opt": opt, "times": [], "curve": []}
    for t in range(CFG["steps"]):
        idx = order[t, rank * local:(rank + 1) * local]
        xb, yb = _norm(d, d["x"][idx]), d["y"][idx]
        for a in arms.values():
            if "error" in a:
                continue
            t0 = time.perf_counter()
            a["opt"].zero_grad()
            loss = F.cross_entropy(a["net"](xb), yb)
            loss.backward()
            a["opt"].step()
            a["times"].append(time.perf_counter() - t0)
            if (t + 1) % CFG["eval_every"] == 0:
                tl = float(_sum(loss.detach().clone(), world)) / world
                a["curve"].append({"step": t + 1, "train_loss": tl,
                                   "test_acc": _evaluate(a["net"], d)})
        if rank == 0 and (t + 1) % 10 == 0:
            print(f"W={world} step {t + 1}/{CFG['steps']}", flush=True)
    out = {}
    base = statistics.median(arms["adamw"]["times"])
    for arm, a in arms.items():
        if "error" in a:
            out[arm] = {"error": a["error"]}
            continue
        med = statistics.median(a["times"])
        out[arm] = {"test_acc": a["curve"][-1]["test_acc"],
                    "train_loss": a["curve"][-1]["train_loss"], "curve": a["curve"],
                    "state_bytes_this_rank": local_state_bytes(a["opt"]),
                    "median_step_s": med, "step_time_ratio_to_adamw": med / base}
    torch.save(out, Path(out_dir) / f"train_w{world}_r{rank}.pt")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _memory_rank(rank: int, world: int, out_dir: str, arm: str, cfg: dict) -> None:
    """A few steps of one arm in a fresh process: peak RSS of this rank."""
    CFG.update(cfg)
    torch.set_num_threads(1)
    d = _data()
    local = CFG["batch"] // world
    order = _order(d["x"].shape[0], CFG["memory_steps"], CFG["batch"], CFG["seed"])
    net = _build(world)
    try:
        opt = make_optimizer(arm, net, world > 1)
    except Exception as err:
        torch.save({"error": f"{type(err).__name__}: {err}"[:300]},
                   Path(out_dir) / f"mem_{arm}_w{world}_r{rank}.pt")
        return
    start = _rss()
    try:
        for t in range(CFG["memory_steps"]):
            idx = order[t, rank * local:(rank + 1) * local]
            opt.zero_grad()
            F.cross_entropy(net(_norm(d, d["x"][idx])), d["y"][idx]).backward()
            opt.step()
    except Exception as err:
        torch.save({"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"},
                   Path(out_dir) / f"mem_{arm}_w{world}_r{rank}.pt")
        return
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    torch.save({"peak_rss_bytes": peak, "rss_before_training_bytes": start,
                "peak_increase_bytes": max(0, peak - start)},
               Path(out_dir) / f"mem_{arm}_w{world}_r{rank}.pt")


def measure() -> dict:
    res: dict = {"train": {}, "memory": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            launch(_train_rank, world, args=(tmp, dict(CFG)), backend="gloo")
            res["train"][str(world)] = [torch.load(Path(tmp) / f"train_w{world}_r{r}.pt",
                                                   weights_only=True) for r in range(world)]
            for arm in ARMS:
                launch(_memory_rank, world, args=(tmp, arm, dict(CFG)), backend="gloo")
                res["memory"][f"{arm}/{world}"] = [
                    torch.load(Path(tmp) / f"mem_{arm}_w{world}_r{r}.pt", weights_only=True)
                    for r in range(world)]
    return res


def summarise(res: dict) -> list[dict]:
    """One row per arm and world size, with every number the docs quote."""
    rows = []
    for world, ranks in res["train"].items():
        for arm in ARMS:
            r0 = ranks[0][arm]
            mem = res["memory"][f"{arm}/{world}"]
            row: dict = {"arm": arm, "world_size": int(world),
                         "sharding": "fsdp2" if world != "1" else "none"}
            if "error" in r0:
                row["error"] = r0["error"]
                rows.append(row)
                continue
            states = [rk[arm]["state_bytes_this_rank"] for rk in ranks]
            row.update({
                "test_acc": round(r0["test_acc"], 4), "train_loss": round(r0["train_loss"], 3),
                "state_kB_per_rank": [round(s / 1e3, 1) for s in states],
                "step_time_ratio_to_adamw": round(r0["step_time_ratio_to_adamw"], 2),
                "median_step_ms": round(1e3 * r0["median_step_s"], 1),
                "ranks_agree_on_test_acc": all(rk[arm]["test_acc"] == r0["test_acc"]
                                               for rk in ranks),
            })
            if all("error" not in m for m in mem):
                row["peak_rss_MB_per_rank"] = [round(m["peak_rss_bytes"] / 1e6, 1) for m in mem]
                row["peak_rss_increase_MB_per_rank"] = [round(m["peak_increase_bytes"] / 1e6, 1)
                                                        for m in mem]
            else:
                row["memory_error"] = next(m["error"] for m in mem if "error" in m)
            rows.append(row)
    for row in rows:  # state per rank relative to the same arm in one process
        one = next((r for r in rows if r["arm"] == row["arm"] and r["world_size"] == 1
                    and "state_kB_per_rank" in r), None)
        if one and "state_kB_per_rank" in row:
            row["state_per_rank_vs_one_process"] = round(
                max(row["state_kB_per_rank"]) / one["state_kB_per_rank"][0], 3)
    return rows


def markdown(rows: list[dict]) -> str:
    md = ["| arm | processes | test acc | train loss | optimizer state per rank (kB) | "
          "state vs 1 process | peak RSS increase per rank (MB) | step time / AdamW |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            md.append(f"| {r['arm']} | {r['world_size']} | failed: `{r['error'][:80]}` "
                      "| | | | | |")
            continue
        mem = ", ".join(map(str, r.get("peak_rss_increase_MB_per_rank", ["-"])))
        md.append(f"| {r['arm']} | {r['world_size']} | {r['test_acc']:.4f} | "
                  f"{r['train_loss']:.3f} | {', '.join(map(str, r['state_kB_per_rank']))} | "
                  f"{r.get('state_per_rank_vs_one_process', '-')} | {mem} | "
                  f"{r['step_time_ratio_to_adamw']:.2f} |")
    return "\n".join(md)


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in payload["rows"] if "error" not in r]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    panels = [("test_acc", "test accuracy"),
              ("state_kB_per_rank", "optimizer state per rank (kB)"),
              ("peak_rss_increase_MB_per_rank", "peak RSS increase per rank (MB)"),
              ("step_time_ratio_to_adamw", "step time / AdamW (same run)")]
    for ax, (key, title) in zip(axes, panels, strict=True):
        for w, off, col in ((1, -0.2, "tab:blue"), (2, 0.2, "tab:orange")):
            xs, ys = [], []
            for i, arm in enumerate(ARMS):
                r = next((r for r in rows if r["arm"] == arm and r["world_size"] == w), None)
                if r is None or key not in r:
                    continue
                v = r[key]
                xs.append(i + off)
                ys.append(max(v) if isinstance(v, list) else v)
            ax.bar(xs, ys, width=0.4, color=col, label=f"{w} process{'es' if w > 1 else ''}"
                   + (" (FSDP2)" if w > 1 else ""))
        ax.set_xticks(range(len(ARMS)), ARMS, rotation=20, fontsize=8)
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    failed = [f"{r['arm']} ({r['world_size']} proc.)" for r in payload["rows"] if "error" in r]
    vit, cfg = payload["vit"], payload["settings"]
    fig.suptitle(f"ViT (dim {vit['dim']}, depth {vit['depth']}) on the Tiny ImageNet subset, "
                 f"{cfg['steps']} steps, batch {cfg['batch']}, 1 seed, CPU (gloo), shared machine"
                 + (f"; failed, no bar: {', '.join(failed)}" if failed else ""), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--render", action="store_true", help="plot and table from the JSON only")
    ap.add_argument("--smoke", action="store_true", help="4 steps, nothing written (a check)")
    args = ap.parse_args()
    if args.smoke:
        CFG.update(steps=4, eval_every=2, memory_steps=2)
        rows = summarise(measure())
        print(markdown(rows))
        return
    png = ROOT / "docs" / "img" / "vit_sharded_cpu.png"
    if args.render:
        payload = json.loads((RESULTS / OUT).read_text())
    else:
        res = measure()
        rows = summarise(res)
        env = env_info(torch.device("cpu"))
        src = Path(dsbp.__file__).resolve().parent
        stamp = src.parent.parent / "COMMIT"  # a clean export run through PYTHONPATH
        if stamp.exists():
            env.update(commit=stamp.read_text().strip(), dirty=False,
                       source=f"clean git archive of the commit at {src}")
        payload = {
            "command": "nice -n 10 .venv/bin/python benchmarks/vit_sharded.py",
            "env": env, "note": "shared machine (2 cores, several "
            "agents): step times are noisy; ratios come from one interleaved run per world size",
            "vit": VIT, "settings": CFG, "data": "tiny_imagenet (6000 train / 2000 test, 200 "
            "classes)", "memory_measure": "ru_maxrss (peak resident set size) of each rank's "
            "process during a separate short run of that arm, and its increase over the RSS "
            "right before training", "rows": rows, "raw": res["train"],
        }
        payload["markdown"] = markdown(rows)
        write_json(OUT, json.loads(json.dumps(payload, default=float)))
    plot(payload, png)
    print(payload["markdown"])
    print("->", RESULTS / OUT, png)


if __name__ == "__main__":
    main()
