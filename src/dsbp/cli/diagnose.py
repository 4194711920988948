"""``dsbp diagnose RUN_DIR...``: the command line of :mod:`dsbp.experiments.diagnose`."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_parser"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``dsbp diagnose`` to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "diagnose", help="Hessian, landscape, perturbation (and PAC-Bayes) of a run's checkpoint",
        description="Diagnostics of a finished run's final checkpoint, written into "
        "RUN_DIR/diagnostics (see dsbp.experiments.diagnose).")
    p.add_argument("run_dirs", nargs="+", help="run directories (with checkpoint.pt)")
    p.add_argument("--batches", type=int, default=2, help="training batches used (default 2)")
    p.add_argument("--hessian-k", type=int, default=3)
    p.add_argument("--trace-samples", type=int, default=20)
    p.add_argument("--rank", type=int, default=10, help="k for the activation spectra")
    p.add_argument("--slice-points", type=int, default=21)
    p.add_argument("--slice-2d-points", type=int, default=9)
    p.add_argument("--perturb-draws", type=int, default=5)
    p.add_argument("--pac-bayes", action="store_true", help="also compute the PAC-Bayes bound")
    p.add_argument("--pac-samples", type=int, default=2000,
                   help="training examples for the PAC-Bayes bound (its m)")
    p.add_argument("--pac-mc", type=int, default=20, help="Monte Carlo weight draws per s")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-png", action="store_true", help="write the JSON only")
    p.add_argument("--unfinished", action="store_true",
                   help="diagnose the mid-training checkpoint of a run that has not finished "
                   "(recorded as such in diagnostics.json)")
    p.set_defaults(func=_cmd)
    return p


def _cmd(args: argparse.Namespace) -> int:
    from dsbp.experiments.diagnose import diagnose_run

    for rd in args.run_dirs:
        out = diagnose_run(
            rd, batches=args.batches, hessian_k=args.hessian_k, trace_samples=args.trace_samples,
            rank=args.rank, slice_points=args.slice_points, slice_2d_points=args.slice_2d_points,
            perturb_draws=args.perturb_draws, pac_bayes=args.pac_bayes,
            pac_samples=args.pac_samples, pac_mc=args.pac_mc, device=args.device,
            png=not args.no_png, allow_unfinished=args.unfinished)
        print(f"wrote {out}")
    return 0
