"""Run the SDE check of Proposition 1 on the real DSBP(SGD) and write its JSON, or render the
docs table from that JSON.

    python scripts/sde_check.py                      # writes results/sde_check/sde_check.json
    python scripts/sde_check.py --render             # prints the Markdown table of the JSON

The check itself is :mod:`dsbp.diagnostics.sde` (see docs/diagnostics.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from dsbp.diagnostics.sde import VARIANTS, weak_error_check

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "sde_check" / "sde_check.json"
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import cpu_name, git  # noqa: E402  (the benchmarks' environment record)


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    runs = []
    for mom in args.momentum:
        t0 = time.time()
        res = weak_error_check(etas=args.etas, horizon=args.horizon, n_paths=args.paths,
                               momentum=mom, interval=args.interval,
                               power_iters=args.power_iters, seed=args.seed)
        d = res.to_dict()
        d["seconds"] = round(time.time() - t0, 1)
        runs.append(d)
        print(f"momentum {mom}: accepted {res.accepted} ({d['seconds']} s)", file=sys.stderr)
    record = {
        "command": "python scripts/sde_check.py " + " ".join(sys.argv[1:]),
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--", "src/dsbp", "scripts/sde_check.py")),
        "dirty_paths": git("status", "--porcelain", "--", "src/dsbp",
                            "scripts/sde_check.py").splitlines(),
        "device": f"cpu: {cpu_name()} ({args.threads} thread)",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "seeds": {"projector": args.seed,
                  "noise": [args.seed + 1 + i for i in range(len(args.etas))],
                  "problem": runs[0]["problem"]["seed"]},
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(args.out)
    print(f"wrote {args.out}", file=sys.stderr)


def render(path: Path) -> str:
    """The docs table: one row per momentum, test function and SDE variant."""
    rec = json.loads(path.read_text())
    lines = []
    for r in rec["runs"]:
        etas = r["etas"]
        lines.append(f"Momentum {r['momentum']}, {r['n_paths']} paths per step size, "
                     f"T = {r['horizon']}:")
        lines.append("")
        head = " | ".join(f"η = {e}" for e in etas)
        lines.append(f"| SDE | test function | {head} | limit η → 0 | order | verdict |")
        lines.append("|---|---|" + "---|" * len(etas) + "---|---|---|")
        for v in VARIANTS:
            for name in ("loss", "fluctuation"):
                errs = " | ".join(f"{e:+.5f} ± {s:.5f}" for e, s in
                                  zip(r["errors"][v][name], r["stderr"][v][name], strict=True))
                a, sa = r["limit"][v][name]
                o, so = r["order"][v][name]
                verdict = "accepted" if r["accepted"][v] else "rejected"
                lines.append(f"| {v} | {name} | {errs} | {a:+.5f} ± {sa:.5f} | "
                             f"{o:.2f} ± {so:.2f} | {verdict} |")
        lines.append("")
    lines.append(f"- `{path.relative_to(ROOT)}`: {rec['device']}, torch {rec['torch']}, "
                 f"commit `{rec['commit'][:10]}`" + (" (+ uncommitted changes)" if rec["dirty"]
                                                    else "") + f"; `{rec['command'].strip()}`")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--render", action="store_true", help="print the docs table and exit")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--paths", type=int, default=20000)
    ap.add_argument("--etas", type=float, nargs="+", default=[0.05, 0.025, 0.0125, 0.00625])
    ap.add_argument("--horizon", type=float, default=1.0)
    ap.add_argument("--momentum", type=float, nargs="+", default=[0.0, 0.5])
    ap.add_argument("--interval", type=int, default=2)
    ap.add_argument("--power-iters", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.render:
        print(render(args.out))
    else:
        run(args)


if __name__ == "__main__":
    main()
