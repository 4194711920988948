"""Issue 7 experiment driver: runs ``dsbp bench`` once per named configuration.

Each configuration is one ``dsbp bench`` invocation (so every number in the report comes from
the harness, with its run directories, results.csv and report.md) into
``results/dsbp_claims_cpu/<stage>/<name>``. Shards let two workers share the list on a 2-core CPU.

Usage::

    python scripts/dsbp_claims_sweep.py select_fm --shard 0/2
    python scripts/dsbp_claims_sweep.py final_fm --shard 1/2
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DSBP = [sys.executable, "-m", "dsbp.cli"]

# [ours] CPU-subset settings: "CPU subset: shows the trend, not the final figure".
COMMON = ["--model", "cnn", "--epochs", "3", "--batch-size", "128", "--lr", "0.05",
          "--schedule", "cosine", "--threads", "1", "--no-progress"]
DATA = {
    "fm": ["--datasets", "fashion_mnist", "--subset", "4000", "--val", "1000",
           "--eval-subset", "2000"],
    "c10": ["--datasets", "cifar10", "--subset", "4000", "--val", "1000",
            "--eval-subset", "2000"],
}
# DSBP at the paper's k = 10 and beta = 0.1; p = 20 (not 100) so that a ~100-step run sees
# several refreshes, as in the demo preset. [ours]
PAPER = ["--set", "rank=10", "--set", "interval=20", "--set", "sharpness=0.1"]


def _sets(**kw) -> list[str]:
    out = []
    for k, v in kw.items():
        out += ["--set", f"{k}={v}"]
    return out


CANDIDATES = {
    "sgd": ["--methods", "sgd"],
    "sam": ["--methods", "sam", "--set", "rho=0.05"],
    "dsbp": ["--methods", "dsbp", *PAPER],
    "dsbp_lr0.15": ["--methods", "dsbp", *PAPER, "--lr", "0.15"],
    "dsbp_rescale": ["--methods", "dsbp", *PAPER, *_sets(rescale="true")],
    "dsbp_res0.1": ["--methods", "dsbp", *PAPER, *_sets(residual=0.1)],
    "dsbp_res0.3": ["--methods", "dsbp", *PAPER, *_sets(residual=0.3)],
    "dsbp_res0.5": ["--methods", "dsbp", *PAPER, *_sets(residual=0.5)],
    "dsbp_skipfl": ["--methods", "dsbp", *PAPER, *_sets(skip_first_last="true")],
    "dsbp_warm30": ["--methods", "dsbp", *PAPER, *_sets(warmup=30)],
    "dsbp_k64_e0.9": ["--methods", "dsbp", *PAPER, *_sets(rank=64, energy=0.9)],
    "dsbp_k64_e0.99": ["--methods", "dsbp", *PAPER, *_sets(rank=64, energy=0.99)],
    "dsbp_rescale_skipfl": ["--methods", "dsbp", *PAPER,
                            *_sets(rescale="true", skip_first_last="true")],
    "dsbp_res0.3_rescale": ["--methods", "dsbp", *PAPER, *_sets(residual=0.3, rescale="true")],
    "dsbp_res0.3_skipfl": ["--methods", "dsbp", *PAPER,
                           *_sets(residual=0.3, skip_first_last="true")],
    # SAM with 2 of the 3 epochs: about DSBP's wall-clock (SAM costs two passes per step).
    "sam_2ep": ["--methods", "sam", "--set", "rho=0.05", "--epochs", "2"],
}

STAGES = {
    # Selection on the validation split, 2 seeds, every candidate.
    "select_fm": ("fm", list(CANDIDATES), 2, []),
    "select_c10": ("c10", list(CANDIDATES), 2, []),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", help=f"one of {sorted(STAGES)} or final_<data>:<name,name,...>")
    ap.add_argument("--shard", default="0/1", help="i/n: run every n-th configuration from i")
    ap.add_argument("--seeds", type=int, help="override the stage's seed count")
    ap.add_argument("--track", help="--track value for dsbp bench (e.g. hessian)")
    ap.add_argument("--only", help="comma-separated subset of configuration names")
    args = ap.parse_args()
    if args.stage in STAGES:
        data, names, seeds, extra = STAGES[args.stage]
    else:  # e.g. final_fm:sgd,sam,dsbp,dsbp_rescale
        head, _, tail = args.stage.partition(":")
        data, names, seeds, extra = head.split("_", 1)[1], tail.split(","), 3, []
    if args.seeds:
        seeds = args.seeds
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    i, n = (int(v) for v in args.shard.split("/"))
    stage_dir = args.stage.split(":")[0]
    for name in names[i::n]:
        out = ROOT / "results" / "dsbp_claims_cpu" / stage_dir / name
        if (out / "results.csv").exists():
            print(f"skip {name} (done)", flush=True)
            continue
        cmd = [*DSBP, "bench", *DATA[data], *COMMON, *CANDIDATES[name], *extra,
               "--seeds", str(seeds), "--out", str(out), "--resume",
               "--label", f"issue 7 {stage_dir}/{name}: CPU subset, shows the trend, "
               "not the final figure"]
        if args.track:
            cmd += ["--track", args.track]
        t0 = time.time()
        print("$", shlex.join(cmd[2:]), flush=True)
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        print(f"{name}: rc={rc} in {time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
