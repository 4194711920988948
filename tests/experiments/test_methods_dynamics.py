"""The dynamics extensions' harness methods train through the loop and resume bit-exactly;
the rotation-only variant keeps every projected weight's singular values."""

from __future__ import annotations

import pytest
import torch

from dsbp.experiments.build import METHODS, build_model_for, discover_methods, load_data
from dsbp.experiments.config import RunConfig
from dsbp.experiments.run import run


def _cfg(method: str) -> RunConfig:
    return RunConfig(method=method, model="mlp", subset=40, eval_subset=20, batch_size=20,
                     epochs=1, log_every=1, checkpoint_every=0, momentum=0.0, weight_decay=0.0,
                     model_kwargs={"hidden": [16]},
                     method_kwargs={"rank": 2, "interval": 1, "power_iters": 2})


@pytest.mark.parametrize("method", ["dsbp_adaptive", "dsbp_lie", "dsbp_lie_rot"])
def test_dynamics_methods_train(tmp_path, bundled, method):
    discover_methods()
    assert method in METHODS
    res = run(_cfg(method), tmp_path, progress=False, dataset=bundled)
    assert res.status == "ok", res.message
    assert res.steps == 2


def test_rotation_update_preserves_singular_values_through_the_harness(tmp_path, bundled):
    cfg = _cfg("dsbp_lie_rot")
    run(cfg, tmp_path, progress=False, dataset=bundled)
    trained = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    torch.manual_seed(cfg.seed)
    init = build_model_for(cfg, load_data(cfg, torch.device("cpu"), bundled)).state_dict()
    mats = [k for k, w in trained.items() if k.endswith("weight") and w.dim() == 2]
    assert any(not torch.equal(trained[k], init[k]) for k in mats), "no weight moved"
    for k in mats:
        w = trained[k]
        torch.testing.assert_close(torch.linalg.svdvals(w.double()),
                                   torch.linalg.svdvals(init[k].double()), rtol=1e-4, atol=1e-5)
