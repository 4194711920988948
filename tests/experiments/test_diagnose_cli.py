"""`dsbp diagnose` and `dsbp figures` end to end on a tiny real run (bundled Fashion-MNIST)."""

from __future__ import annotations

import json

import pytest

from dsbp.cli import main
from dsbp.experiments.config import RunConfig
from dsbp.experiments.run import run


@pytest.mark.slow
def test_diagnose_then_figures(tmp_path, bundled):
    cfg = RunConfig(dataset="bundled", model="cnn", method="dsbp", epochs=1, batch_size=50,
                    subset=200, eval_subset=100, lr=0.05, model_kwargs={"width": 4},
                    method_kwargs={"rank": 2, "interval": 2}, track=("alignment", "hessian"))
    rd = tmp_path / "run"
    run(cfg, rd, progress=False, dataset=bundled)
    assert main(["diagnose", str(rd), "--batches", "1", "--hessian-k", "2", "--trace-samples",
                 "2", "--slice-points", "3", "--slice-2d-points", "2", "--perturb-draws", "2",
                 "--pac-bayes", "--pac-samples", "100", "--pac-mc", "2"]) == 0
    d = json.loads((rd / "diagnostics" / "diagnostics.json").read_text())
    # Cauchy interlacing: the whole Hessian's top eigenvalue bounds every diagonal block's.
    top = d["hessian_top_eigenvalues"][0]
    assert all(top >= b["top"] - 1e-4 * abs(top) for b in d["hessian_top_per_layer"])
    # The slice through alpha = 0 and the perturbation curve's base are the same loss.
    mid = d["slice_1d"]["random_filter_normalised"][1]
    assert d["slice_1d"]["alphas"][1] == 0.0
    assert abs(mid - d["perturbation"]["base_loss"]) < 1e-5 * max(1.0, abs(mid))
    assert d["stratification"]["basis"] == "DSBP basis"
    pb = d["pac_bayes"]
    assert pb["empirical"] <= pb["empirical_upper"] <= pb["bound"] <= 1.0
    assert (rd / "diagnostics" / "landscape_perturbation.png").stat().st_size > 0
    out = tmp_path / "figs"
    assert main(["figures", str(tmp_path), "--out", str(out)]) == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["fig1a_alignment.png", "fig1b_hessian.png", "fig2_stratification.png",
                     "fig3a_landscape.png", "fig3b_eigvar.png", "fig4_perturbation.png"]
