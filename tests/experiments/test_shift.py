"""Shifted test streams in `dsbp bench` (dsbp.experiments.shift) on the bundled data set.

Independent answers (closed forms of the protocol): at severity 0 with no adaptation the
online accuracy is the run's own logged test accuracy (same images, same weights, eval mode)
and the accuracy of the checkpoint re-evaluated here by hand; with a test-time learning rate
of 0, TENT and spectral TTA make no update, so their online accuracy is that of BatchNorm on
test-batch statistics (``bn_stats``) on every stream. That spectral TTA's updates lie in the
tracked subspace is tested in tests/extensions.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch

from dsbp.cli import main
from dsbp.data import load_dataset
from dsbp.data.shifts import apply_shift
from dsbp.data.subset import balanced_subset
from dsbp.experiments.build import build_model_for, load_data
from dsbp.experiments.run import load_config, read_result
from dsbp.experiments.shift import parse_kinds, parse_severities, parse_tta, shift_run


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    """A one-run bench (SmallCNN width 8, 200 bundled images, 1 epoch) with --shift."""
    out = tmp_path_factory.mktemp("shift_bench")
    torch.set_num_threads(1)
    rc = main(["bench", "--datasets", "bundled", "--methods", "sgd", "--model", "cnn",
               "--set", 'model_kwargs={"width": 8}', "--epochs", "1", "--subset", "200",
               "--eval-subset", "200", "--batch-size", "50", "--seeds", "1", "--no-progress",
               "--out", str(out), "--shift", "rotate", "--shift-severity", "0,3",
               "--shift-batch-size", "64"])
    assert rc == 0
    return out


def _rows(out):
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_bench_rows_and_clean_stream_is_the_run_accuracy(bench_out):
    rows = _rows(bench_out)
    by_method = {r["method"]: r for r in rows}
    want = {f"sgd+{t}@rotate{s}" for t in ("none", "tent", "spectral_tta") for s in (0, 3)}
    assert set(by_method) == want | {"sgd"}
    orig = by_method["sgd"]
    for name in want:
        r = by_method[name]
        tta, _, rest = name.partition("+")[2].partition("@")
        assert (r["tta"], r["shift"], r["severity"]) == (tta, "rotate", rest[len("rotate"):])
        assert r["run"] == orig["run"] and r["seed"] == orig["seed"]
        assert 0.0 <= float(r["test_acc"]) <= 1.0
    # Closed form: no shift, no adaptation -> the run's own test accuracy on the same images.
    clean = float(by_method["sgd+none@rotate0"]["test_acc"])
    assert clean == float(orig["test_acc"])
    rdir = bench_out / "runs" / orig["run"]
    assert clean == read_result(rdir).test_acc
    # ... and the checkpoint evaluated here, on the test images cut independently.
    cfg = load_config(rdir)
    ds = load_dataset("bundled")
    x, y = balanced_subset(ds.x_test, ds.y_test, 200, seed=0)
    model = build_model_for(cfg, load_data(cfg, torch.device("cpu"), ds))
    model.load_state_dict(torch.load(rdir / "checkpoint.pt", weights_only=True)["model"])
    m = torch.tensor(ds.mean).view(1, -1, 1, 1)
    s = torch.tensor(ds.std).view(1, -1, 1, 1)
    with torch.no_grad():
        correct = int((model.eval()((x.float() / 255 - m) / s).argmax(1) == y).sum())
    assert clean == correct / len(y)
    # A rotation by the severity-3 angle changes the images, so the stream is really shifted.
    assert not torch.equal(apply_shift(x, "rotate", 3), x)
    sj = json.loads((rdir / "shift.json").read_text())
    assert sj["clean_acc"] == clean and sj["n_test"] == 200 and sj["batch_size"] == 64
    assert (rdir / "shift.csv").read_text().count("\n") == 1 + 6
    report = (bench_out / "report.md").read_text()
    assert "## Shifted test streams" in report
    assert "| bundled | cnn | sgd | rotate | 3 | 1 |" in report
    assert "| bundled | cnn | sgd | clean | 0 | 1 |" in report
    # The summary over shifted streams: here the one stream rotate@3.
    r3 = [100 * float(by_method[f"sgd+{t}@rotate3"]["test_acc"])
          for t in ("none", "tent", "spectral_tta")]
    assert "| bundled | cnn | sgd | 1 | " + " | ".join(f"{v:.2f} (n=1)" for v in r3) + " |" \
        in report


def test_zero_lr_tta_is_bn_statistics_and_standalone_cli(bench_out, capsys):
    rdir = next((bench_out / "runs").iterdir())
    before = (bench_out / "results.csv").read_text()
    p = shift_run(rdir, ["noise", "contrast"], [2], ["bn_stats", "tent", "spectral_tta"],
                  tta_lr=0.0, tta_rank=2, batch_size=50, write=False, log=lambda _: None)
    acc = {(r["shift"], r["method"]): r["accuracy"] for r in p["results"]}
    for kind in ("noise", "contrast"):
        assert acc[(kind, "tent")] == acc[(kind, "bn_stats")]
        assert acc[(kind, "spectral_tta")] == acc[(kind, "bn_stats")]
    # write=False left the bench's files alone; `dsbp shift OUT` redoes them with new settings.
    assert (bench_out / "results.csv").read_text() == before
    rc = main(["shift", str(bench_out), "--kinds", "blur,contrast", "--severities", "0,1",
               "--tta", "none,bn_stats", "--threads", "1"])
    assert rc == 0
    rows = {r["method"]: r for r in _rows(bench_out)}
    assert set(rows) == {"sgd"} | {f"sgd+{t}@{k}{s}" for t in ("none", "bn_stats")
                                   for k in ("blur", "contrast") for s in (0, 1)}
    # The clean stream (run once, repeated under each kind) is still the run's accuracy.
    for k in ("blur", "contrast"):
        assert rows[f"sgd+none@{k}0"]["test_acc"] == rows["sgd"]["test_acc"]
    report = (bench_out / "report.md").read_text()
    assert "| data set | model | method | shift | severity | runs | none | bn_stats |" in report
    assert "| bundled | cnn | sgd | blur | 1 | 1 |" in report


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="shift kind"):
        parse_kinds("rotate,fog")
    with pytest.raises(ValueError, match="0..5"):
        parse_severities("6")
    with pytest.raises(ValueError, match="not an integer"):
        parse_severities("1.5")
    with pytest.raises(ValueError, match="test-time method"):
        parse_tta("tent,sar")
    with pytest.raises(ValueError, match="not a run directory"):
        shift_run("/nonexistent", ["rotate"], [1])
    with pytest.raises(ValueError, match="tta_steps"):
        shift_run("/nonexistent", ["rotate"], [1], tta_steps=0)
