"""Time to a target test accuracy, and accuracy at equal time: SGD, AdamW, SAM, DSBP, Muon.

Which optimizer reaches a given accuracy first? On a machine shared with other jobs raw
wall-clock is noisy, so the benchmark separates *how many steps* a method needs (a property of
the method, measured per run) from *what a step costs* (measured once per model as a ratio to
SGD, in one interleaved timing run):

1. **Learning rate, on validation.** For every method, a short run per learning rate of its
   family's grid (seed ``--select-seed``, distinct from the reported seeds), trained on the
   training subset and scored on a validation split held out of the *training* split (never
   the test split). The best final validation accuracy picks the rate; every score is recorded.
2. **Reported runs.** Seeds ``--seeds`` at the chosen rate, test accuracy every
   ``eval_every`` steps, and the raw training wall-clock (evaluation excluded) at each point.
3. **Step cost.** One interleaved run: every method in turn takes blocks of 100 consecutive
   training steps on real batches, in a rotating order. A block of 100 aligned steps holds
   exactly one refresh at p = 100 and five at p = 20, so the per-round ratio (method block /
   SGD block of the same round) includes the amortised refresh. The median over rounds is the
   method's step cost in SGD steps.

Time is then reported two ways: *ratio-based* (steps x cost ratio x SGD's median step time from
the timing run) and *raw* wall-clock of the run itself (noisy). Targets are fractions of SGD's
final mean test accuracy (recorded). The learning rate is constant (no schedule), so a run cut
at an equal time budget is the same run, not a differently scheduled one.

Methods: ``sgd`` (momentum 0.9), ``adamw``, ``sam`` (rho 0.05, SGD base), ``dsbp_paper``
(k = 10, p = 100, beta = 0.1, 5 power iterations), ``dsbp_recommended`` (the README's: residual
0.5, p = 20, warm-up one epoch), ``subspace_adam`` (``dsbp.optim.subspace_state.SubspaceAdam``),
``muon`` (``torch.optim.Muon`` on the 2-D hidden weights, AdamW on the rest; ``torch.optim.Muon``
takes only 2-D parameters, so on the CNN only its hidden Linear gets Muon).

``nice -n 10 python benchmarks/time_to_accuracy.py`` (about 30-40 min on 2 shared cores);
``--quick`` for a smoke run; ``--resume`` continues from the partial JSON after a crash.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, env_info, summary, write_json  # noqa: E402

import dsbp  # noqa: E402
from dsbp import DSBP  # noqa: E402
from dsbp.baselines.sam import SAM  # noqa: E402
from dsbp.experiments.build import load_data  # noqa: E402
from dsbp.experiments.config import RunConfig  # noqa: E402
from dsbp.models.registry import build_model  # noqa: E402
from dsbp.optim.subspace_state import SubspaceAdam  # noqa: E402

# One grid per optimizer family: SGD-like methods share one, Adam-like methods another
# (Muon with adjust_lr_fn="match_rms_adamw" takes AdamW-scale rates).
SGD_GRID = (0.01, 0.03, 0.1)
ADAM_GRID = (3e-4, 1e-3, 3e-3)
METHODS: dict[str, tuple[float, ...]] = {
    "sgd": SGD_GRID, "adamw": ADAM_GRID, "sam": SGD_GRID, "dsbp_paper": SGD_GRID,
    "dsbp_recommended": SGD_GRID, "subspace_adam": ADAM_GRID, "muon": ADAM_GRID,
}
SGD_WD, ADAM_WD = 5e-4, 0.01
TARGET_FRACTIONS = (0.97, 0.99)  # of SGD's final mean test accuracy


@dataclass
class Task:
    """One data set + model + budget."""

    name: str
    dataset: str
    model: str
    model_kwargs: dict[str, Any]
    subset: int
    val: int
    eval_subset: int
    epochs: int
    batch: int = 128
    eval_every: int = 20
    timing_rounds: int = 6
    notes: list[str] = field(default_factory=list)

    def config(self, seed: int) -> RunConfig:
        return RunConfig(dataset=self.dataset, model=self.model, seed=seed, epochs=self.epochs,
                         batch_size=self.batch, subset=self.subset, val_split=self.val,
                         eval_subset=self.eval_subset, model_kwargs=self.model_kwargs,
                         augment=False)


TASKS = {
    "fmnist_mlp": Task("fmnist_mlp", "fashion_mnist", "mlp", {"hidden": (256, 256)},
                       subset=20000, val=5000, eval_subset=10000, epochs=5, eval_every=25,
                       timing_rounds=8),
    "cifar10_cnn": Task("cifar10_cnn", "cifar10", "cnn", {"width": 16, "hidden": 128},
                        subset=5000, val=5000, eval_subset=2000, epochs=6, timing_rounds=4),
}


class Trainer:
    """A method's optimizer(s) behind one ``train_step(x, y)``."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer,
                 extra: list[torch.optim.Optimizer] | None = None, closure: bool = False,
                 cleanup: Callable[[], None] | None = None) -> None:
        self.model, self.opt, self.extra, self.closure = model, opt, extra or [], closure
        self.cleanup = cleanup

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.closure:  # SAM: two forward/backward passes

            def closure() -> torch.Tensor:
                loss = F.cross_entropy(self.model(x), y)
                loss.backward()
                return loss

            self.opt.step(closure)
            return
        for o in (self.opt, *self.extra):
            o.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(x), y).backward()
        for o in (self.opt, *self.extra):
            o.step()


