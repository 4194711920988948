"""Factories: the LR schedule against its closed form, the method registry and its extension."""

from __future__ import annotations

import math

import pytest
import torch

from dsbp.experiments.build import (
    METHODS,
    LRFactor,
    Method,
    build_schedule,
    get_method,
    register_method,
)
from dsbp.experiments.config import RunConfig


@pytest.mark.parametrize("shape", ["constant", "cosine", "linear", "onecycle"])
def test_schedule_matches_closed_form(shape):
    total, warmup, peak = 40, 8, 0.3
    cfg = RunConfig(lr=peak, schedule=shape, warmup_frac=warmup / total, epochs=4)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = build_schedule(opt, cfg, steps_per_epoch=total // 4)
    for t in range(total):
        lr = opt.param_groups[0]["lr"]
        if t < warmup:
            want = peak * (t + 1) / warmup
        else:
            u = (t - warmup) / (total - warmup)
            want = {"constant": peak, "cosine": peak * 0.5 * (1 + math.cos(math.pi * u)),
                    "linear": peak * (1 - u), "onecycle": peak * (1 - u)}[shape]
        assert lr == pytest.approx(want, rel=1e-12, abs=1e-15), (t, lr, want)
        opt.step()
        sched.step()


def test_lr_factor_validates():
    with pytest.raises(ValueError):
        LRFactor(10, 10, "cosine")
    with pytest.raises(ValueError, match="shape"):
        LRFactor(10, 0, "step")


def test_required_methods_are_registered():
    for name in ("sgd", "adamw", "sam", "dsbp", "dsbp_input", "lora", "dom_sgd", "bulk_sgd"):
        assert name in METHODS
    assert {"rank", "interval"} <= get_method("dsbp").settings
    assert "rank" not in get_method("sgd").settings


def test_registry_is_extensible_and_rejects_duplicates():
    @register_method("_test_plain", settings=("alpha",))
    def _factory(model, cfg, ctx):
        return Method(model, torch.optim.SGD(model.parameters(), lr=cfg.lr))

    try:
        assert get_method("_test_plain").settings == frozenset({"alpha"})
        with pytest.raises(ValueError, match="already registered"):
            register_method("_test_plain")(_factory)
    finally:
        del METHODS["_test_plain"]
    with pytest.raises(ValueError, match="registered"):
        get_method("_test_plain")


def test_dsbp_input_method_uses_the_input_side(bundled):
    from dsbp.experiments.build import BuildContext, build_method, build_model_for, load_data

    cfg = RunConfig(method="dsbp_input", subset=100, method_kwargs={"rank": 3, "interval": 7})
    data = load_data(cfg, torch.device("cpu"), bundled)
    model = build_model_for(cfg, data)
    m = build_method(model, cfg, BuildContext(torch.nn.functional.cross_entropy, data.train,
                                              torch.device("cpu"), data.num_classes))
    try:
        assert m.optimizer.projector.side == "input"
        assert m.optimizer.projector.rank == 3 and m.optimizer.projector.interval == 7
    finally:
        m.close()


def test_methods_modules_are_discovered(tmp_path, monkeypatch):
    import dsbp.experiments as pkg
    from dsbp.experiments import build

    plugin = tmp_path / "methods_testplugin.py"
    plugin.write_text(
        "import torch\n"
        "from dsbp.experiments.build import Method, register_method\n"
        "@register_method('_test_plugin')\n"
        "def f(model, cfg, ctx):\n"
        "    return Method(model, torch.optim.SGD(model.parameters(), lr=cfg.lr))\n"
    )
    monkeypatch.setattr(pkg, "__path__", [*pkg.__path__, str(tmp_path)])
    monkeypatch.setattr(build, "_discovered", False)
    try:
        assert get_method("_test_plugin").name == "_test_plugin"
    finally:
        METHODS.pop("_test_plugin", None)
        import sys

        sys.modules.pop("dsbp.experiments.methods_testplugin", None)
