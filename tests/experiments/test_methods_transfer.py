"""The spectral-transfer harness methods train through the loop, with their defining
constraint: the adapter leaves W0 frozen; the penalty's state is checkpointed."""

from __future__ import annotations

import torch

from dsbp.experiments.build import METHODS, build_model_for, discover_methods, load_data
from dsbp.experiments.config import RunConfig
from dsbp.experiments.run import run


def _cfg(method: str) -> RunConfig:
    return RunConfig(method=method, subset=40, eval_subset=20, batch_size=20, epochs=1,
                     log_every=1, checkpoint_every=0, momentum=0.0, weight_decay=0.0,
                     model_kwargs={"width": 4}, method_kwargs={"rank": 2, "mu": 1.0})


def test_spectral_adapter_trains_only_the_adapter(tmp_path, bundled):
    discover_methods()
    assert "spectral_adapter" in METHODS
    res = run(_cfg("spectral_adapter"), tmp_path, progress=False, dataset=bundled)
    assert res.status == "ok", res.message
    sd = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    frozen = {k.replace(".base.", "."): v for k, v in sd.items() if ".base." in k}
    assert frozen and any(k.endswith(".K") for k in sd)
    torch.manual_seed(0)  # the harness seeds the model init with the run seed
    cfg = _cfg("spectral_adapter")
    init = build_model_for(cfg, load_data(cfg, torch.device("cpu"), bundled)).state_dict()
    for k, w0 in frozen.items():  # W0 is frozen: bit-identical to the initial weights
        assert torch.equal(w0, init[k]), k
    assert any(not torch.equal(sd[k], torch.zeros_like(sd[k])) for k in sd if k.endswith(".K"))


def test_spectral_penalty_trains_and_checkpoints_its_state(tmp_path, bundled):
    res = run(_cfg("spectral_penalty"), tmp_path, progress=False, dataset=bundled)
    assert res.status == "ok", res.message
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert "spectral_penalty" in ck["method"]