def make_trainer(method: str, model: nn.Module, lr: float, steps_per_epoch: int,
                 seed: int) -> Trainer:
    sgd = dict(lr=lr, momentum=0.9, weight_decay=SGD_WD)
    if method == "sgd":
        return Trainer(model, torch.optim.SGD(model.parameters(), **sgd))
    if method == "adamw":
        return Trainer(model, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=ADAM_WD))
    if method == "sam":
        return Trainer(model, SAM(model.parameters(), torch.optim.SGD, rho=0.05, model=model,
                                  **sgd), closure=True)
    if method == "dsbp_paper":
        opt = DSBP(model, torch.optim.SGD, rank=10, interval=100, sharpness=0.1, power_iters=5,
                   projector_kwargs={"seed": seed}, **sgd)
        return Trainer(model, opt, cleanup=opt.projector.remove)
    if method == "dsbp_recommended":
        opt = DSBP(model, torch.optim.SGD, rank=10, interval=20, sharpness=0.1, power_iters=5,
                   projector_kwargs={"seed": seed, "residual": 0.5, "warmup": steps_per_epoch},
                   **sgd)
        return Trainer(model, opt, cleanup=opt.projector.remove)
    if method == "subspace_adam":
        sa = SubspaceAdam(model, lr=lr, weight_decay=ADAM_WD, rank=16, interval=100,
                          projector_kwargs={"seed": seed})
        return Trainer(model, sa, cleanup=sa.projector.remove)
    if method == "muon":
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        hidden = {id(m.weight) for m in linears[:-1]}  # every 2-D weight but the classifier
        mu = [p for p in model.parameters() if id(p) in hidden]
        rest = [p for p in model.parameters() if id(p) not in hidden]
        muon = torch.optim.Muon(mu, lr=lr, weight_decay=ADAM_WD, adjust_lr_fn="match_rms_adamw")
        return Trainer(model, muon, extra=[torch.optim.AdamW(rest, lr=lr, weight_decay=ADAM_WD)])
    raise ValueError(f"unknown method {method!r}; known: {sorted(METHODS)}")


@torch.no_grad()
def accuracy(model: nn.Module, loader) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader.iter_epoch(0):
        correct += int((model(x).argmax(1) == y).sum())
        total += int(y.numel())
    model.train()
    return correct / total


