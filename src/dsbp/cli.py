"""The ``dsbp`` command line.

Subcommands:

- ``dsbp bench``: run a grid (data sets x methods x ablations x seeds), write one run
  directory per run, ``results.csv``, ``report.md`` and PNG plots.
- ``dsbp demo``: the ``demo`` preset (SGD vs DSBP on the bundled Fashion-MNIST subset, about a
  minute on a CPU); prints a results table and writes the learning curves.
- ``dsbp report OUT``: remake ``results.csv``, ``report.md`` and the plots from run directories.
- ``dsbp diagnose`` / ``dsbp figures``: diagnostics and paper figures, from
  ``dsbp.experiments.diagnose_cli`` and ``dsbp.plots.figures`` when those are installed.

Examples::

    dsbp bench --preset smoke --out runs/smoke
    dsbp bench --datasets fashion_mnist --methods sgd,sam,dsbp --epochs 5 --seeds 3 \\
        --subset 5000 --out runs/fmnist
    dsbp bench --methods dsbp --ablate rank=2,5,10 --ablate interval=10,100 --out runs/abl
    dsbp bench --preset demo --model mlp --nproc 2 --out runs/demo_ddp   # 2 DDP processes
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import shlex
import sys
from collections.abc import Sequence
from typing import Any

# Subcommands owned by other modules: (command, module); imported only when invoked.
_OPTIONAL_COMMANDS = (
    ("diagnose", "dsbp.experiments.diagnose_cli"),
    ("figures", "dsbp.plots.figures"),
    ("prune", "dsbp.experiments.prune"),
    ("shift", "dsbp.experiments.shift"),
    ("fewshot", "dsbp.experiments.fewshot"),
)


def _csv(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def _add_bench(sub: Any) -> None:
    p = sub.add_parser(
        "bench", help="run a grid of training runs and write results.csv, report.md, plots",
        description="Run data sets x methods x ablations x seeds; each run gets a directory "
        "under OUT/runs with config.json, env.json, metrics.jsonl and checkpoint.pt.",
    )
    p.add_argument("--preset", choices=("smoke", "demo", "paper"),
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
    p.add_argument("--threads", type=int,
                   help="torch intra-op CPU threads (default: torch's; recorded in env.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--prune", metavar="T1,T2",
                   help="after training, the pruning ablation (dsbp.experiments.prune) at these "
                   "energy thresholds tau_E; also accepted as --ablate prune=T1,T2. Adds rows "
                   "'<method>+factorise@<tau>' to results.csv and a table to report.md")
    p.add_argument("--prune-mode", choices=("factorise", "prune"), default="factorise",
                   help="factorise each layer into two thinner ones (default) or prune units")
    p.add_argument("--prune-finetune", type=int, default=1, metavar="EPOCHS",
                   help="SGD fine-tuning epochs after factorising / pruning (default 1)")
    from dsbp.experiments.shift import add_bench_options

    add_bench_options(p)  # --shift KINDS --shift-severity ...: test-time adaptation
    p.set_defaults(func=cmd_bench)


def _grid_from_args(args: argparse.Namespace) -> tuple[list[Any], str | None]:
    """The grid the bench flags describe, and its preset name."""
    from dsbp.experiments.config import RunConfig, get_preset, with_setting
    from dsbp.experiments.sweep import expand_grid, parse_ablation, parse_value

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
             "track": tuple(args.track) if args.track else None}
    for key, value in flags.items():
        if value is not None:
            base = with_setting(base, key, value)
    for item in args.sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        base = with_setting(base, key.strip(), parse_value(value.strip()))
    ablations: dict[str, list[Any]] = {}
    for spec in args.ablate:
        key, values = parse_ablation(spec)
        if key in ablations:
            raise ValueError(f"--ablate {key} given twice")
        ablations[key] = values
    overrides = dict(preset.method_overrides) if preset else {}
    if args.first_seed < 0:
        raise ValueError(f"--first-seed must be >= 0, got {args.first_seed}")
    seeds = list(range(args.first_seed, args.first_seed + n_seeds))
    runs = expand_grid(base, datasets, methods, seeds, ablations, overrides)
    return runs, (preset.name if preset else None)


def _bench_fewshot(args: argparse.Namespace) -> int:
    """``dsbp bench --methods maml,spectral_maml``: the few-shot methods train on episodes, not
    on the supervised loop, so the grid goes to :func:`dsbp.experiments.fewshot.fewshot` (same
    output layout as ``dsbp fewshot``: results.csv, report.md, one JSON per cell)."""
    from dsbp.experiments.fewshot import METHODS as FEWSHOT
    from dsbp.experiments.fewshot import FewshotConfig, fewshot

    other = [m for m in args.methods if m not in FEWSHOT]
    if other:
        raise ValueError(f"few-shot methods {sorted(FEWSHOT)} cannot share a grid with "
                         f"{other}: run them in separate `dsbp bench` calls")
    if args.nproc > 1 or _torchrun_world_size() > 1:
        raise ValueError("few-shot methods run in one process; drop --nproc / torchrun")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    base = FewshotConfig()
    cfg = FewshotConfig(
        datasets=tuple(args.datasets or base.datasets), methods=tuple(args.methods),
        seeds=tuple(range(args.seeds)) if args.seeds else base.seeds,
        device=args.device or base.device, data_root=args.data_root)
    made = fewshot(cfg, args.out or "runs/fewshot", command=args.command_line,
                   resume=bool(args.resume))
    print(f"wrote {made['csv']}, {made['report']}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """``dsbp bench``: run the grid; exit status 1 if any run raised (status ``error``)."""
    from dsbp.experiments.sweep import bench

    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    if args.methods and set(args.methods) & {"maml", "spectral_maml"}:
        return _bench_fewshot(args)
    from dsbp.experiments.prune import bench_taus

    prune_taus = bench_taus(args)  # --prune / --ablate prune=...: taken out of the grid
    if prune_taus and (args.nproc > 1 or _torchrun_world_size() > 1):
        raise ValueError("--prune runs after single-process benches only; with --nproc > 1 "
                         "run `dsbp prune OUT --taus ...` on the output folder afterwards")
    from dsbp.experiments.shift import bench_shift_kwargs

    shift_kw = bench_shift_kwargs(args)  # --shift KINDS: after training, on the CPU
    if shift_kw and (args.nproc > 1 or _torchrun_world_size() > 1):
        raise ValueError("--shift runs after single-process benches only; with --nproc > 1 "
                         "run `dsbp shift OUT --kinds ...` on the output folder afterwards")
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
    _set_threads(threads)
    print(f"dsbp bench: {len(runs)} runs -> {out}")
    made = bench(runs, out, meta=meta, resume=args.resume, progress=not args.no_progress)
    if prune_taus:
        from dsbp.experiments.prune import prune_bench
        from dsbp.experiments.sweep import finish

        prune_bench(out, prune_taus, args.prune_mode, args.prune_finetune, resume=args.resume)
        made = {**made, **finish(out)}
    if shift_kw:
        from dsbp.experiments.shift import shift_bench
        from dsbp.experiments.sweep import finish

        shift_bench(out, resume=args.resume, **shift_kw)
        made = {**made, **finish(out)}
    _print_table(made["results"])
    print(f"wrote {made['csv']}, {made['report']}, " + ", ".join(map(str, made["plots"])))
    return 1 if any(res.status == "error" for _, res in made["results"]) else 0


def _bench_multiprocess(runs: Sequence[Any], out: str, meta: dict[str, Any],
                        args: argparse.Namespace, threads: int | None) -> int:
    """``dsbp bench --nproc N``: the grid in N data-parallel processes (see
    :func:`_bench_worker`); the results are read back from the run directories."""
    from dsbp.optim.distributed import launch

    backend = _check_ddp_grid(runs, args.nproc, out, args.resume)
    print(f"dsbp bench: {len(runs)} runs x {args.nproc} processes ({backend}) -> {out}")
    # [ours] 1 torch thread per process unless --threads says otherwise: N processes on a
    # CPU already use N cores.
    launch(_bench_worker, args.nproc,
           args=(list(runs), out, meta, args.resume, not args.no_progress,
                 threads if threads is not None else 1), backend=backend)
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
    from pathlib import Path

    from dsbp.experiments.run import read_result

    runs_dir = Path(out) / "runs"
    results = []
    for gr in runs:
        res = read_result(runs_dir / gr.name)
        if res is None:
            raise RuntimeError(f"run {gr.name} wrote no result.json")
        results.append((gr, res))
    _print_table(results)
    print(f"wrote {Path(out) / 'results.csv'}, {Path(out) / 'report.md'}")
    return 1 if any(res.status == "error" for _, res in results) else 0


def _bench_worker(rank: int, world_size: int, runs: list[Any], out: str, meta: dict[str, Any],
                  resume: bool, progress: bool, threads: int) -> None:
    """One process of ``dsbp bench --nproc N`` (started by ``dsbp.optim.distributed.launch``
    with the process group up): the whole grid, this rank's slice of every batch; rank 0
    writes the run directories, ``results.csv``, ``report.md`` and the plots."""
    from dsbp.experiments.sweep import bench

    _set_threads(threads)
    bench(runs, out, meta=meta, resume=resume, progress=progress and rank == 0,
          log=print if rank == 0 else (lambda _line: None))


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


def _add_demo(sub: Any) -> None:
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


def _add_report(sub: Any) -> None:
    p = sub.add_parser("report", help="remake results.csv, report.md and plots of a bench folder")
    p.add_argument("out", help="a `dsbp bench` output folder")
    p.add_argument("--label", help="override the setting line atop report.md")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    """``dsbp report OUT``: remake the tables, report and plots from run directories."""
    from dsbp.experiments.sweep import finish

    made = finish(args.out, {"label": args.label} if args.label else None)
    print(f"wrote {made['csv']}, {made['report']}, " + ", ".join(map(str, made["plots"])))
    return 0


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The ``dsbp`` parser. Optional subcommands (diagnose, figures) are imported only when
    ``argv`` invokes them, so a broken or missing optional module never breaks ``bench``."""
    parser = argparse.ArgumentParser(prog="dsbp", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_bench(sub)
    _add_demo(sub)
    _add_report(sub)
    command = next((a for a in argv if not a.startswith("-")), None)
    for name, module in _OPTIONAL_COMMANDS:
        if importlib.util.find_spec(module) is None:
            continue
        if command == name:
            importlib.import_module(module).add_parser(sub)
        else:  # listed in --help; the real parser is built when invoked
            sub.add_parser(name, help=f"(see `dsbp {name} -h`; from {module})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dsbp`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    args.command_line = "dsbp " + shlex.join(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileExistsError) as err:
        parser.exit(2, f"dsbp {args.command}: error: {err}\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
