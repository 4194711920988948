"""`dsbp fewshot` (dsbp.experiments.fewshot): MAML vs spectral MAML on held-out classes.

Independent answers: with no meta-training and an inner step size of 0, adaptation is the
identity (phi = theta), so each test episode's accuracy is the initial conv-4's query accuracy,
computed here by hand from episodes drawn independently (``EpisodeSampler`` on the held-out
classes of ``class_split``); the 95% CI is recomputed with ``statistics`` from the stored
per-episode accuracies.
"""

from __future__ import annotations

import csv
import json
import math
import statistics

import pytest
import torch

from dsbp.cli import main
from dsbp.data import load_dataset
from dsbp.data.episodes import EpisodeSampler, class_split
from dsbp.experiments.fewshot import FewshotConfig, conv4, fewshot

TINY = {"datasets": ("bundled",), "n_way": 5, "shots": (1,), "seeds": (0,), "n_query": 2,
        "width": 8, "meta_batch": 2, "test_episodes": 6, "rank": 4}


def _rows(out):
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_no_adaptation_is_the_initial_model_on_held_out_classes(tmp_path):
    cfg = FewshotConfig(**TINY, meta_iters=0, inner_lr=0.0, test_inner_steps=1)
    made = fewshot(cfg, tmp_path, log=lambda _: None)
    cells = {c["method"]: c for c in made["cells"]}
    assert set(cells) == {"maml", "spectral_maml"}
    ds = load_dataset("bundled")
    train_cls, test_cls = class_split(10, (0.5, 0.5), seed=0)
    for c in cells.values():
        assert c["train_classes"] == train_cls and c["test_classes"] == test_cls
        assert not set(c["train_classes"]) & set(c["test_classes"])
    # By hand: the seed-0 conv-4, BatchNorm on each query set's statistics, no adaptation.
    torch.manual_seed(0)
    model = conv4(1, 5, 8, 28).train()
    m = torch.tensor(ds.mean).view(1, -1, 1, 1)
    s = torch.tensor(ds.std).view(1, -1, 1, 1)
    eps = EpisodeSampler(ds.x_test, ds.y_test, test_cls, 5, 1, 2, seed=10_000)
    want = []
    with torch.no_grad():
        for ep in eps.episodes(6):
            assert set(ep.classes.tolist()) <= set(test_cls)
            pred = model((ep.query_x.float() / 255 - m) / s).argmax(1)
            want.append(int((pred == ep.query_y).sum()) / len(ep.query_y))
    for c in cells.values():
        assert c["episode_accs"] == pytest.approx(want, abs=1e-6)
    # results.csv: the mean and the 95% CI of the stored episodes; report.md has the line.
    rows = {r["method"]: r for r in _rows(tmp_path)}
    for name, c in cells.items():
        accs = c["episode_accs"]
        assert float(rows[name]["test_acc"]) == pytest.approx(statistics.fmean(accs))
        ci = 1.96 * statistics.stdev(accs) / math.sqrt(len(accs))
        assert float(rows[name]["ci95"]) == pytest.approx(ci)
        assert rows[name]["n_episodes"] == "6"
    report = (tmp_path / "report.md").read_text()
    line = next(ln for ln in report.splitlines() if ln.startswith("| bundled | 5-way 1-shot"))
    mean = 100 * statistics.fmean(want)
    assert line.count(f"{mean:.2f} ±") == 2
    assert json.loads((tmp_path / "config.json").read_text())["inner_lr"] == 0.0
    assert (tmp_path / "env.json").exists()


def test_cli_meta_trains_and_resumes(tmp_path, capsys):
    args = ["fewshot", "--datasets", "bundled", "--shots", "1", "--n-query", "2", "--width",
            "8", "--meta-iters", "2", "--meta-batch", "2", "--test-episodes", "4", "--rank",
            "4", "--threads", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    cells = sorted((tmp_path / "runs").glob("*.json"))
    assert [p.name for p in cells] == ["bundled-5w1s-maml-s0.json",
                                       "bundled-5w1s-spectral_maml-s0.json"]
    for p in cells:
        c = json.loads(p.read_text())
        assert math.isfinite(c["meta_loss_first"]) and math.isfinite(c["meta_loss_last"])
    before = [p.read_text() for p in cells]
    with pytest.raises(SystemExit):  # the CLI reports the FileExistsError as a usage error
        main(args)
    assert "already holds cells" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0  # same settings: the cells are kept as they were
    assert [p.read_text() for p in cells] == before
    assert {r["method"] for r in _rows(tmp_path)} == {"maml", "spectral_maml"}


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="unknown method"):
        FewshotConfig(methods=("reptile",))
    with pytest.raises(ValueError, match="n_way"):
        FewshotConfig(n_way=0)
    with pytest.raises(ValueError, match="side"):
        FewshotConfig(side="both")