def train_run(task: Task, method: str, lr: float, seed: int, data_cache: dict,
              select: bool) -> dict:
    """One run. ``select``: score on validation at the end (learning-rate choice); otherwise
    a test-accuracy curve every ``eval_every`` steps."""
    data = data_cache.get(seed)
    if data is None:
        data = data_cache[seed] = load_data(task.config(seed), torch.device("cpu"))
    torch.manual_seed(seed)
    model = build_model(task.model, in_channels=data.in_channels, num_classes=data.num_classes,
                        image_size=data.image_size, **task.model_kwargs)
    steps_per_epoch = len(data.train)
    tr = make_trainer(method, model, lr, steps_per_epoch, seed)
    model.train()
    curve: list[dict[str, float]] = []
    wall, step, diverged = 0.0, 0, False
    if not select:
        curve.append({"step": 0, "wall_s": 0.0, "test_acc": accuracy(model, data.test)})
    for epoch in range(task.epochs):
        for x, y in data.train.iter_epoch(epoch):
            t0 = time.perf_counter()
            tr.train_step(x, y)
            wall += time.perf_counter() - t0
            step += 1
            if not select and step % task.eval_every == 0:
                curve.append({"step": step, "wall_s": wall, "test_acc": accuracy(model, data.test)})
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            diverged = True
            break
    if tr.cleanup is not None:
        tr.cleanup()
    out: dict[str, Any] = {"method": method, "lr": lr, "seed": seed, "steps": step,
                           "train_wall_s": wall, "diverged": diverged}
    if select:
        out["val_acc"] = 0.0 if diverged else accuracy(model, data.val)
    else:
        if step % task.eval_every:
            curve.append({"step": step, "wall_s": wall, "test_acc": accuracy(model, data.test)})
        out["curve"] = curve
        out["final_test_acc"] = curve[-1]["test_acc"]
    return out


def timing_run(task: Task, lrs: dict[str, float], rounds: int, block: int = 100) -> dict:
    """Per-step cost of each method as a ratio to SGD, from interleaved blocks of ``block``
    consecutive steps (one warm-up round, then ``rounds`` timed rounds, rotating order)."""
    data = load_data(task.config(0), torch.device("cpu"))
    batches = []
    for x, y in data.train.iter_epoch(0):
        batches.append((x, y))
        if len(batches) == 16:
            break
    torch.manual_seed(0)
    model0 = build_model(task.model, in_channels=data.in_channels, num_classes=data.num_classes,
                         image_size=data.image_size, **task.model_kwargs)
    arms: dict[str, Trainer] = {}
    for m in METHODS:
        model = copy.deepcopy(model0).train()
        arms[m] = make_trainer(m, model, lrs[m], len(data.train), 0)
    counters = dict.fromkeys(arms, 0)
    times: dict[str, list[float]] = {m: [] for m in arms}
    names = list(arms)
    for r in range(rounds + 1):
        order = names[r % len(names):] + names[: r % len(names)]
        for m in order:
            t0 = time.perf_counter()
            for _ in range(block):
                x, y = batches[counters[m] % len(batches)]
                arms[m].train_step(x, y)
                counters[m] += 1
            if r:
                times[m].append((time.perf_counter() - t0) / block)
        print(f"  timing round {r}/{rounds}: " + ", ".join(
            f"{m} {1e3 * t[-1]:.1f}" for m, t in times.items() if t) + " ms/step", flush=True)
    for tr in arms.values():
        if tr.cleanup is not None:
            tr.cleanup()
    res: dict[str, Any] = {"block_steps": block, "rounds": rounds, "methods": {}}
    for m in arms:
        ratios = [a / b for a, b in zip(times[m], times["sgd"], strict=True)]
        res["methods"][m] = {"step_s": summary(times[m]), "ratio_to_sgd": summary(ratios)}
    res["sgd_step_s"] = statistics.median(times["sgd"])
    return res


def first_reach(curve: list[dict], key: str, target: float) -> float | None:
    for pt in curve:
        if pt["test_acc"] >= target:
            return float(pt[key])
    return None


def acc_at(curve: list[dict], key: str, budget: float) -> float:
    """Test accuracy at the last evaluation point within ``budget`` (of ``key``)."""
    best = curve[0]["test_acc"]
    for pt in curve:
        if pt[key] <= budget + 1e-12:
            best = pt["test_acc"]
    return best


