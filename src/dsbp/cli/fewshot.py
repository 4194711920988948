"""``dsbp fewshot``, and ``dsbp bench --methods maml,spectral_maml`` (which routes there): the
command line of :mod:`dsbp.experiments.fewshot`."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["BENCH_FLAGS_USED", "add_parser", "bench_fewshot", "cmd_fewshot"]


def _csv(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}"
                                         ) from None


def _threads(n: int | None) -> None:
    if n is None:
        return
    if n < 1:
        raise ValueError(f"--threads must be >= 1, got {n}")
    import torch

    torch.set_num_threads(n)


def _seeds(n: int, first: int = 0) -> tuple[int, ...]:
    if n < 1:
        raise ValueError(f"--seeds must be >= 1, got {n}")
    if first < 0:
        raise ValueError(f"--first-seed must be >= 0, got {first}")
    return tuple(range(first, first + n))


def add_parser(sub: Any) -> None:
    """``dsbp fewshot``: the subcommand's parser."""
    from dsbp.experiments.fewshot import FewshotConfig

    d = FewshotConfig()
    p = sub.add_parser(
        "fewshot", help="spectral MAML vs MAML on N-way K-shot episodes (held-out classes)",
        description="Meta-train MAML and spectral MAML from the same initialisation on the same "
        "episodes of the meta-train classes, score both on episodes of held-out classes; "
        "write config.json, env.json, runs/*.json, results.csv and report.md to OUT.")
    p.add_argument("--datasets", type=_csv, default=list(d.datasets),
                   help="comma-separated data sets (default bundled)")
    p.add_argument("--methods", type=_csv, default=list(d.methods),
                   help="maml, spectral_maml (default both)")
    p.add_argument("--n-way", type=int, default=d.n_way)
    p.add_argument("--shots", type=_ints, default=list(d.shots), help="K values (default 1,5)")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds: 0..N-1 (default 1)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="runs seeds F..F+N-1 instead")
    for name in ("n_query", "width", "meta_iters", "meta_batch", "inner_steps",
                 "test_inner_steps", "test_episodes", "rank"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name),
                       help=f"default {getattr(d, name)}")
    p.add_argument("--inner-lr", type=float, default=d.inner_lr)
    p.add_argument("--outer-lr", type=float, default=d.outer_lr)
    p.add_argument("--side", choices=("output", "input"), default=d.side)
    p.add_argument("--device", default=d.device)
    p.add_argument("--data-root", help="folder with the data files (default: the data search)")
    p.add_argument("--threads", type=int, help="torch intra-op CPU threads (default: torch's)")
    p.add_argument("--out", default="runs/fewshot", help="output folder")
    p.add_argument("--resume", action="store_true", help="keep finished cells of OUT")
    p.set_defaults(func=cmd_fewshot)


def _check_data_root(root: str | None) -> None:
    from pathlib import Path

    if root is not None and not Path(root).is_dir():
        raise ValueError(f"--data-root {root!r} is not a folder (it does not exist); give a "
                         "folder that holds the data files, or leave --data-root out")


def cmd_fewshot(args: argparse.Namespace) -> int:
    """``dsbp fewshot ...``."""
    from dsbp.experiments.fewshot import FewshotConfig, fewshot

    seeds = _seeds(args.seeds, args.first_seed)
    _threads(args.threads)
    _check_data_root(args.data_root)
    cfg = FewshotConfig(
        datasets=tuple(args.datasets), methods=tuple(args.methods), n_way=args.n_way,
        shots=tuple(args.shots), seeds=seeds, n_query=args.n_query,
        width=args.width, meta_iters=args.meta_iters, meta_batch=args.meta_batch,
        inner_steps=args.inner_steps, test_inner_steps=args.test_inner_steps,
        inner_lr=args.inner_lr, outer_lr=args.outer_lr, test_episodes=args.test_episodes,
        rank=args.rank, side=args.side, device=args.device, data_root=args.data_root)
    made = fewshot(cfg, args.out, command=getattr(args, "command_line", None),
                   resume=args.resume)
    print(f"wrote {made['csv']}, {made['report']}")
    return 0


# `dsbp bench` flags the few-shot runner reads; any other bench flag given is refused.
BENCH_FLAGS_USED = ("methods", "datasets", "seeds", "first_seed", "device", "data_root",
                    "threads", "out", "resume", "nproc", "no_progress", "command_line",
                    "func", "command", "bench_defaults")


_FLAG_OF = {"sets": "--set", "warmup_frac": "--warmup", "val_split": "--val"}


def bench_fewshot(args: argparse.Namespace, defaults: argparse.Namespace) -> int:
    """``dsbp bench --methods maml,spectral_maml``: the few-shot methods train on episodes,
    not on the supervised loop, so the grid goes to :func:`dsbp.experiments.fewshot.fewshot`
    (same output layout as ``dsbp fewshot``). Every bench flag this runner does not read
    (``--epochs``, ``--subset``, ``--lr``, ``--model``, ``--set``, ``--ablate``...) is refused.

    Args:
        args: the parsed ``dsbp bench`` flags.
        defaults: the bench parser's defaults (a flag differing from its default was given).
    """
    from dsbp.experiments.fewshot import METHODS as FEWSHOT
    from dsbp.experiments.fewshot import FewshotConfig, fewshot

    other = [m for m in args.methods if m not in FEWSHOT]
    if other:
        raise ValueError(f"few-shot methods {sorted(FEWSHOT)} cannot share a grid with "
                         f"{other}: run them in separate `dsbp bench` calls")
    given = sorted(k for k, v in vars(args).items()
                   if k not in BENCH_FLAGS_USED and v != getattr(defaults, k, None))
    if given:
        flags = ", ".join(_FLAG_OF.get(k, "--" + k.replace("_", "-")) for k in given)
        raise ValueError(f"{flags}: not used by the few-shot methods (maml, spectral_maml); "
                         "`dsbp fewshot -h` lists their settings (--meta-iters, --shots...)")
    if args.nproc > 1:
        raise ValueError("few-shot methods run in one process; drop --nproc / torchrun")
    _threads(args.threads)
    _check_data_root(args.data_root)
    base = FewshotConfig()
    seeds = _seeds(args.seeds, args.first_seed) if args.seeds is not None else \
        _seeds(len(base.seeds), args.first_seed)
    cfg = FewshotConfig(
        datasets=tuple(args.datasets or base.datasets), methods=tuple(args.methods),
        seeds=seeds, device=args.device or base.device, data_root=args.data_root)
    made = fewshot(cfg, args.out or "runs/fewshot", command=args.command_line,
                   resume=bool(args.resume))
    print(f"wrote {made['csv']}, {made['report']}")
    return 0
