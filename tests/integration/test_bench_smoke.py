"""`dsbp bench` end to end on the bundled Fashion-MNIST subset with tiny settings."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from PIL import Image

from dsbp.cli import main
from dsbp.experiments.sweep import RESULT_COLUMNS

REQUIRED = ("dataset", "model", "method", "seed", "epochs", "test_acc", "test_loss", "wall_s",
            "device", "status")


@pytest.mark.slow
def test_bench_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench"
    threads = torch.get_num_threads()
    argv = ["bench", "--threads", "1", "--datasets", "bundled", "--methods", "sgd,dsbp",
            "--epochs", "1", "--seeds", "2", "--subset", "300", "--eval-subset", "200",
            "--batch-size", "50",
            "--ablate", "rank=2,4", "--set", "interval=3", "--set", 'model_kwargs={"width": 8}',
            "--track", "spectrum", "--out", str(out), "--no-progress"]
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert set(REQUIRED) <= set(rows[0]) and list(rows[0])[: len(RESULT_COLUMNS)] == list(
        RESULT_COLUMNS)
    # sgd x 2 seeds (rank does not apply to it) + dsbp x 2 ranks x 2 seeds.
    assert sorted((r["method"], r["rank"], r["seed"]) for r in rows) == sorted(
        [("sgd", "", "0"), ("sgd", "", "1")]
        + [("dsbp", k, s) for k in ("2", "4") for s in ("0", "1")])
    for r in rows:
        assert r["status"] == "ok" and r["epochs"] == "1" and r["dataset"] == "bundled"
        assert 0.0 <= float(r["test_acc"]) <= 1.0
        assert math.isfinite(float(r["test_loss"])) and float(r["test_loss"]) > 0
        assert float(r["wall_s"]) > 0 and r["device"].startswith("cpu")
    report = (out / "report.md").read_text()
    assert "paper's claim" in report and "93.8" in report  # the claimed Fashion-MNIST row
    assert "`dsbp bench --threads 1 --datasets bundled" in report  # the regenerating command
    for png in ("learning_curves.png", "acc_vs_wallclock.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG"
    # The tracker's values are in the eval records of the DSBP runs only.
    runs = out / "runs"
    assert '"spectrum/drift"' in (runs / "bundled-cnn-dsbp-rank=2-s0" / "metrics.jsonl").read_text()
    assert "spectrum/" not in (runs / "bundled-cnn-sgd-s0" / "metrics.jsonl").read_text()

    # Re-running without --resume refuses to overwrite; with --resume nothing is retrained.
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(argv)
    assert "--resume" in capsys.readouterr().err
    before = (out / "results.csv").read_text()
    try:
        assert main([*argv, "--resume"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert (out / "results.csv").read_text() == before


def test_nproc_above_one_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--nproc", "2", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "multi-process" in capsys.readouterr().err


def test_unknown_ablation_key_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--methods", "sgd", "--ablate", "rnak=1,2", "--out", str(tmp_path)])
    assert "rnak" in capsys.readouterr().err
