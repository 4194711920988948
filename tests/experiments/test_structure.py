"""Structure of the harness: argument parsing only in ``dsbp.cli``, one post-hoc analysis
interface that the sweep's ``finish`` iterates over, and no unsafe checkpoint loading anywhere.
(Import cycles anywhere in ``dsbp``, function-local imports included, are checked by
``tests/test_import_cycles.py``.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = ROOT / "src" / "dsbp" / "experiments"


def test_argument_parsing_lives_in_the_cli_package():
    """Was: argparse code lived inside dsbp.experiments."""
    users = [p.name for p in EXPERIMENTS.glob("*.py") if "argparse" in p.read_text()]
    assert users == []


def test_no_unsafe_checkpoint_loading_anywhere():
    """Was: scripts/issue7_robustness.py loaded checkpoints with weights_only=False."""
    hits = []
    for folder in ("src", "scripts", "studies", "benchmarks"):
        for p in (ROOT / folder).rglob("*.py") if (ROOT / folder).exists() else []:
            if re.search(r"weights_only\s*=\s*False", p.read_text()):
                hits.append(str(p.relative_to(ROOT)))
    assert hits == []


def test_prune_and_shift_are_posthoc_analyses_that_finish_iterates_over():
    from dsbp.experiments import prune, shift, sweep
    from dsbp.experiments.posthoc import PostHoc

    assert sweep.ANALYSES == (prune.ANALYSIS, shift.ANALYSIS)
    assert all(isinstance(a, PostHoc) for a in sweep.ANALYSES)


def test_finish_takes_rows_and_a_section_from_any_registered_analysis(tmp_path, monkeypatch):
    """A new analysis joins results.csv and report.md through the interface alone."""
    from dsbp.cli import main
    from dsbp.experiments import sweep
    from dsbp.experiments.posthoc import PostHoc

    out = tmp_path / "o"
    assert main(["bench", "--methods", "sgd", "--epochs", "1", "--subset", "64",
                 "--eval-subset", "100", "--set", 'model_kwargs={"width": 4}',
                 "--no-progress", "--threads", "1", "--out", str(out)]) == 0
    rdir = out / "runs" / "bundled-cnn-sgd-s0"

    def run(run_dir, *, dataset, log, scale):
        res = json.loads((Path(run_dir) / "result.json").read_text())
        out = {"method": "sgd", "score": scale * res["test_acc"]}
        (Path(run_dir) / "double.json").write_text(json.dumps(out))
        return out

    def rows(result, row):
        return {"marked": 1}, [{**row, "method": row["method"] + "+double",
                                "test_acc": result["score"], "score": result["score"]}]

    def section(out_dir, all_rows):
        return ["", "## Doubled", "", *[f"- {r['method']}: {r['test_acc']:.4f}"
                                         for r in all_rows if "+double" in r["method"]]]

    double = PostHoc(name="double", result_file="double.json", columns=("score", "marked"),
                     run=run, want=lambda **kw: kw, rows=rows, section=section)
    monkeypatch.setattr(sweep, "ANALYSES", (*sweep.ANALYSES, double))
    assert len(double.apply(out, scale=2.0, log=lambda _: None)) == 1
    sweep.finish(out)
    acc = json.loads((rdir / "result.json").read_text())["test_acc"]
    csv_text = (out / "results.csv").read_text().splitlines()
    header = csv_text[0].split(",")
    assert header[-2:] == ["score", "marked"]
    derived = [line for line in csv_text if "sgd+double" in line]
    assert len(derived) == 1 and f"{2 * acc}" in derived[0]
    assert f"- sgd+double: {2 * acc:.4f}" in (out / "report.md").read_text()
    # resume keeps a result made with the same settings
    (rdir / "double.json").write_text(json.dumps({"method": "sgd", "score": -1.0,
                                                  "scale": 2.0}))
    kept = double.apply(out, scale=2.0, log=lambda _: None)
    assert kept[0]["score"] == -1.0


@pytest.mark.parametrize("name", ["prune", "shift"])
def test_a_corrupt_analysis_file_is_named_in_the_report(tmp_path, name):
    from dsbp.cli import main
    from dsbp.experiments import sweep

    out = tmp_path / "o"
    assert main(["bench", "--methods", "sgd", "--epochs", "1", "--subset", "64",
                 "--eval-subset", "100", "--set", 'model_kwargs={"width": 4}',
                 "--no-progress", "--threads", "1", "--out", str(out)]) == 0
    bad = out / "runs" / "bundled-cnn-sgd-s0" / f"{name}.json"
    bad.write_text('{"run": ')
    made = sweep.finish(out)
    assert any(str(bad) in p for p in made["problems"])
    assert str(bad) in (out / "report.md").read_text()
