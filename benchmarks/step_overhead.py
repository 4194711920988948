"""DSBP step overhead against its base optimizer, measured as ratios in one interleaved run.

Arms (each its own model copy, same initialisation, same real data batches):

* ``base``: the base optimizer alone (SGD, momentum 0.9).
* ``dsbp``: DSBP around the same base, the default path (``path="auto"``: the per-weight loop on
  a CPU, the CUDA graph on a GPU), no refresh inside the timed steps (the first step refreshes,
  then ``interval`` is effectively infinite).
* ``dsbp_loop`` (GPU only; on a CPU it is the default): ``path="loop"``.
* ``dsbp_stacked``: ``path="stacked"``, same-shaped weights in batched products launched from
  Python every step (the eager GPU path).
* ``dsbp_refresh``: DSBP with ``interval=1``: every step captures activations and re-solves the
  eigenproblem. ``(t_refresh - t_dsbp) / p`` is the refresh cost amortised over ``p`` steps.
* ``dsbp_refresh_layer`` (GPU only): the same with the per-weight refresh (``path="loop"``)
  instead of the batched one.

Each repeat runs one full training step (forward + backward + optimizer step) of every arm, in
a rotating order, timing forward+backward and the optimizer step separately. Reported: medians
and IQRs of times and of per-repeat ratios.

CPU (default): ``python benchmarks/step_overhead.py --model cnn`` and ``--model resnet18``.
GPU: ``python benchmarks/step_overhead.py --model resnet18 --width 1 --device cuda --dtype bf16
--batch 512``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DTYPES, env_info, image_batches, summary, timed, write_json  # noqa: E402

from dsbp import DSBP  # noqa: E402
from dsbp.models.registry import build_model  # noqa: E402

NEVER = 10**9  # an interval no benchmark reaches: no refresh after the first step


def build(args) -> tuple[torch.nn.Module, str, int, int]:
    if args.model == "cnn":
        return build_model("cnn", 1, 10, 28, width=args.width_cnn), "bundled", 1, 28
    return build_model("resnet18", 3, 10, 32, width=args.width), "cifar10", 3, 32


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("cnn", "resnet18"), default="cnn")
    ap.add_argument("--width", type=float, default=0.25, help="ResNet-18 width multiplier")
    ap.add_argument("--width-cnn", type=int, default=32, help="SmallCNN width")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rank", type=int, default=10)
    ap.add_argument("--p", type=int, default=100, help="refresh interval to amortise over")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                    help="autocast dtype of forward/backward (fp32: no autocast)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    ap.add_argument("--block", type=int, default=0,
                    help="also time blocks of this many consecutive full steps per arm with no "
                    "synchronisation inside a block (as a training loop runs: on a GPU the host "
                    "queues the optimizer step behind backward), arms rotated per block; "
                    "0: skip (default)")
    ap.add_argument("--blocks", type=int, default=20, help="timed blocks per arm (with --block)")
    ap.add_argument("--out", default=None, help="results JSON name under benchmarks/results/")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model0, dataset, _, _ = build(args)
    model0 = model0.to(device)
    if device.type == "cuda":
        model0 = model0.to(memory_format=torch.channels_last)
    batches = image_batches(dataset, args.batch, 8, device)
    dtype = DTYPES[args.dtype]
    amp = dtype != torch.float32

    def make(arm: str):
        m = copy.deepcopy(model0)
        kw = dict(lr=0.01, momentum=0.9)
        if arm == "base":
            return m, torch.optim.SGD(m.parameters(), **kw)
        interval = 1 if arm.startswith("dsbp_refresh") else NEVER
        path = {"dsbp_loop": "loop", "dsbp_stacked": "stacked",
                "dsbp_refresh_layer": "loop"}.get(arm, "auto")
        opt = DSBP(m, torch.optim.SGD, rank=args.rank, interval=interval, path=path, **kw)
        return m, opt

    variants: tuple[str, ...] = ("dsbp", "dsbp_stacked")
    if device.type == "cuda":
        variants = ("dsbp", "dsbp_stacked", "dsbp_loop")
    refreshes = ("dsbp_refresh", "dsbp_refresh_layer") if device.type == "cuda" \
        else ("dsbp_refresh",)
    arms = {a: make(a) for a in ("base", *variants, *refreshes)}
    times: dict[str, dict[str, list[float]]] = {a: {"fb": [], "step": []} for a in arms}
    it = 0

    def one_step(arm: str, record: bool) -> None:
        nonlocal it
        m, opt = arms[arm]
        x, y = batches[it % len(batches)]

        def fb():
            with torch.autocast(device.type, dtype=dtype, enabled=amp):
                loss = F.cross_entropy(m(x), y)
            loss.backward()

        t_fb = timed(fb, device)
        t_st = timed(opt.step, device)
        opt.zero_grad(set_to_none=True)
        if record:
            times[arm]["fb"].append(t_fb)
            times[arm]["step"].append(t_st)

    names = list(arms)
    for r in range(args.warmup + args.repeats):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate: no arm always first
        for a in order:
            one_step(a, r >= args.warmup)
        it += 1

    # Block timing [ours]: the per-step timing above synchronises between backward and the
    # optimizer step, which on a GPU exposes the host's kernel-launch time of the step; a
    # training loop never waits there. Here each arm runs `block` consecutive steps between
    # two synchronisations (dsbp_refresh excluded: its per-step eigensolve syncs anyway).
    blocks: dict[str, list[float]] = {a: [] for a in ("base", *variants)}
    if args.block:
        bnames = list(blocks)

        def run_block(arm: str) -> float:
            nonlocal it
            m, opt = arms[arm]

            def steps():
                nonlocal it
                for _ in range(args.block):
                    x, y = batches[it % len(batches)]
                    with torch.autocast(device.type, dtype=dtype, enabled=amp):
                        loss = F.cross_entropy(m(x), y)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    it += 1

            return timed(steps, device) / args.block

        for r in range(1 + args.blocks):  # the first round is warm-up
            order = bnames[r % len(bnames):] + bnames[: r % len(bnames)]
            for a in order:
                t = run_block(a)
                if r:
                    blocks[a].append(t)

    def full(a: str) -> list[float]:
        return [f + s for f, s in zip(times[a]["fb"], times[a]["step"], strict=True)]

    def ratio(num: list[float], den: list[float]) -> dict:
        return summary([n / d for n, d in zip(num, den, strict=True)])

    res: dict = {"args": vars(args), "env": env_info(device), "arms": {}}
    for a in arms:
        res["arms"][a] = {"fwd_bwd_s": summary(times[a]["fb"]), "step_s": summary(times[a]["step"]),
                          "full_s": summary(full(a))}
    base_full, base_step = full("base"), times["base"]["step"]
    for a in variants:
        res[f"{a}_full_ratio"] = ratio(full(a), base_full)
        res[f"{a}_step_ratio"] = ratio(times[a]["step"], base_step)
    # Lower-noise estimate: forward+backward is the same code in every arm (the hooks return
    # at once off refresh steps), so pool it from all arms and add each arm's optimizer step.
    fb_all = statistics.median([t for a in ("base", *variants) for t in times[a]["fb"]])
    for a in variants:
        res[f"{a}_full_ratio_pooled_fwd_bwd"] = (
            (fb_all + statistics.median(times[a]["step"]))
            / (fb_all + statistics.median(base_step)))
        res[f"{a}_step_extra_ms"] = 1e3 * (statistics.median(times[a]["step"])
                                           - statistics.median(base_step))
    # refresh cost per refresh, and its share of a base training step when spread over p steps
    refresh_extra = [r - d for r, d in zip(full("dsbp_refresh"), full("dsbp"), strict=True)]
    res["refresh_cost_s"] = summary(refresh_extra)
    res["refresh_amortised_fraction"] = summary(
        [e / args.p / b for e, b in zip(refresh_extra, base_full, strict=True)])
    if "dsbp_refresh_layer" in arms:  # the per-layer refresh, for comparison (GPU only)
        extra = [r - d for r, d in zip(full("dsbp_refresh_layer"), full("dsbp"), strict=True)]
        res["refresh_layer_cost_s"] = summary(extra)
        res["refresh_layer_amortised_fraction"] = summary(
            [e / args.p / b for e, b in zip(extra, base_full, strict=True)])
    med = res["dsbp_full_ratio"]["median"] + res["refresh_amortised_fraction"]["median"]
    res["dsbp_full_ratio_with_refresh_median"] = med
    if args.block:
        res["block"] = {"steps_per_block": args.block, "blocks": args.blocks}
        for a in blocks:
            res["block"][f"{a}_step_s"] = summary(blocks[a])
        for a in variants:
            # blocks of one round are adjacent in time: pair them for the ratio
            res["block"][f"{a}_ratio"] = ratio(blocks[a], blocks["base"])
        res["block"]["dsbp_ratio_with_refresh_median"] = (
            res["block"]["dsbp_ratio"]["median"] + res["refresh_amortised_fraction"]["median"])
    name = args.out or f"step_overhead_{args.model}_{device.type}_{args.dtype}.json"
    path = write_json(name, res)
    print(f"{args.model} {device.type} {args.dtype} batch {args.batch}: "
          f"base full {statistics.median(base_full) * 1e3:.1f} ms")
    for a in variants:
        fr, sr = res[f"{a}_full_ratio"], res[f"{a}_step_ratio"]
        print(f"  {a:10s} full-step ratio {fr['median']:.3f} (IQR {fr['q1']:.3f}-{fr['q3']:.3f}),"
              f" optimizer-step ratio {sr['median']:.2f}, pooled-fwd/bwd full ratio "
              f"{res[a + '_full_ratio_pooled_fwd_bwd']:.4f} (+{res[a + '_step_extra_ms']:.2f} ms)")
    print(f"  refresh: {res['refresh_cost_s']['median'] * 1e3:.1f} ms each, amortised over "
          f"p={args.p}: {100 * res['refresh_amortised_fraction']['median']:.2f}% of a base step")
    if "refresh_layer_cost_s" in res:
        ms = res["refresh_layer_cost_s"]["median"] * 1e3
        print(f"  per-layer refresh (not batched): {ms:.1f} ms each, "
              f"{100 * res['refresh_layer_amortised_fraction']['median']:.2f}%")
    if args.block:
        b = res["block"]
        print(f"  block timing ({args.block} steps, no sync inside): base "
              f"{b['base_step_s']['median'] * 1e3:.2f} ms/step")
        for a in variants:
            br = b[f"{a}_ratio"]
            print(f"  {a:10s} block ratio {br['median']:.4f} (IQR {br['q1']:.4f}-{br['q3']:.4f})")
        print(f"  dsbp block ratio + amortised refresh: {b['dsbp_ratio_with_refresh_median']:.4f}")
    print(f"  -> {path}")
    return res


if __name__ == "__main__":
    main()
