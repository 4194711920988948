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


def test_nproc_below_one_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--nproc", "0", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "--nproc must be >= 1" in capsys.readouterr().err


def test_unknown_ablation_key_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--methods", "sgd", "--ablate", "rnak=1,2", "--out", str(tmp_path)])
    assert "rnak" in capsys.readouterr().err


def test_optional_subcommands_are_dispatched_lazily(tmp_path, monkeypatch, capsys):
    import sys

    import dsbp.cli as cli

    (tmp_path / "fake_diag_cli.py").write_text(
        "def add_parser(sub):\n"
        "    p = sub.add_parser('diagnose')\n"
        "    p.add_argument('--x', type=int)\n"
        "    p.set_defaults(func=lambda a: print('diag', a.x) or 0)\n"
        "    return p\n"
    )
    (tmp_path / "fake_broken.py").write_text("raise ImportError('broken on purpose')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "_OPTIONAL_COMMANDS", (("diagnose", "fake_diag_cli"),
                                                    ("figures", "fake_broken")))
    try:
        assert main(["diagnose", "--x", "3"]) == 0
        assert "diag 3" in capsys.readouterr().out
        # A broken optional module is never imported by other commands.
        with pytest.raises(SystemExit) as exc:
            main(["bench", "--nproc", "0"])
        assert exc.value.code == 2 and "--nproc must be >= 1" in capsys.readouterr().err
    finally:
        sys.modules.pop("fake_diag_cli", None)
