"""`dsbp.plots.figures` on hand-written run directories (no training code involved)."""

from __future__ import annotations

import json

import pytest

from dsbp.plots.figures import find_run_dirs, make_figures


def _run(root, method, with_diag):
    d = root / "runs" / f"bundled-cnn-{method}-s0"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"dataset": "bundled", "method": method,
                                               "seed": 0, "model": "cnn"}))
    recs = [{"kind": "eval", "epoch": e, "hessian/top_eigenvalue": 10.0 / e,
             **({"alignment/energy_kept/mean": 0.5 + 0.1 * e} if method == "dsbp" else {})}
            for e in (1, 2, 3)]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    if with_diag:
        (d / "diagnostics").mkdir()
        pts = [[float(i), float(i % 3), float(i % 5)] for i in range(20)]
        (d / "diagnostics" / "diagnostics.json").write_text(json.dumps({
            "slice_1d": {"alphas": [-1, 0, 1], "random_filter_normalised": [2.0, 1.0, 2.5],
                         "top_hessian_eigenvector": [3.0, 1.0, 3.5]},
            "activation_spectra": [{"index": 0, "variance": 0.01}, {"index": 1, "variance": 0.02}],
            "perturbation": {"radii": [0, 0.1], "mean_increase": [0.0, 0.3]},
            "stratification": {"layer": "conv1", "basis": "DSBP basis", "rank": 2,
                               "before": pts, "after": pts},
        }))
    return d


def test_figures_from_run_dirs(tmp_path):
    dirs = [_run(tmp_path, m, m != "sam") for m in ("sgd", "sam", "dsbp")]
    assert find_run_dirs([tmp_path]) == sorted(dirs)
    assert find_run_dirs([dirs[0]]) == [dirs[0]]
    made = make_figures([tmp_path], tmp_path / "figs")
    assert len(made) == 6 and all(p.stat().st_size > 1000 for p in made)
    made = make_figures([tmp_path], tmp_path / "figs2", which=["4"])
    assert [p.name for p in made] == ["fig4_perturbation.png"]


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="no run directories"):
        find_run_dirs([tmp_path])
    _run(tmp_path, "sgd", False)
    with pytest.raises(ValueError, match="unknown figure"):
        make_figures([tmp_path], tmp_path / "f", which=["5"])
