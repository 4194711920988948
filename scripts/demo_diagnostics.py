"""Demo-scale flatness diagnostics of SGD, SAM and DSBP, collected into one committed JSON.

Trains the ``demo`` preset (bundled Fashion-MNIST subset, SmallCNN, 3 epochs, one seed) with
SGD, SAM and DSBP, runs ``dsbp diagnose`` (top Hessian eigenvalues, Hutchinson trace, PAC-Bayes
bound) on each final checkpoint, and writes results/diagnostics/demo_diagnostics.json with
the commands, the commit, the seeds and the device. README.md quotes its numbers.

    python scripts/demo_diagnostics.py [--work runs/demo_diagnostics] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "diagnostics" / "demo_diagnostics.json"
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import cpu_name, git  # noqa: E402  (the benchmarks' environment record)


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def _final_test_acc(run_dir: Path) -> float | None:
    acc = None
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            rec = json.loads(line)
            for key in ("test_acc", "test/acc", "eval_acc"):
                if key in rec and rec[key] is not None:
                    acc = float(rec[key])
    return acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "demo_diagnostics")
    ap.add_argument("--methods", default="sgd,sam,dsbp")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--collect-only", action="store_true",
                    help="skip training and diagnose; rebuild the JSON from --work's run folders")
    args = ap.parse_args()
    commit, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain", "--", "src/dsbp")
    dsbp = str(Path(sys.executable).parent / "dsbp")
    bench = [dsbp, "bench", "--preset", "demo", "--methods", args.methods, "--out",
             str(args.work), "--threads", str(args.threads), "--no-progress", "--resume"]
    t0 = time.time()
    if not args.collect_only:
        _run(bench)
    run_dirs = sorted(p for p in (args.work / "runs").iterdir() if p.is_dir())
    diagnose = [dsbp, "diagnose", *map(str, run_dirs), "--batches", "2", "--pac-bayes",
                "--no-png"]
    if not args.collect_only:
        _run(diagnose)
    runs = {}
    for rd in run_dirs:
        cfg = json.loads((rd / "config.json").read_text())
        diag = json.loads((rd / "diagnostics" / "diagnostics.json").read_text())
        pb = diag.get("pac_bayes") or {}
        env = json.loads((rd / "env.json").read_text()) if (rd / "env.json").exists() else {}
        diag_file = rd / "diagnostics" / "diagnostics.json"
        runs[rd.name] = {
            "training": {k: env.get(k) for k in ("commit", "dirty", "time_utc", "device_name",
                                                 "torch")},
            "diagnose_finished_utc": time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(diag_file.stat().st_mtime)),
            "method": cfg.get("method"),
            "seed": cfg.get("seed"),
            "final_test_acc": _final_test_acc(rd),
            "hessian_top_eigenvalues": diag.get("hessian_top_eigenvalues"),
            "hessian_trace": diag.get("hessian_trace"),
            "pac_bayes": {k: pb.get(k) for k in (
                "bound", "bound_sqrt", "kl", "empirical", "s", "m", "deterministic_error",
                "batchnorm", "n_batchnorm_stats", "valid", "assumptions")} if pb else None,
        }
    rel = [str(Path(c).relative_to(ROOT)) if c.startswith(str(ROOT)) else c for c in bench]
    record = {
        "command": "python scripts/demo_diagnostics.py " + " ".join(sys.argv[1:]),
        "steps": [" ".join(["dsbp", *rel[1:]]),
                  " ".join(["dsbp", "diagnose", "RUN_DIRS", *diagnose[2 + len(run_dirs):]])],
        # the code the diagnose step ran: HEAD (and uncommitted paths) when this script started;
        # each run's training commit is in runs[...]["training"] (its env.json)
        "diagnose_commit": None if args.collect_only else commit,
        "diagnose_dirty_paths": None if args.collect_only else dirty.splitlines(),
        "note": ("collected from existing run folders (--collect-only): the diagnose step's "
                 "commit was not recorded; it ran after training, before "
                 "diagnose_finished_utc") if args.collect_only else None,
        "device": f"cpu: {cpu_name()}",
        "threads": {"bench": args.threads, "diagnose": "torch default"},
        "seeds": sorted({r["seed"] for r in runs.values()}),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "seconds": None if args.collect_only else round(time.time() - t0),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
