"""The pruning ablation in `dsbp bench` (dsbp.experiments.prune) on the bundled data set.

Independent answers: torch's own FLOP counter (``torch.utils.flop_counter``) for the analytic
FLOPs; the closed form ``E E^T = I`` at full rank (tau = 1, every layer factorised: the
outputs, hence the accuracy, are the original's); the run's own logged test accuracy.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dsbp.cli import main
from dsbp.experiments.build import build_model_for, load_data
from dsbp.experiments.prune import parse_taus, prune_run
from dsbp.experiments.run import load_config, read_result
from dsbp.layers.adapters import as_matrix

TAUS = (1.0, 0.99, 0.9, 0.6)


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    """A one-run bench (SmallCNN width 8, 200 bundled images, 1 epoch) with the ablation."""
    out = tmp_path_factory.mktemp("prune_bench")
    torch.set_num_threads(1)
    rc = main(["bench", "--datasets", "bundled", "--methods", "sgd", "--model", "cnn",
               "--set", 'model_kwargs={"width": 8}', "--epochs", "1", "--subset", "200",
               "--eval-subset", "200",
               "--batch-size", "50", "--seeds", "1", "--no-progress", "--out", str(out),
               "--ablate", "prune=" + ",".join(map(str, TAUS))])
    assert rc == 0
    return out


def _rows(out):
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_bench_rows_report_and_monotone_cost(bench_out):
    rows = _rows(bench_out)
    by_method = {r["method"]: r for r in rows}
    orig = by_method["sgd"]
    assert {f"sgd+factorise@{t:g}" for t in TAUS} | {"sgd", "sgd+finetune"} == set(by_method)
    # Params / FLOPs never grow as tau falls, and the lowest tau really shrinks the model.
    costs = [(int(orig["params"]), int(orig["flops"]))]
    costs += [(int(by_method[f"sgd+factorise@{t:g}"]["params"]),
               int(by_method[f"sgd+factorise@{t:g}"]["flops"])) for t in TAUS]
    for (p0, f0), (p1, f1) in zip(costs, costs[1:], strict=False):
        assert p1 <= p0 and f1 <= f0
    assert costs[-1][0] < costs[0][0] and costs[-1][1] < costs[0][1]
    # The original's FLOPs agree with torch's FLOP counter on the rebuilt model (2 x MACs).
    rdir = bench_out / "runs" / orig["run"]
    cfg = load_config(rdir)
    data = load_data(cfg, torch.device("cpu"))
    model = build_model_for(cfg, data).eval()
    with FlopCounterMode(display=False) as fc:
        model(torch.zeros(1, data.in_channels, data.image_size, data.image_size))
    assert int(orig["flops"]) == fc.get_total_flops()
    assert int(orig["params"]) == sum(p.numel() for p in model.parameters())
    # tau = 1 changes no layer (no FLOP saving at full rank), so after the same seeded
    # fine-tune it matches the control exactly.
    full = by_method["sgd+factorise@1"]
    assert float(full["acc_before_ft"]) == float(orig["test_acc"])
    assert float(full["test_acc"]) == float(by_method["sgd+finetune"]["test_acc"])
    report = (bench_out / "report.md").read_text()
    assert "## Pruning ablation" in report
    for t in TAUS:
        assert f"| sgd+factorise@{t:g} |" in report
    pj = json.loads((rdir / "prune.json").read_text())
    assert [r["tau"] for r in pj["results"]] == list(TAUS)
    assert (rdir / "prune.csv").read_text().count("\n") == len(TAUS) + 2


def test_full_rank_factorisation_keeps_accuracy(bench_out):
    rdir = next((bench_out / "runs").iterdir())
    p = prune_run(rdir, [1.0, 0.9], finetune_epochs=0, min_saving=None, write=False,
                  log=lambda s: None)
    o = p["original"]
    # checkpoint.pt holds the final model: re-evaluated, it scores what the run logged.
    assert o["acc"] == read_result(rdir).test_acc
    full, low = p["results"]
    n_layers = len(full["layers"])
    assert full["layers_changed"] == n_layers  # every layer replaced by E (E^T W)
    # At tau = 1 each E keeps the layer's whole output range: d_out directions, or all the
    # fan-in allows (a 3x3 conv on 1 channel has at most 9 (+ bias) output directions).
    model = build_model_for(load_config(rdir), load_data(load_config(rdir), torch.device("cpu")))
    for name, v in full["layers"].items():
        fan_in = as_matrix(model.get_submodule(name).weight).shape[1]
        assert v["rank"] >= min(v["d_out"], fan_in), name
    assert any(v["rank"] == v["d_out"] for v in full["layers"].values())
    assert full["params"] > o["params"]  # two full-rank factors cost more than W
    assert full["acc_before"] == o["acc"]  # E E^T = I: same logits, same accuracy
    assert abs(full["loss_before"] - o["loss"]) < 1e-4
    assert full["acc_after"] == full["acc_before"]  # 0 fine-tuning epochs
    assert low["params"] < full["params"] and low["flops"] < full["flops"]


def test_prune_mode_and_bad_input(bench_out):
    rdir = next((bench_out / "runs").iterdir())
    p = prune_run(rdir, [0.99, 0.6], mode="prune", finetune_epochs=0, write=False,
                  log=lambda s: None)
    a, b = p["results"]
    assert b["params"] <= a["params"] <= p["original"]["params"]
    assert b["params"] < p["original"]["params"]
    with pytest.raises(ValueError, match="tau"):
        parse_taus("0.9,1.5")
    with pytest.raises(ValueError, match="mode"):
        prune_run(rdir, [0.9], mode="shrink")
    with pytest.raises(ValueError, match="not a run directory"):
        prune_run(bench_out, [0.9])
