"""A diverging run stops with status 'diverged' and a clear message; the grid goes on."""

from __future__ import annotations

import csv

import pytest
import torch

from dsbp.experiments.atomic import read_jsonl
from dsbp.experiments.build import METHODS, Method, register_method
from dsbp.experiments.config import RunConfig
from dsbp.experiments.run import read_result, run
from dsbp.experiments.sweep import GridRun, bench

NAN_AT = 3


class _NaNAfter(torch.optim.SGD):
    """SGD that poisons the weights at its NAN_AT-th step: an injected divergence."""

    def step(self, closure=None):
        super().step(closure)
        self.n = getattr(self, "n", 0) + 1
        if self.n == NAN_AT:
            with torch.no_grad():
                for g in self.param_groups:
                    for p in g["params"]:
                        p.fill_(float("nan"))


@pytest.fixture
def nan_method():
    @register_method("_test_nan")
    def _factory(model, cfg, ctx):
        return Method(model, _NaNAfter(model.parameters(), lr=cfg.lr))

    yield "_test_nan"
    del METHODS["_test_nan"]


def _cfg(**kw):
    base = dict(subset=200, eval_subset=100, batch_size=50, epochs=2, log_every=1,
                checkpoint_every=0, model_kwargs={"width": 8})
    return RunConfig(**{**base, **kw})


def test_huge_learning_rate_diverges(tmp_path, bundled):
    res = run(_cfg(lr=1e6, momentum=0.0), tmp_path, progress=False, dataset=bundled)
    assert res.status == "diverged"
    assert "training loss is" in res.message and "stopping this run" in res.message
    last = read_jsonl(tmp_path / "metrics.jsonl")[-1]
    assert last["kind"] == "status" and last["status"] == "diverged"
    assert read_result(tmp_path).status == "diverged"


def test_injected_nan_stops_at_the_next_step_and_the_grid_goes_on(tmp_path, bundled, nan_method):
    runs = [GridRun(_cfg(method=nan_method), ()), GridRun(_cfg(method="sgd"), ())]
    lines = []
    made = bench(runs, tmp_path, meta={"command": "test"}, progress=False, log=lines.append)
    (gr_nan, r_nan), (gr_sgd, r_sgd) = made["results"]
    assert r_nan.status == "diverged"
    # The weights turn NaN in step NAN_AT; the loss of step NAN_AT + 1 is the first non-finite.
    assert f"step {NAN_AT + 1}" in r_nan.message
    assert r_nan.steps == NAN_AT
    assert r_sgd.status == "ok" and 0 <= r_sgd.test_acc <= 1
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["status"] for r in rows] == ["diverged", "ok"]
    assert "diverged" in (tmp_path / "report.md").read_text()


def test_a_raising_run_is_recorded_and_the_grid_goes_on(tmp_path, bundled):
    runs = [GridRun(_cfg(model="no_such_model"), ()), GridRun(_cfg(), ())]
    made = bench(runs, tmp_path, meta={"command": "test"}, progress=False, log=lambda s: None)
    statuses = [res.status for _, res in made["results"]]
    assert statuses == ["error", "ok"]
    run_dir = tmp_path / "runs" / runs[0].name
    assert "no_such_model" in (run_dir / "error.txt").read_text()