def analyse(task_res: dict) -> dict:
    """Targets, time to target (ratio-based and raw), accuracy at equal time."""
    timing = task_res["timing"]
    t_sgd = timing["sgd_step_s"]
    runs = task_res["runs"]
    for r in runs:
        ratio = timing["methods"][r["method"]]["ratio_to_sgd"]["median"]
        for pt in r["curve"]:
            pt["ratio_time_s"] = pt["step"] * ratio * t_sgd
    sgd_final = statistics.mean(r["final_test_acc"] for r in runs if r["method"] == "sgd")
    targets = {f"{f:.2f}": f * sgd_final for f in TARGET_FRACTIONS}
    sgd_budget = statistics.mean(r["curve"][-1]["ratio_time_s"] for r in runs
                                 if r["method"] == "sgd")
    out: dict[str, Any] = {"sgd_final_mean": sgd_final, "targets": targets,
                           "targets_pct": {k: 100 * v for k, v in targets.items()},
                           "equal_time_budget_s": sgd_budget, "methods": {}}
    for m in METHODS:
        mr = [r for r in runs if r["method"] == m]
        if not mr:
            continue
        row: dict[str, Any] = {
            "lr": mr[0]["lr"], "seeds": [r["seed"] for r in mr],
            "step_ratio": timing["methods"][m]["ratio_to_sgd"]["median"],
            "final_test_acc": [r["final_test_acc"] for r in mr],
            "final_test_acc_mean": statistics.mean(r["final_test_acc"] for r in mr),
            "final_test_acc_std": statistics.stdev([r["final_test_acc"] for r in mr])
            if len(mr) > 1 else 0.0,
        }
        row["final_test_acc_mean_pct"] = 100 * row["final_test_acc_mean"]
        row["final_test_acc_std_pct"] = 100 * row["final_test_acc_std"]
        for name, tgt in targets.items():
            for key in ("step", "ratio_time_s", "wall_s"):
                hits = [first_reach(r["curve"], key, tgt) for r in mr]
                row[f"to_{name}_{key}"] = hits
                got = [h for h in hits if h is not None]
                row[f"to_{name}_{key}_median"] = statistics.median(got) if len(got) == len(hits) \
                    else None
            row[f"to_{name}_reached"] = f"{sum(h is not None for h in hits)}/{len(hits)}"
        for frac in (0.5, 1.0):
            accs = [acc_at(r["curve"], "ratio_time_s", frac * sgd_budget) for r in mr]
            row[f"acc_at_{frac:g}x_sgd_time_mean"] = statistics.mean(accs)
            row[f"acc_at_{frac:g}x_sgd_time_mean_pct"] = 100 * statistics.mean(accs)
            row[f"acc_at_{frac:g}x_sgd_time"] = accs
        out["methods"][m] = row
    return out


def _fmt(v: float | None, nd: int = 1) -> str:
    return "not reached" if v is None else f"{v:.{nd}f}"


