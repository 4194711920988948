"""``dsbp bench``, ``dsbp demo`` and ``dsbp report``: flags, and how they become a grid.

Flags mean what they say: an explicit flag (``--lr``, ``--set rho=...``) beats the preset's
per-method value; ``--set`` / ``--ablate`` keys must exist and values are typed
(:mod:`dsbp.experiments.settings`); a flag the chosen runner does not read is refused.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

__all__ = ["add_bench", "add_demo", "add_report", "cmd_bench", "cmd_demo", "cmd_report"]


def _csv(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def add_bench(sub: Any) -> None:
    """``dsbp bench``: the subcommand's parser."""
    p = sub.add_parser(
        "bench", help="run a grid of training runs and write results.csv, report.md, plots",
        description="Run data sets x methods x ablations x seeds; each run gets a directory "
        "under OUT/runs with config.json, env.json, metrics.jsonl and checkpoint.pt.",
    )
    p.add_argument("--preset", choices=("smoke", "demo", "paper", "table", "table_gpu"),
                   help="start from a named grid (flags below override it)")
    p.add_argument("--datasets", type=_csv, help="comma-separated data set names")
    p.add_argument("--methods", type=_csv, help="comma-separated method names")
    p.add_argument("--model", help="model name (cnn, mlp, resnet18, vit)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--seeds", type=int, help="number of seeds: runs seeds 0..N-1")
    p.add_argument("--first-seed", type=int, default=0,
                   help="runs seeds F..F+N-1 instead (e.g. one seed per parallel worker)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate (eta)")
    p.add_argument("--schedule", choices=("constant", "cosine", "linear", "onecycle"))
    p.add_argument("--warmup", type=float, dest="warmup_frac", help="warm-up fraction of steps")
    p.add_argument("--subset", type=int, help="train on a class-balanced subset of N images")
    p.add_argument("--eval-subset", type=int, help="evaluate on a class-balanced subset")
    p.add_argument("--val", type=int, dest="val_split", metavar="N",
                   help="hold out a class-balanced validation split of N training images "
                   "(logged as val_acc / val_loss; choose settings on it, not on test)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"))
    p.add_argument("--data-root", help="folder with the data files (default: the data search)")
    p.add_argument("--ablate", action="append", default=[], metavar="KEY=V1,V2",
                   help="sweep a setting (config field or method setting); repeatable")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="set a config field or method setting, e.g. --set rho=0.1; repeatable")
    p.add_argument("--track", type=_csv, help="diagnostics per epoch: spectrum, hessian, ...")
    p.add_argument("--out", help="output folder (default: runs/<preset or bench>)")
    p.add_argument("--label", help="one line describing the setting, shown atop report.md")
    p.add_argument("--resume", action="store_true",
                   help="continue interrupted runs in OUT and skip finished ones")
    p.add_argument("--nproc", type=int, default=1,
                   help="data-parallel processes per run (DDP; gloo on CPU, nccl with N GPUs): "
                   "each takes batch_size/N examples of every global batch; methods sgd, "
                   "adamw, sam, dsbp, dsbp_input, dsbp_tuned (see docs/distributed.md)")
    p.add_argument("--fsdp", action="store_true",
                   help="with --nproc N / torchrun: shard each model with FSDP2 (fully_shard per "
                   "block and at the root) instead of DDP; no checkpoints (docs/distributed.md)")
    p.add_argument("--threads", type=int,
                   help="torch intra-op CPU threads (default: torch's; recorded in env.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    from dsbp.cli.posthoc import add_bench_options

    add_bench_options(p)  # --prune T1,T2 / --shift KINDS ...: post-training analyses
    p.set_defaults(func=cmd_bench, bench_defaults=p.parse_args([]))


def _grid_from_args(args: argparse.Namespace) -> tuple[list[Any], str | None]:
    """The grid the bench flags describe, and its preset name."""
    from dsbp.experiments.config import RunConfig, get_preset, with_setting
    from dsbp.experiments.settings import check_trackers, parse_ablations, parse_assignments
    from dsbp.experiments.sweep import expand_grid

    preset = get_preset(args.preset) if args.preset else None
    base = preset.base if preset else RunConfig()
    datasets = args.datasets or (list(preset.datasets) if preset else ["bundled"])
    methods = args.methods or (list(preset.methods) if preset else ["sgd", "dsbp"])
    n_seeds = args.seeds if args.seeds is not None else (preset.seeds if preset else 1)
    if n_seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {n_seeds}")
    flags = {"model": args.model, "epochs": args.epochs, "batch_size": args.batch_size,
             "lr": args.lr, "schedule": args.schedule, "warmup_frac": args.warmup_frac,
             "subset": args.subset, "eval_subset": args.eval_subset, "augment": args.augment,
             "val_split": args.val_split,
             "device": args.device, "amp": args.amp, "data_root": args.data_root,
             "track": tuple(args.track) if args.track else None,
             "sharding": "fsdp2" if getattr(args, "fsdp", False) else None}
    explicit = {k: v for k, v in flags.items() if v is not None}
    if args.track:
        check_trackers(args.track)
    sets = parse_assignments(args.sets, methods)
    both = sorted(set(sets) & set(explicit))
    if both:
        raise ValueError(f"{', '.join(both)} given both as a flag and with --set")
    explicit.update(sets)
    for key, value in explicit.items():
        base = with_setting(base, key, value)
    from dsbp.experiments.run import check_data_root

    check_data_root(base)  # a --data-root that does not exist is an error, not a fallback
    ablations = parse_ablations(args.ablate, methods)
    # Explicit flags (and ablated values) beat the preset's per-method values.
    overrides = {m: {k: v for k, v in kw.items() if k not in explicit and k not in ablations}
                 for m, kw in (preset.method_overrides.items() if preset else ())}
    if args.first_seed < 0:
        raise ValueError(f"--first-seed must be >= 0, got {args.first_seed}")
    seeds = list(range(args.first_seed, args.first_seed + n_seeds))
    runs = expand_grid(base, datasets, methods, seeds, ablations, overrides)
    return runs, (preset.name if preset else None)


def cmd_bench(args: argparse.Namespace) -> int:
    """``dsbp bench``: run the grid; exit status 1 if any run raised (status ``error``)."""
    from dsbp.experiments.sweep import bench

    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    if args.preset in ("table", "table_gpu"):  # the comparison table: its own driver
        from dsbp.cli.table import bench_table

        return bench_table(args)
    if args.methods and set(args.methods) & {"maml", "spectral_maml"}:
        from dsbp.cli.fewshot import bench_fewshot

        if _torchrun_world_size() > 1:
            raise ValueError("few-shot methods run in one process; drop --nproc / torchrun")
        return bench_fewshot(args, args.bench_defaults)
    from dsbp.cli.posthoc import bench_analyses

    analyses = bench_analyses(args)  # --prune / --ablate prune=... / --shift: after training
    if analyses and (args.nproc > 1 or _torchrun_world_size() > 1):
        names = " and ".join(f"--{a.name}" for a, _ in analyses)
        raise ValueError(f"{names} run after single-process benches only; with --nproc > 1 "
                         f"run `dsbp {analyses[0][0].name} OUT ...` on the output folder "
                         "afterwards")
    runs, preset = _grid_from_args(args)
    from dsbp.experiments.config import get_preset

    threads = (args.threads if args.threads is not None
               else get_preset(preset).threads if preset else None)
    out = args.out or f"runs/{preset or 'bench'}"
    label = args.label or (get_preset(preset).note if preset else None)
    meta = {"command": args.command_line, "preset": preset, "label": label}
    launched = _torchrun_world_size()
    if launched > 1:
        if args.nproc != 1:
            raise ValueError(f"--nproc {args.nproc} under torchrun: the {launched} processes "
                             "are torchrun's; drop --nproc")
        return _bench_under_torchrun(runs, out, meta, args, threads, launched)
    if args.nproc > 1:
        return _bench_multiprocess(runs, out, meta, args, threads)
    if getattr(args, "fsdp", False):
        raise ValueError("--fsdp shards a model over several processes: add --nproc N (N > 1) "
                         "or start under torchrun")
    _set_threads(threads)
    print(f"dsbp bench: {len(runs)} runs -> {out}")
    made = bench(runs, out, meta=meta, resume=args.resume, progress=not args.no_progress)
    if analyses:
        from dsbp.experiments.atomic import FolderLock
        from dsbp.experiments.sweep import finish

        with FolderLock(out):
            for analysis, settings in analyses:
                analysis.apply(out, resume=args.resume, **settings)
            made = {**made, **finish(out)}
    _print_table(made["results"])
    print(f"wrote {made['csv']}, {made['report']}, " + ", ".join(map(str, made["plots"])))
    return 1 if any(res.status == "error" for _, res in made["results"]) else 0


def _bench_multiprocess(runs: Sequence[Any], out: str, meta: dict[str, Any],
                        args: argparse.Namespace, threads: int | None) -> int:
    """``dsbp bench --nproc N``: the grid in N data-parallel processes (see
    :func:`_bench_worker`); the results are read back from the run directories."""
    from dsbp.experiments.atomic import FolderLock
    from dsbp.experiments.sweep import preflight
    from dsbp.optim.distributed import launch

    backend = _check_ddp_grid(runs, args.nproc, out, args.resume)
    with FolderLock(out):  # held here for the workers (they do not lock)
        preflight(runs, out, args.resume)  # refuse before any process starts
        print(f"dsbp bench: {len(runs)} runs x {args.nproc} processes ({backend}) -> {out}")
        # [ours] 1 torch thread per process unless --threads says otherwise: N processes on a
        # CPU already use N cores.
        launch(_bench_worker, args.nproc,
               args=(list(runs), out, meta, args.resume, not args.no_progress,
                     threads if threads is not None else 1, False), backend=backend)
    return _report_from_dirs(runs, out)


def _check_ddp_grid(runs: Sequence[Any], nproc: int, out: str, resume: bool) -> str:
    """Fail before any process starts on what the configs decide; return the backend:
    nccl for CUDA runs with at least ``nproc`` GPUs, else gloo."""
    from pathlib import Path

    import torch

    from dsbp.experiments.build import resolve_device
    from dsbp.experiments.run import check_ddp

    for gr in runs:
        check_ddp(gr.cfg, nproc)
    kinds = {resolve_device(gr.cfg.device).type for gr in runs}
    if len(kinds) > 1:
        raise ValueError(f"a multi-process grid needs one device type, got {sorted(kinds)}")
    runs_dir = Path(out) / "runs"
    if not resume and runs_dir.exists() and any(runs_dir.iterdir()):
        raise FileExistsError(f"{runs_dir} already holds runs; pass --resume to continue them "
                              "or choose another --out")
    return "nccl" if kinds == {"cuda"} and torch.cuda.device_count() >= nproc else "gloo"


def _torchrun_world_size() -> int:
    """WORLD_SIZE when this process was started by torchrun (which sets it and
    TORCHELASTIC_RUN_ID), else 1."""
    import os

    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return 1
    return int(os.environ.get("WORLD_SIZE", "1"))


def _bench_under_torchrun(runs: Sequence[Any], out: str, meta: dict[str, Any],
                          args: argparse.Namespace, threads: int | None, world_size: int) -> int:
    """``torchrun --nproc_per_node=N -m dsbp.cli bench ...``: this process is one rank."""
    import os

    import torch
    import torch.distributed as dist

    backend = _check_ddp_grid(runs, world_size, out, args.resume)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    rank = dist.get_rank()
    try:
        if rank == 0:
            print(f"dsbp bench: {len(runs)} runs x {world_size} torchrun processes "
                  f"({backend}) -> {out}")
        _bench_worker(rank, world_size, list(runs), out, meta, args.resume,
                      not args.no_progress, threads if threads is not None else 1)
        dist.barrier()  # rank 0 has written every file
    finally:
        dist.destroy_process_group()
    if rank != 0:
        return 0
    return _report_from_dirs(runs, out)


def _report_from_dirs(runs: Sequence[Any], out: str) -> int:
    """Print the results table from the run directories; 1 if any run has status error."""
    import math
    from pathlib import Path

    from dsbp.experiments.run import RunResult, read_result

    runs_dir = Path(out) / "runs"
    results = []
    for gr in runs:
        try:
            res = read_result(runs_dir / gr.name)
        except ValueError as err:  # an unreadable result.json, named
            res = RunResult("error", math.nan, math.nan, 0.0, 0, 0, str(err))
        if res is None:
            res = RunResult("error", math.nan, math.nan, 0.0, 0, 0,
                            "not run (see the messages above)")
        results.append((gr, res))
    _print_table(results)
    print(f"wrote {Path(out) / 'results.csv'}, {Path(out) / 'report.md'}")
    return 1 if any(res.status == "error" for _, res in results) else 0


def _bench_worker(rank: int, world_size: int, runs: list[Any], out: str, meta: dict[str, Any],
                  resume: bool, progress: bool, threads: int, lock: bool = True) -> None:
    """One process of ``dsbp bench --nproc N`` (started by ``dsbp.optim.distributed.launch``
    with the process group up): the whole grid, this rank's slice of every batch; rank 0
    writes the run directories, ``results.csv``, ``report.md`` and the plots (and takes the
    folder's lock unless ``lock`` is False: the launching process holds it)."""
    from dsbp.experiments.sweep import bench

    _set_threads(threads)
    bench(runs, out, meta=meta, resume=resume, progress=progress and rank == 0,
          log=print if rank == 0 else (lambda _line: None), lock=lock)


def _set_threads(n: int | None) -> None:
    if n is None:
        return
    if n < 1:
        raise ValueError(f"--threads must be >= 1, got {n}")
    import torch

    torch.set_num_threads(n)


def _print_table(results: Sequence[tuple[Any, Any]]) -> None:
    rows = [("run", "status", "test acc", "test loss", "train s")]
    rows += [(gr.name, res.status, f"{100 * res.test_acc:.2f}%", f"{res.test_loss:.4f}",
              f"{res.wall_s:.1f}") for gr, res in results]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


def add_demo(sub: Any) -> None:
    """``dsbp demo``: the subcommand's parser."""
    p = sub.add_parser("demo", help="SGD vs DSBP on the bundled Fashion-MNIST subset (~1 min)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    """``dsbp demo``: the demo preset into ``--out`` (finished runs are reused)."""
    from dsbp.experiments.config import get_preset, with_setting
    from dsbp.experiments.sweep import GridRun, bench

    preset = get_preset("demo")
    _set_threads(preset.threads)
    cfgs = preset.configs()
    if args.device:
        cfgs = [with_setting(c, "device", args.device) for c in cfgs]
    runs = [GridRun(c, ()) for c in cfgs]
    print(f"dsbp demo: {preset.note}\n{len(runs)} runs -> {args.out} (finished runs are reused)")
    made = bench(runs, args.out, meta={"command": args.command_line, "preset": "demo",
                                       "label": "demo preset (bundled Fashion-MNIST subset, "
                                       "SmallCNN, CPU-sized): not the paper's setting"},
                 resume=True, progress=not args.no_progress)
    _print_table(made["results"])
    print(f"learning curves: {made['plots'][0] if made['plots'] else 'none'}\n"
          f"report: {made['report']}")
    return 1 if any(res.status == "error" for _, res in made["results"]) else 0


def add_report(sub: Any) -> None:
    """``dsbp report``: the subcommand's parser."""
    p = sub.add_parser("report", help="remake results.csv, report.md and plots of a bench folder")
    p.add_argument("out", help="a `dsbp bench` output folder")
    p.add_argument("--label", help="override the setting line atop report.md")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    """``dsbp report OUT``: remake the tables, report and plots from run directories."""
    from dsbp.experiments.sweep import finish
    from dsbp.experiments.table import finish_table, is_table

    if is_table(args.out):  # a `dsbp table` folder: its sub-folders, table and plot
        print("wrote " + ", ".join(str(v) for v in finish_table(args.out).values()))
        return 0
    made = finish(args.out, {"label": args.label} if args.label else None)
    for line in made["problems"]:
        print(f"unreadable, left out: {line}")
    print(f"wrote {made['csv']}, {made['report']}, " + ", ".join(map(str, made["plots"])))
    return 0
