"""The ``dsbp`` command line (all argument parsing lives in this package).

Subcommands:

- ``dsbp bench``: run a grid (data sets x methods x ablations x seeds), write one run
  directory per run, ``results.csv``, ``report.md`` and PNG plots (:mod:`dsbp.cli.bench`).
- ``dsbp demo``: the ``demo`` preset (SGD vs DSBP on the bundled Fashion-MNIST subset, about a
  minute on a CPU); prints a results table and writes the learning curves.
- ``dsbp report OUT``: remake ``results.csv``, ``report.md`` and the plots from run directories.
- ``dsbp prune`` / ``dsbp shift``: post-training analyses of finished runs
  (:mod:`dsbp.cli.posthoc`); ``dsbp fewshot`` (:mod:`dsbp.cli.fewshot`); ``dsbp diagnose``
  (:mod:`dsbp.cli.diagnose`); ``dsbp figures`` (``dsbp.plots.figures``).

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

from dsbp.cli.bench import (
    _bench_worker,
    _grid_from_args,
    add_bench,
    add_demo,
    add_report,
)

# Subcommands with their own module: (command, module); imported only when invoked.
_OPTIONAL_COMMANDS = (
    ("diagnose", "dsbp.cli.diagnose"),
    ("figures", "dsbp.plots.figures"),
    ("prune", "dsbp.cli.posthoc"),
    ("shift", "dsbp.cli.posthoc"),
    ("fewshot", "dsbp.cli.fewshot"),
    ("table", "dsbp.cli.table"),
)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The ``dsbp`` parser. Optional subcommands (diagnose, figures...) are imported only when
    ``argv`` invokes them, so a broken or missing optional module never breaks ``bench``."""
    parser = argparse.ArgumentParser(prog="dsbp", description=(__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_bench(sub)
    add_demo(sub)
    add_report(sub)
    command = next((a for a in argv if not a.startswith("-")), None)
    for name, module in _OPTIONAL_COMMANDS:
        if importlib.util.find_spec(module) is None:
            continue
        if command == name:
            mod = importlib.import_module(module)
            adder = getattr(mod, f"add_{name}_parser", None) or mod.add_parser
            adder(sub)
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


__all__ = ["_bench_worker", "_grid_from_args", "build_parser", "main"]
