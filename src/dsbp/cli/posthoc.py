"""``dsbp prune`` / ``dsbp shift`` and the ``dsbp bench --prune / --shift`` flags: the command
line of the post-training analyses (:mod:`dsbp.experiments.prune`,
:mod:`dsbp.experiments.shift`, both :class:`~dsbp.experiments.posthoc.PostHoc`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_bench_options", "add_prune_parser", "add_shift_parser", "bench_analyses"]


def _threads(n: int | None) -> None:
    if n is None:
        return
    if n < 1:
        raise ValueError(f"--threads must be >= 1, got {n}")
    import torch

    torch.set_num_threads(n)


def _run_on_paths(analysis: Any, paths: list[str], redo: bool, **settings: Any) -> int:
    """``analysis`` on each path: a bench folder (every run, then its tables and report are
    remade) or one run directory."""
    from dsbp.experiments.atomic import FolderLock
    from dsbp.experiments.sweep import finish

    for path in map(Path, paths):
        if (path / "runs").is_dir():
            with FolderLock(path, f"dsbp {analysis.name} or bench"):  # not during a bench
                analysis.apply(path, resume=not redo, **settings)
                made = finish(path)
            print(f"wrote {made['csv']}, {made['report']}")
        elif (path / "config.json").exists():
            p = analysis.run(path, dataset=None, log=print, **settings)
            print(f"wrote {path / analysis.result_file}" if "skipped" not in p
                  else p["skipped"])
        else:
            raise ValueError(f"{path} is neither a run directory nor a `dsbp bench` folder")
    return 0


# ------------------------------------------------------------------------------- prune
def add_prune_parser(sub: Any) -> None:
    """``dsbp prune``: the subcommand's parser."""
    from dsbp.experiments.prune import MODES

    p = sub.add_parser(
        "prune", help="pruning ablation (spectral factorisation) of finished runs",
        description="Factorise (or prune) the final model of finished runs at energy "
        "thresholds tau_E, fine-tune, and write prune.json / prune.csv into each run "
        "directory. Given a `dsbp bench` output folder, does every run and remakes its "
        "results.csv and report.md.")
    p.add_argument("paths", nargs="+", metavar="RUN_DIR",
                   help="run directories, or `dsbp bench` output folders")
    p.add_argument("--taus", required=True, help="comma-separated tau_E values in (0, 1]")
    p.add_argument("--mode", choices=MODES, default="factorise")
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--finetune-lr", type=float,
                   help="constant SGD lr of the fine-tune (default: a tenth of the run's peak lr)")
    p.add_argument("--device", help="device for spectra and fine-tuning (default: the run's)")
    p.add_argument("--redo", action="store_true", help="redo runs with a matching prune.json")
    p.add_argument("--threads", type=int,
                   help="torch intra-op CPU threads (default: torch's); latency depends on it")
    p.set_defaults(func=cmd_prune)


def cmd_prune(args: argparse.Namespace) -> int:
    """``dsbp prune PATH... --taus ...``."""
    from dsbp.experiments.prune import ANALYSIS, parse_taus

    _threads(args.threads)
    return _run_on_paths(ANALYSIS, args.paths, args.redo, taus=parse_taus(args.taus),
                         mode=args.mode, finetune_epochs=args.finetune_epochs,
                         calib_batches=args.calib_batches, device=args.device,
                         finetune_lr=args.finetune_lr)


# ------------------------------------------------------------------------------- shift
def _add_tta_options(p: Any, prefix: str = "") -> None:
    from dsbp.experiments.shift import DEFAULT_TTA

    p.add_argument(f"--{prefix}tta", default=",".join(DEFAULT_TTA),
                   help="test-time methods: none, bn_stats, tent, spectral_tta (default: "
                   + ",".join(DEFAULT_TTA) + ")")
    p.add_argument(f"--{prefix}tta-lr", type=float, default=1e-3,
                   help="Adam lr of tent / spectral_tta (default 1e-3)")
    p.add_argument(f"--{prefix}tta-steps", type=int, default=1,
                   help="entropy steps per test batch (default 1)")
    p.add_argument(f"--{prefix}tta-rank", type=int, default=10,
                   help="rank k of the bases spectral_tta tracks (default 10)")
    p.add_argument(f"--{prefix}batch-size", type=int, default=128,
                   help="test-stream batch size (default 128)")


def add_shift_parser(sub: Any) -> None:
    """``dsbp shift``: the subcommand's parser."""
    from dsbp.experiments.shift import KINDS

    p = sub.add_parser(
        "shift", help="test-time adaptation of finished runs on shifted test streams",
        description="Evaluate the final model of finished runs online on shifted test streams "
        "with no adaptation, TENT and spectral TTA, and write shift.json / shift.csv into "
        "each run directory. Given a `dsbp bench` output folder, does every run and remakes "
        "its results.csv and report.md.")
    p.add_argument("paths", nargs="+", metavar="RUN_DIR_OR_OUT",
                   help="run directories, or `dsbp bench` output folders")
    p.add_argument("--kinds", default=",".join(KINDS),
                   help="shift kinds (default: " + ",".join(KINDS) + ")")
    p.add_argument("--severities", default="1,3,5", help="severities 0..5 (default 1,3,5)")
    _add_tta_options(p)
    p.add_argument("--redo", action="store_true", help="redo runs with a matching shift.json")
    p.add_argument("--threads", type=int, help="torch intra-op CPU threads (default: torch's)")
    p.set_defaults(func=cmd_shift)


