"""Issue 7: wall-clock cost per training step of SGD, SAM, DSBP and DSBP-tuned, measured
interleaved in one process so that every method sees the same (shared, noisy) CPU load.

The harness's ``wall_s`` of runs that ran at different times on a 2-core CPU shared with other
jobs differs by 2-3x for the same work, so the wall-clock targets are judged on this instead:
rounds of ``BLOCK`` steps per method (one DSBP refresh per block when ``interval = BLOCK``),
methods in turn, ``ROUNDS`` rounds; the median block time per method and its ratio to SGD's.
Methods are built by the harness (``dsbp.experiments.build``) with the issue-7 final settings.
Both wall time (``time.perf_counter``) and this process's CPU time (``time.process_time``)
are reported. CPU subset: shows the trend, not the final figure.

Usage::

    python scripts/dsbp_claims_timing.py fashion_mnist cifar10
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from dsbp.data import load_dataset
from dsbp.experiments.build import (
    BuildContext,
    build_loss,
    build_method,
    build_model_for,
    load_data,
)
from dsbp.experiments.config import RunConfig

BLOCK, ROUNDS = 20, 3
METHODS = {  # name: (registered method, method_kwargs)
    "sgd": ("sgd", {}),
    "sam": ("sam", {"rho": 0.05}),
    "dsbp": ("dsbp", {"rank": 10, "interval": BLOCK, "sharpness": 0.1}),
    "dsbp_tuned": ("dsbp_tuned", {"rank": 10, "interval": BLOCK, "sharpness": 0.1}),
}


def time_dataset(name: str) -> dict:
    ds = load_dataset(name)
    base = RunConfig(dataset=name, model="cnn", batch_size=128, lr=0.05, subset=4000, epochs=1)
    state = {}
    for label, (method, kw) in METHODS.items():
        cfg = base.replace(method=method, method_kwargs=kw)
        data = load_data(cfg, torch.device("cpu"), dataset=ds)
        model = build_model_for(cfg, data)
        loss_fn = build_loss(cfg)
        ctx = BuildContext(loss_fn=loss_fn, train=data.train, device=torch.device("cpu"),
                           num_classes=data.num_classes)
        m = build_method(model, cfg, ctx)
        batches = list(data.train.iter_epoch(0))[:BLOCK]
        state[label] = (m, loss_fn, batches)
    wall = {k: [] for k in METHODS}
    cpu = {k: [] for k in METHODS}
    for _ in range(ROUNDS):
        for label, (m, loss_fn, batches) in state.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for x, y in batches:
                m.optimizer.zero_grad(set_to_none=True)

                def closure(x=x, y=y, m=m, loss_fn=loss_fn):
                    loss = loss_fn(m.model(x), y)
                    loss.backward()
                    return loss

                if m.closure_step:
                    m.optimizer.step(closure)
                else:
                    closure()
                    m.optimizer.step()
            wall[label].append(time.perf_counter() - t0)
            cpu[label].append(time.process_time() - c0)
    out = {"dataset": name, "block_steps": BLOCK, "rounds": ROUNDS, "methods": {}}
    for label in METHODS:
        w, c = statistics.median(wall[label]), statistics.median(cpu[label])
        out["methods"][label] = {
            "wall_s_per_step": w / BLOCK, "cpu_s_per_step": c / BLOCK,
            "wall_ratio_to_sgd": w / statistics.median(wall["sgd"]),
            "cpu_ratio_to_sgd": c / statistics.median(cpu["sgd"]),
            "wall_blocks": wall[label], "cpu_blocks": cpu[label]}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("datasets", nargs="+")
    ap.add_argument("--out", default="results/dsbp_claims_cpu/timing.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    res = [time_dataset(d) for d in args.datasets]
    Path(args.out).write_text(json.dumps(res, indent=1))
    for r in res:
        for k, v in r["methods"].items():
            print(f"{r['dataset']:14s} {k:11s} wall {1000 * v['wall_s_per_step']:7.1f} ms/step "
                  f"(x{v['wall_ratio_to_sgd']:.2f} SGD)  cpu {1000 * v['cpu_s_per_step']:7.1f} "
                  f"ms/step (x{v['cpu_ratio_to_sgd']:.2f} SGD)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
