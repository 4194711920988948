"""Plots from run directories: seed averaging against numpy, labels of ablated settings, PNGs.

The run directories here are written by hand (the test's point is reading and plotting them,
not training), with curves given by closed forms.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from dsbp.plots.curves import plot_accuracy_vs_wallclock, plot_learning_curves
from dsbp.plots.rundir import mean_curve, read_run, read_runs


def _write_run(folder, method, seed, acc, rank=None, torn=False):
    folder.mkdir(parents=True)
    cfg = {"dataset": "bundled", "model": "cnn", "method": method, "seed": seed, "lr": 0.05,
           "method_kwargs": {} if rank is None else {"rank": rank}}
    (folder / "config.json").write_text(json.dumps(cfg))
    recs = []
    for e, a in enumerate(acc, start=1):
        recs.append({"kind": "train", "step": 10 * e, "epoch": e, "train_loss": 1 / e,
                     "wall_s": 2.0 * e + seed})
        recs.append({"kind": "eval", "step": 10 * e, "epoch": e, "test_acc": a,
                     "test_loss": 1 - a, "wall_s": 2.0 * e + seed})
    text = "".join(json.dumps(r) + "\n" for r in recs)
    if torn:
        text += '{"kind": "train", "st'  # a line cut short by a crash
    (folder / "metrics.jsonl").write_text(text)
    (folder / "result.json").write_text(json.dumps({"status": "ok", "test_acc": acc[-1]}))
    return folder


def test_mean_curve_matches_numpy():
    x = np.arange(1.0, 6.0)
    ys = [np.sin(x) + s for s in (0.0, 0.5, 2.0)]
    xs, m, s = mean_curve([(x, y) for y in ys])
    np.testing.assert_array_equal(xs, x)
    np.testing.assert_allclose(m, np.mean(ys, axis=0), rtol=1e-15)
    np.testing.assert_allclose(s, np.std(ys, axis=0), rtol=1e-15)


def test_mean_curve_keeps_only_common_points():
    a = (np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0]))
    b = (np.array([1.0, 2.0]), np.array([3.0, 4.0]))  # a shorter (diverged) run
    xs, m, _ = mean_curve([a, b])
    np.testing.assert_array_equal(xs, [1.0, 2.0])
    np.testing.assert_array_equal(m, [2.0, 3.0])


def test_read_run_skips_a_torn_line(tmp_path):
    run = read_run(_write_run(tmp_path / "r", "sgd", 0, [0.5, 0.6], torn=True))
    x, y = run.series("eval", "epoch", "test_acc")
    np.testing.assert_array_equal(x, [1, 2])
    np.testing.assert_array_equal(y, [0.5, 0.6])
    with pytest.raises(ValueError, match="not a run directory"):
        read_run(tmp_path)


def test_labels_name_only_the_settings_that_vary(tmp_path):
    dirs = [_write_run(tmp_path / "a", "dsbp", 0, [0.5], rank=2),
            _write_run(tmp_path / "b", "dsbp", 0, [0.5], rank=5),
            _write_run(tmp_path / "c", "sgd", 0, [0.5]),
            _write_run(tmp_path / "d", "sgd", 1, [0.5])]
    labels = [r.label for r in read_runs(dirs)]
    assert labels == ["dsbp rank=2", "dsbp rank=5", "sgd", "sgd"]


def test_plots_are_written_as_png(tmp_path):
    dirs = [_write_run(tmp_path / f"{m}{s}", m, s, [0.3 + 0.1 * e + 0.01 * s for e in range(3)])
            for m in ("sgd", "dsbp") for s in range(2)]
    for fn, name in ((plot_learning_curves, "lc.png"), (plot_accuracy_vs_wallclock, "aw.png")):
        out = fn(dirs, tmp_path / name)
        assert out == tmp_path / name
        with Image.open(out) as im:
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200
    assert plot_learning_curves([], tmp_path / "none.png") is None