def render(res: dict) -> str:
    """Markdown tables of the analysis (every number stored in the JSON)."""
    lines = []
    for tname, tr in res["tasks"].items():
        a = tr.get("analysis")
        if a is None:
            continue
        t = tr["task"]
        tg = a["targets_pct"]
        lines += [f"**{tname}** ({t['dataset']}, {t['model']} {t['model_kwargs']}, "
                  f"{t['subset']} training images, {t['epochs']} epochs, batch {t['batch']}; "
                  f"SGD's final mean {100 * a['sgd_final_mean']:.2f}%; targets "
                  f"{tg['0.97']:.2f}% and {tg['0.99']:.2f}%; SGD step "
                  f"{1e3 * tr['timing']['sgd_step_s']:.1f} ms in the timing run)", "",
                  "| method | lr (chosen on validation) | step / SGD (interleaved; median, IQR) | "
                  "final test acc, mean (sd) | to 0.97 target: steps / ratio-time s / raw s "
                  "(median) | to 0.99 target: steps / ratio-time s / raw s (median) | "
                  "reached 0.99 | acc at 0.5x SGD's time | acc at 1x SGD's time |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for m, row in a["methods"].items():
            acc = f"{row['final_test_acc_mean_pct']:.2f}% ({row['final_test_acc_std_pct']:.2f}%)"
            q = tr["timing"]["methods"][m]["ratio_to_sgd"]
            cost = f"{row['step_ratio']:.2f}x ({q['q1']:.2f}-{q['q3']:.2f})"
            cells = [m, f"`{row['lr']:g}`", cost, acc]
            for name in ("0.97", "0.99"):
                st = row[f"to_{name}_step_median"]
                cells.append("not reached by every seed" if st is None else
                             f"{st:.0f} / {_fmt(row[f'to_{name}_ratio_time_s_median'])} / "
                             f"{_fmt(row[f'to_{name}_wall_s_median'])}")
            cells += [row["to_0.99_reached"], f"{row['acc_at_0.5x_sgd_time_mean_pct']:.2f}%",
                      f"{row['acc_at_1x_sgd_time_mean_pct']:.2f}%"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in res["tasks"] if "analysis" in res["tasks"][t]]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 4.2 * len(tasks)), squeeze=False)
    colors = dict(zip(METHODS, plt.get_cmap("tab10").colors, strict=False))
    for i, t in enumerate(tasks):
        tr = res["tasks"][t]
        for j, (key, label) in enumerate((("ratio_time_s", "ratio-based time (s)"),
                                          ("wall_s", "raw wall-clock, shared machine (s)"))):
            ax = axes[i][j]
            for m in METHODS:
                mr = [r for r in tr["runs"] if r["method"] == m]
                if not mr:
                    continue
                n = min(len(r["curve"]) for r in mr)
                xs = [statistics.mean(r["curve"][q][key] for r in mr) for q in range(n)]
                ys = [100 * statistics.mean(r["curve"][q]["test_acc"] for r in mr)
                      for q in range(n)]
                ax.plot(xs, ys, label=f"{m} (lr {mr[0]['lr']:g})", color=colors[m])
            for name, tgt in tr["analysis"]["targets"].items():
                ax.axhline(100 * tgt, color="grey", ls="--", lw=0.8)
                ax.text(ax.get_xlim()[1], 100 * tgt, f" {name} x SGD", va="center",
                        fontsize=7, color="grey")
            if key == "ratio_time_s":  # the equal-time budget: SGD's whole run
                ax.axvline(tr["analysis"]["equal_time_budget_s"], color="k", ls=":", lw=0.8)
            lo = 100 * min(tr["analysis"]["targets"].values())
            ax.set_ylim(lo - 12, None)
            ax.set_xlabel(label)
            ax.set_ylabel("test accuracy (%), mean of seeds")
            ax.set_title(f"{t}: {label.split(' (')[0]}")
            ax.grid(alpha=0.3)
        axes[i][0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Time to accuracy (CPU, 1 thread, machine shared with other jobs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--select-seed", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny budget, one seed")
    ap.add_argument("--resume", action="store_true", help="reuse runs in the partial JSON")
    ap.add_argument("--retime", action="store_true",
                    help="redo the interleaved timing run of --tasks (earlier one kept on record)")
    ap.add_argument("--timing-rounds", type=int, default=None,
                    help="timed rounds of the timing run (default: per task)")
    ap.add_argument("--out", default="time_to_accuracy_cpu.json")
    ap.add_argument("--render", action="store_true",
                    help="measure nothing: recompute the analysis and plot from the JSON, "
                    "store them, print the Markdown tables")
    ap.add_argument("--plot", default=str(Path("docs") / "img" / "time_to_accuracy_cpu.png"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.render:
        res = json.loads((RESULTS / args.out).read_text())
        for tr in res["tasks"].values():
            if "timing" in tr and any(r["method"] == "sgd" for r in tr["runs"]):
                tr["analysis"] = analyse(tr)
        if args.plot:
            plot(res, Path(args.plot))
        write_json(args.out, res)
        print(render(res))
        return res
    tasks = {k: copy.deepcopy(TASKS[k]) for k in args.tasks}
    if args.quick:
        for t in tasks.values():
            t.subset, t.val, t.eval_subset, t.epochs, t.timing_rounds = 1000, 500, 500, 1, 1
        args.seeds = args.seeds[:1]
    path = RESULTS / args.out
    res: dict[str, Any] = {
        "command": "python benchmarks/time_to_accuracy.py " + " ".join(argv or sys.argv[1:]),
        "env": env_info(torch.device("cpu")), "seeds": args.seeds,
        "select_seed": args.select_seed, "lr_grids": {m: list(METHODS[m]) for m in args.methods},
        "weight_decay": {"sgd_family": SGD_WD, "adam_family": ADAM_WD},
        "target_fractions_of_sgd_final": list(TARGET_FRACTIONS),
        "machine_note": "2 CPU cores shared with four other agents' jobs; raw wall-clock noisy",
        # The dsbp package measured: when run from a snapshot (PYTHONPATH=<git archive of a
        # commit>/src, so that edits made meanwhile in a shared tree cannot change the code
        # under a running benchmark), DSBP_CODE_COMMIT names that commit.
        "dsbp_source": {"path": str(Path(dsbp.__file__).parent),
                        "commit": os.environ.get("DSBP_CODE_COMMIT", "working tree")},
        "tasks": {},
    }
    if args.resume and path.exists():
        old = json.loads(path.read_text())
        res["tasks"] = old.get("tasks", {})
        # the first invocation's record stays; later ones (resume, retime) are appended
        later = [*old.get("later_invocations", []),
                 {k: res[k] for k in ("command", "env", "dsbp_source")}]
        for k in ("command", "env", "dsbp_source"):
            res[k] = old.get(k, res[k])
        res["later_invocations"] = later

    def save() -> None:
        write_json(args.out, res)

    def cached(tr: dict, kind: str, m: str, lr: float, seed: int) -> dict | None:
        for r in tr.get(kind, []):
            if r["method"] == m and r["lr"] == lr and r["seed"] == seed:
                return r
        return None

    for tname, task in tasks.items():
        tr = res["tasks"].setdefault(tname, {})
        tr["task"] = {k: v for k, v in vars(task).items() if k != "notes"}
        tr.setdefault("select", [])
        tr.setdefault("runs", [])
        data_cache: dict = {}
        chosen: dict[str, float] = {}
        for m in args.methods:
            scores = {}
            for lr in METHODS[m]:
                r = cached(tr, "select", m, lr, args.select_seed)
                if r is None:
                    r = train_run(task, m, lr, args.select_seed, data_cache, select=True)
                    tr["select"].append(r)
                    save()
                scores[lr] = r["val_acc"]
                print(f"[{tname}] select {m} lr {lr:g}: val {r['val_acc']:.4f} "
                      f"({r['train_wall_s']:.1f}s)", flush=True)
            chosen[m] = max(scores, key=lambda k: scores[k])
        tr["lr_choice"] = chosen
        for m in args.methods:
            for seed in args.seeds:
                r = cached(tr, "runs", m, chosen[m], seed)
                if r is None:
                    r = train_run(task, m, chosen[m], seed, data_cache, select=False)
                    tr["runs"].append(r)
                    save()
                print(f"[{tname}] {m} lr {chosen[m]:g} seed {seed}: test "
                      f"{r['final_test_acc']:.4f} ({r['train_wall_s']:.1f}s)", flush=True)
        tr["runs"] = [r for r in tr["runs"] if r["method"] in args.methods
                      and r["lr"] == chosen[r["method"]] and r["seed"] in args.seeds]
        if args.retime or "timing" not in tr or set(tr["timing"]["methods"]) != set(METHODS):
            print(f"[{tname}] interleaved timing run", flush=True)
            if "timing" in tr:  # a retime keeps the earlier timing run on record
                tr.setdefault("earlier_timings", []).append(tr["timing"])
            tr["timing"] = timing_run(task, {**dict.fromkeys(METHODS, 0.01), **chosen},
                                      args.timing_rounds or task.timing_rounds)
            save()
        if "sgd" in args.methods:
            tr["analysis"] = analyse(tr)
        save()
    if args.plot and any("analysis" in t for t in res["tasks"].values()):
        plot(res, Path(args.plot))
        res["plot"] = args.plot
    save()
    for tname, tr in res["tasks"].items():
        if "analysis" not in tr:
            continue
        a = tr["analysis"]
        print(f"\n{tname}: SGD final {a['sgd_final_mean']:.4f}; targets {a['targets']}")
        for m, row in a["methods"].items():
            print(f"  {m:17s} lr {row['lr']:<7g} ratio {row['step_ratio']:.2f} final "
                  f"{row['final_test_acc_mean']:.4f} acc@1xSGD {row['acc_at_1x_sgd_time_mean']:.4f}"
                  f" to0.99 {row['to_0.99_ratio_time_s_median']} ({row['to_0.99_reached']})")
    print(f"-> {path}")
    return res


if __name__ == "__main__":
    main()
