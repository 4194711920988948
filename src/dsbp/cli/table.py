"""``dsbp table``: the paper's comparison table in one command (:mod:`dsbp.experiments.table`).

Also reached as ``dsbp bench --preset table`` (the CPU variant) and ``--preset table_gpu``;
``dsbp report OUT`` on a table folder remakes its report from the committed files.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

DEFAULT_TIMINGS = "benchmarks/results/step_overhead_resnet18_cuda_bf16.json"
DEFAULT_RUNS = "results/dsbp_claims_gpu"


def _csv(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def add_parser(sub: Any) -> None:
    """``dsbp table``: the subcommand's parser (loaded by ``dsbp.cli`` when invoked)."""
    from dsbp.experiments.table import VARIANTS

    p = sub.add_parser(
        "table", help="the paper's comparison table (4 data sets x every baseline)",
        description="Run the paper's comparison table: rows CIFAR-10, Fashion-MNIST, MedMNIST "
        "(BreastMNIST), Tiny ImageNet; columns SGD, SAM, LoRA (fine-tuning a pretrained "
        "network), MAML (episodes), DSBP at the paper's settings and at the recommended "
        "configuration, and the paper's claim. Writes OUT/report.md, OUT/results.csv and "
        "OUT/table.png; `dsbp report OUT` remakes them from the run files.")
    p.add_argument("--variant", choices=sorted(VARIANTS), default="cpu",
                   help="cpu: SmallCNN on subsets (~1 h on 2 cores); gpu: ResNet-18, full sets")
    p.add_argument("--out", help="output folder (default runs/table_<variant>)")
    p.add_argument("--seeds", type=int, help="number of seeds (default the variant's: 3)")
    p.add_argument("--datasets", type=_csv, help="a subset of the rows (registry names)")
    p.add_argument("--protocols", type=_csv, default=["supervised", "transfer", "fewshot"],
                   help="supervised,transfer,fewshot (default); ablation adds the k and p "
                   "ablations and the pruning ablation (after supervised)")
    p.add_argument("--data-root", help="folder with the data files (default: the data search)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted table")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--estimate", metavar="TIMINGS_JSON", nargs="?", const=DEFAULT_TIMINGS,
                   help="print the variant's training-time estimate from a step benchmark "
                   f"JSON (default {DEFAULT_TIMINGS}) and exit")
    p.add_argument("--runs-timings", metavar="FOLDER", default=DEFAULT_RUNS,
                   help="with --estimate: also estimate from the measured speed of the "
                   f"finished runs under FOLDER (default {DEFAULT_RUNS}; '' to skip)")
    p.set_defaults(func=cmd_table)


def cmd_table(args: argparse.Namespace) -> int:
    """``dsbp table ...``."""
    from dsbp.experiments.table import (
        TaskLoader,
        get_variant,
        gpu_estimate,
        gpu_estimate_from_runs,
        run_table,
    )

    spec = get_variant(args.variant)
    if args.seeds is not None:
        if args.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
        spec = dataclasses.replace(spec, seeds=args.seeds)
    if args.estimate:
        est = gpu_estimate(spec, args.estimate, TaskLoader(args.data_root))
        for r in est["rows"]:
            print(f"{r['dataset']}: {r['train_images']} training images, {r['steps_per_run']} "
                  f"steps per run: {r['hours']:.2f} h")
        print(f"total: {est['hours']:.1f} h of training on {est['device']} (from "
              f"{est['timings']}: step benchmark, batch {est['batch']}; a lower bound: "
              "no data loading; evaluation and MAML not counted)")
        if args.runs_timings:
            runs = gpu_estimate_from_runs(spec, args.runs_timings, TaskLoader(args.data_root))
            per = ", ".join(f"{m} {1e6 * v:.0f}" for m, v in sorted(runs["per_image"].items())
                            if m in ("sgd", "sam", "dsbp", "dsbp_tuned"))
            print(f"from {runs['runs']} finished runs under {runs['root']} ({per} us per "
                  f"image; {', '.join(runs['devices'])}; batch {runs['batch']}): "
                  + ", ".join(f"{r['dataset']} {r['hours']:.2f} h" for r in runs["rows"])
                  + f"; total {runs['hours']:.1f} h (evaluation and MAML not counted)")
        return 0
    out = args.out or f"runs/table_{spec.name}"
    made = run_table(spec, out, resume=args.resume, datasets=args.datasets,
                     protocols=args.protocols, progress=not args.no_progress,
                     command=getattr(args, "command_line", None), data_root=args.data_root)
    print("wrote " + ", ".join(str(v) for v in made.values()))
    return 0


def bench_table(args: argparse.Namespace) -> int:
    """``dsbp bench --preset table`` / ``table_gpu``: the table driver with the bench flags
    it understands (``--out``, ``--seeds``, ``--datasets``, ``--data-root``, ``--resume``,
    ``--no-progress``); other grid flags are refused rather than ignored."""
    ignored = [f"--{k.replace('_', '-')}" for k in ("methods", "model", "epochs", "batch_size",
                                                    "lr", "subset", "eval_subset", "track")
               if getattr(args, k, None)]
    ignored += ["--ablate"] if getattr(args, "ablate", None) else []
    ignored += ["--set"] if getattr(args, "sets", None) else []
    if ignored:
        raise ValueError(f"--preset {args.preset} fixes its own grid; {', '.join(ignored)} "
                         "cannot change it (use `dsbp bench` without the preset)")
    ns = argparse.Namespace(
        variant="gpu" if args.preset == "table_gpu" else "cpu", out=args.out,
        seeds=args.seeds, datasets=args.datasets, data_root=args.data_root,
        protocols=["supervised", "transfer", "fewshot"], resume=args.resume,
        no_progress=args.no_progress, estimate=None, runs_timings=None,
        command_line=getattr(args, "command_line", None))
    return cmd_table(ns)


__all__ = ["add_parser", "bench_table", "cmd_table"]