def cmd_shift(args: argparse.Namespace) -> int:
    """``dsbp shift PATH... --kinds ... --severities ...``."""
    from dsbp.experiments.shift import ANALYSIS, parse_kinds, parse_severities, parse_tta

    _threads(args.threads)
    return _run_on_paths(ANALYSIS, args.paths, args.redo, kinds=parse_kinds(args.kinds),
                         severities=parse_severities(args.severities),
                         methods=parse_tta(args.tta), tta_lr=args.tta_lr,
                         tta_steps=args.tta_steps, tta_rank=args.tta_rank,
                         batch_size=args.batch_size)


# ------------------------------------------------------------------------ bench flags
def add_bench_options(p: Any) -> None:
    """The ``dsbp bench`` flags of the post-training analyses (``--prune``, ``--shift``...)."""
    p.add_argument("--prune", metavar="T1,T2",
                   help="after training, the pruning ablation (dsbp.experiments.prune) at these "
                   "energy thresholds tau_E; also accepted as --ablate prune=T1,T2. Adds rows "
                   "'<method>+factorise@<tau>' to results.csv and a table to report.md")
    p.add_argument("--prune-mode", choices=("factorise", "prune"), default=None,
                   help="factorise each layer into two thinner ones (default) or prune units")
    p.add_argument("--prune-finetune", type=int, default=None, metavar="EPOCHS",
                   help="SGD fine-tuning epochs after factorising / pruning (default 1)")
    p.add_argument("--shift", metavar="KINDS",
                   help="after training, evaluate each run on shifted test streams "
                   "(dsbp.experiments.shift): comma-separated kinds of rotate, noise, blur, "
                   "contrast. Adds rows '<method>+<tta>@<kind><severity>' to results.csv and "
                   "a table to report.md")
    p.add_argument("--shift-severity", default=None, metavar="S1,S2",
                   help="severities 0..5 of --shift (0 = clean; default 1,3,5)")
    p.add_argument("--shift-tta", default=None,
                   help="test-time methods of --shift (default none,tent,spectral_tta)")
    p.add_argument("--shift-tta-lr", type=float, default=None,
                   help="Adam lr of tent / spectral_tta (default 1e-3)")
    p.add_argument("--shift-tta-steps", type=int, default=None,
                   help="entropy steps per test batch (default 1)")
    p.add_argument("--shift-tta-rank", type=int, default=None,
                   help="rank k of the bases spectral_tta tracks (default 10)")
    p.add_argument("--shift-batch-size", type=int, default=None,
                   help="test-stream batch size (default 128)")


PRUNE_ONLY = ("prune_mode", "prune_finetune")
SHIFT_ONLY = ("shift_severity", "shift_tta", "shift_tta_lr", "shift_tta_steps",
              "shift_tta_rank", "shift_batch_size")


def bench_analyses(args: argparse.Namespace) -> list[tuple[Any, dict[str, Any]]]:
    """The post-training analyses ``dsbp bench`` was asked for, with their settings:
    ``[(PostHoc, settings)]``. ``--ablate prune=...`` is taken out of ``args.ablate``.

    Raises:
        ValueError: bad values, thresholds given twice, or a ``--prune-*`` / ``--shift-*``
            flag without ``--prune`` / ``--shift`` (it would be ignored).
    """
    from dsbp.experiments import prune, shift

    taus = prune.parse_taus(args.prune) if getattr(args, "prune", None) else None
    keep = []
    for spec in getattr(args, "ablate", []) or []:
        key, sep, values = spec.partition("=")
        if key.strip() == "prune" and sep:
            if taus is not None:
                raise ValueError("the pruning thresholds are given twice (--prune and "
                                 "--ablate prune=...)")
            taus = prune.parse_taus(values)
        else:
            keep.append(spec)
    if hasattr(args, "ablate"):
        args.ablate = keep
    out: list[tuple[Any, dict[str, Any]]] = []
    unused = [f"--{k.replace('_', '-')}" for k in PRUNE_ONLY
              if taus is None and getattr(args, k, None) is not None]
    unused += [f"--{k.replace('_', '-')}" for k in SHIFT_ONLY
               if not getattr(args, "shift", None) and getattr(args, k, None) is not None]
    if unused:
        raise ValueError(f"{', '.join(unused)} given without --prune / --shift: they would "
                         "be ignored")
    if taus is not None:
        ft = 1 if args.prune_finetune is None else args.prune_finetune
        if ft < 0:
            raise ValueError(f"--prune-finetune must be >= 0, got {ft}")
        out.append((prune.ANALYSIS, {"taus": taus, "mode": args.prune_mode or "factorise",
                                     "finetune_epochs": ft}))
    if getattr(args, "shift", None):
        def opt(name: str, default: Any) -> Any:
            v = getattr(args, name)
            return default if v is None else v

        out.append((shift.ANALYSIS, {
            "kinds": shift.parse_kinds(args.shift),
            "severities": shift.parse_severities(opt("shift_severity", "1,3,5")),
            "methods": shift.parse_tta(opt("shift_tta", ",".join(shift.DEFAULT_TTA))),
            "tta_lr": opt("shift_tta_lr", 1e-3), "tta_steps": opt("shift_tta_steps", 1),
            "tta_rank": opt("shift_tta_rank", 10),
            "batch_size": opt("shift_batch_size", 128)}))
    return out
