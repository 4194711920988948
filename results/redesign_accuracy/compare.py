"""Before/after accuracy of the recommended configuration around the projector redesign.

Reads the committed run folders ``before/`` (commit 15d444d, the code before the redesign) and
``after/`` (the redesigned projector: new row sampler, one update function, cheaper checks),
both run with the same command and seeds, and writes ``comparison.json``: per seed the final
validation and test accuracy, and the means. Measures nothing itself.

``python results/redesign_accuracy/compare.py``
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent


def final(run: Path) -> dict:
    last = json.loads(run.joinpath("metrics.jsonl").read_text().strip().splitlines()[-1])
    env = json.loads(run.joinpath("env.json").read_text())
    return {"val_acc": last["val_acc"], "test_acc": last["test_acc"],
            "commit": env.get("git", {}).get("commit", env.get("commit"))}


def main() -> dict:
    out: dict = {"command": json.loads((HERE / "after" / "bench.json").read_text())["command"]
                 .replace("/tmp/acc_after", "OUT"), "arms": {}}
    for arm in ("before", "after"):
        runs = sorted((HERE / arm / "runs").iterdir())
        seeds = {r.name.rsplit("-s", 1)[1]: final(r) for r in runs}
        out["arms"][arm] = {"seeds": seeds,
                            "mean_val_acc": statistics.mean(s["val_acc"] for s in seeds.values()),
                            "mean_test_acc": statistics.mean(s["test_acc"]
                                                             for s in seeds.values())}
    out["val_acc_difference_after_minus_before"] = (out["arms"]["after"]["mean_val_acc"]
                                                    - out["arms"]["before"]["mean_val_acc"])
    (HERE / "comparison.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
