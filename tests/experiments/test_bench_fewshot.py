"""`dsbp bench --methods maml,spectral_maml` runs the few-shot grid (episodes, not the
supervised loop) and refuses a grid that mixes them with supervised methods."""

from __future__ import annotations

import csv

import pytest

from dsbp.cli import main


def test_bench_routes_fewshot_methods(tmp_path, monkeypatch):
    import dsbp.experiments.fewshot as fs

    seen = {}

    def fake(cfg, out, **kw):  # the runner itself is tested in test_fewshot.py
        seen["cfg"], seen["out"] = cfg, out
        (tmp_path / "results.csv").write_text("dataset,method\n")
        return {"csv": tmp_path / "results.csv", "report": tmp_path / "report.md", "cells": []}

    monkeypatch.setattr(fs, "fewshot", fake)
    assert main(["bench", "--methods", "maml,spectral_maml", "--datasets", "bundled",
                 "--seeds", "2", "--out", str(tmp_path / "o")]) == 0
    cfg = seen["cfg"]
    assert cfg.methods == ("maml", "spectral_maml") and cfg.seeds == (0, 1)
    assert cfg.datasets == ("bundled",) and seen["out"] == str(tmp_path / "o")
    assert list(csv.reader(open(tmp_path / "results.csv")))[0] == ["dataset", "method"]


def test_bench_refuses_mixed_fewshot_and_supervised(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--methods", "sgd,maml", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "cannot share a grid" in capsys.readouterr().err
