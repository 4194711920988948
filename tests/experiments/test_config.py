"""RunConfig: JSON round trip, validation with named errors, presets that build valid grids."""

from __future__ import annotations

import json

import pytest

from dsbp.experiments.build import METHODS
from dsbp.experiments.config import PRESETS, RunConfig, get_preset, setting_value, with_setting
from dsbp.models.registry import MODEL_NAMES


def test_json_round_trip_is_identity():
    cfg = RunConfig(dataset="medmnist:breastmnist", model="resnet18", method="dsbp", seed=3,
                    epochs=7, lr=0.01, schedule="onecycle", warmup_frac=0.2, subset=500,
                    track=("spectrum", "hessian"), model_kwargs={"width": 8},
                    method_kwargs={"rank": 10, "interval": 100, "side": "input"}, amp="bf16")
    text = cfg.to_json()
    back = RunConfig.from_json(text)
    assert back == cfg
    assert back.to_json() == text
    # The JSON is plain data (lists, not tuples) that json reads on its own.
    assert json.loads(text)["track"] == ["spectrum", "hessian"]


def test_method_kwargs_order_does_not_matter():
    a = RunConfig(method_kwargs={"rank": 2, "interval": 5})
    b = RunConfig(method_kwargs={"interval": 5, "rank": 2})
    assert a == b and a.to_json() == b.to_json()


def test_unknown_field_is_an_error():
    d = RunConfig().to_dict()
    d["rnak"] = 3
    with pytest.raises(ValueError, match="rnak"):
        RunConfig.from_dict(d)


@pytest.mark.parametrize("field,value", [
    ("epochs", 0), ("batch_size", -1), ("lr", 0.0), ("momentum", 1.0), ("schedule", "step"),
    ("warmup_frac", 1.0), ("label_smoothing", 1.0), ("subset", 0), ("amp", "fp8"),
    ("weight_decay", -1e-4), ("seed", -1), ("checkpoint_every", -1),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        RunConfig(**{field: value})


def test_onecycle_needs_warmup():
    with pytest.raises(ValueError, match="onecycle"):
        RunConfig(schedule="onecycle", warmup_frac=0.0)


def test_with_setting_routes_fields_and_method_kwargs():
    cfg = with_setting(with_setting(RunConfig(), "lr", 0.2), "rank", 7)
    assert cfg.lr == 0.2 and cfg.method_kwargs == {"rank": 7}
    assert setting_value(cfg, "rank") == 7 and setting_value(cfg, "lr") == 0.2
    assert cfg.run_name(("rank",)) == "bundled-cnn-sgd-rank=7-s0"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_valid_grids(name):
    preset = get_preset(name)
    cfgs = preset.configs()
    assert len(cfgs) == len(preset.datasets) * len(preset.methods) * preset.seeds
    for cfg in cfgs:
        assert cfg.method in METHODS, cfg.method
        assert cfg.model in MODEL_NAMES, cfg.model
        assert RunConfig.from_json(cfg.to_json()) == cfg
    assert len({c.run_name() for c in cfgs}) == len(cfgs)


def test_paper_preset_carries_the_papers_values():
    # METHOD.md §1: ResNet-18, k = 10, p = 100, eta = 0.01, beta = 0.1, 5 power iterations.
    for cfg in get_preset("paper").configs():
        assert cfg.model == "resnet18" and cfg.lr == 0.01
        if cfg.method == "dsbp":
            assert {k: cfg.method_kwargs[k] for k in ("rank", "interval", "sharpness",
                                                      "power_iters")} == {
                "rank": 10, "interval": 100, "sharpness": 0.1, "power_iters": 5}


def test_demo_preset_is_sgd_against_dsbp_on_bundled_data():
    p = get_preset("demo")
    assert set(p.methods) == {"sgd", "dsbp"} and p.datasets == ("bundled",)
    assert p.base.model == "cnn"


def test_unknown_preset():
    with pytest.raises(ValueError, match="smoke"):
        get_preset("nope")
