"""report.md: per-group mean ± sample std over ok runs only, the paper's claims labelled."""

from __future__ import annotations

import numpy as np

from dsbp.experiments.report import PAPER_CLAIMED_ACC, paper_claim, summarise, write_report


def _row(method, seed, acc, status="ok", rank=None):
    return {"dataset": "fashion_mnist", "model": "cnn", "method": method, "seed": seed,
            "test_acc": acc, "test_loss": 1 - acc, "wall_s": 10.0 + seed, "status": status,
            "device": "cpu", "run": f"{method}-{rank}-{seed}", "rank": rank, "message": ""}


def test_summary_groups_by_ablated_setting_and_skips_failed_runs():
    rows = [_row("dsbp", s, a, rank=2) for s, a in enumerate([0.8, 0.82, 0.81])]
    rows += [_row("dsbp", s, a, rank=5) for s, a in enumerate([0.85, 0.86])]
    rows += [_row("dsbp", 2, float("nan"), status="diverged", rank=5)]
    groups = {g["settings"]: g for g in summarise(rows, ["rank"])}
    assert set(groups) == {"rank=2", "rank=5"}
    np.testing.assert_allclose(np.mean(groups["rank=2"]["acc"]), np.mean([0.8, 0.82, 0.81]))
    assert (groups["rank=5"]["n_ok"], groups["rank=5"]["n_failed"]) == (2, 1)
    assert groups["rank=5"]["acc"] == [0.85, 0.86]


def test_report_shows_sample_std_and_labels_the_papers_claims(tmp_path):
    accs = [0.80, 0.83, 0.86]
    rows = [_row("sam", s, a) for s, a in enumerate(accs)]
    path = write_report(tmp_path / "report.md", rows, [], {"command": "dsbp bench X",
                                                          "env": {"commit": "abc"}})
    text = path.read_text()
    m, s = 100 * np.mean(accs), 100 * np.std(accs, ddof=1)
    assert f"{m:.2f} ± {s:.2f}" in text
    assert f"{PAPER_CLAIMED_ACC['Fashion-MNIST']['SAM']:.1f} (paper's claim)" in text
    assert "`dsbp bench X`" in text and "`abc`" in text and "not the paper's setting" in text


def test_paper_claim_lookup():
    assert paper_claim("cifar10", "dsbp") == PAPER_CLAIMED_ACC["CIFAR-10"]["DSBP"]
    assert paper_claim("medmnist:breastmnist", "sam") == PAPER_CLAIMED_ACC["MedMNIST"]["SAM"]
    assert paper_claim("cifar10", "sgd") is None  # the paper reports no plain SGD
    assert paper_claim("fashion_mnist", "lora") is None  # nor LoRA on Fashion-MNIST
