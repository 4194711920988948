"""`dsbp table`: task names, the fine-tuning protocol, the report remade from run files alone,
the few-shot core columns, the GPU-time estimate and the host facts in env.json."""

from __future__ import annotations

import copy
import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from dsbp.experiments import table
from dsbp.experiments.config import RunConfig
from dsbp.experiments.hostinfo import blas_info, compute_info, vector_level
from dsbp.experiments.methods_finetune import classifier_name, load_pretrained
from dsbp.models.cnn import SmallCNN

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------ task names
def test_task_names_round_trip_and_bad_suffix():
    for ds, cls, size in [("cifar10", (5, 9), None), ("tiny_imagenet", (0, 99), 32),
                          ("medmnist:breastmnist", None, None), ("tiny_imagenet", None, 32)]:
        assert table.parse_task(table.task_name(ds, cls, size)) == (ds, cls, size)
    assert table.task_name("tiny_imagenet", (100, 199), 32) == "tiny_imagenet@32px@c100-199"
    with pytest.raises(ValueError, match="suffix 'x3'"):
        table.parse_task("cifar10@x3")


def test_derive_task_selects_relabels_and_pools(bundled):
    t = table.derive_task(bundled, "bundled@c5-9")
    keep = (bundled.y_train >= 5) & (bundled.y_train <= 9)
    # the same images in the same order, labels shifted to 0..4
    assert torch.equal(t.x_train, bundled.x_train[keep])
    assert torch.equal(t.y_train, bundled.y_train[keep] - 5)
    assert sorted(t.y_test.unique().tolist()) == [0, 1, 2, 3, 4]
    assert t.classes == bundled.classes[5:]
    assert t.mean == bundled.mean  # normalised like the whole data set
    p = table.derive_task(bundled, "bundled@14px")
    # independent answer: each output pixel is the rounded mean of its 2x2 block
    blocks = bundled.x_test[:3].float().unfold(2, 2, 2).unfold(3, 2, 2).mean((-1, -2))
    assert torch.equal(p.x_test[:3], blocks.round().to(torch.uint8))
    with pytest.raises(ValueError, match="outside"):
        table.derive_task(bundled, "bundled@c5-10")


# ------------------------------------------------------------------------ fine-tuning init
def test_load_pretrained_copies_all_but_the_new_classifier(tmp_path):
    torch.manual_seed(0)
    src = SmallCNN(1, 5, width=4, hidden=8)
    for p in src.parameters():  # make it distinguishable from any fresh init
        p.data.add_(1.0)
    src.features[1].running_mean.fill_(0.3)
    torch.save({"format": 1, "model": src.state_dict()}, tmp_path / "checkpoint.pt")
    torch.manual_seed(1)
    dst = SmallCNN(1, 5, width=4, hidden=8)
    head = classifier_name(dst)
    assert head == "head.3"
    fresh_head = copy.deepcopy(dst.head[3].state_dict())
    left = load_pretrained(dst, tmp_path / "checkpoint.pt")
    assert sorted(left) == ["head.3.bias", "head.3.weight"]
    for k, v in dst.state_dict().items():
        if k.startswith("head.3."):  # a wrong loader that copies the head fails here
            torch.testing.assert_close(v, fresh_head[k.split(".")[-1]], rtol=0, atol=0)
        else:  # ... and one that skips buffers or other layers fails here
            torch.testing.assert_close(v, src.state_dict()[k], rtol=0, atol=0)
    other = SmallCNN(1, 5, width=8, hidden=8)
    with pytest.raises(ValueError, match="shapes differ"):
        load_pretrained(other, tmp_path / "checkpoint.pt")
    with pytest.raises(FileNotFoundError, match="pretraining"):
        load_pretrained(dst, tmp_path / "missing.pt")


# ------------------------------------------------------------------- a tiny table, end to end
def _tiny_spec() -> table.TableSpec:
    row = table.RowPlan("bundled", epochs=1, subset=100, eval_subset=100, size=None,
                        source="bundled@c0-4", target="bundled@c5-9", n_way=3)
    base = RunConfig(model="cnn", model_kwargs={"width": 4}, batch_size=50, lr=0.05,
                     checkpoint_every=0, log_every=1)
    return table.TableSpec(
        name="test", rows=(row,), seeds=1, base=base, lora_rank=2,
        paper_dsbp={"rank": 2, "interval": 1, "sharpness": 0.1, "power_iters": 2},
        recommended={"rank": 2, "interval": 1, "sharpness": 0.1, "power_iters": 2,
                     "residual": 0.5},
        fewshot={"width": 4, "meta_iters": 1, "meta_batch": 1, "inner_steps": 1,
                 "test_inner_steps": 1, "n_query": 2, "test_episodes": 2}, k_shot=1,
        ablate_rank=(1, 2), ablate_interval=(1, 3), prune_taus=(0.9,))


@pytest.fixture(scope="module")
def tiny_table(tmp_path_factory):
    pytest.importorskip("peft")
    out = tmp_path_factory.mktemp("table")
    torch.set_num_threads(1)
    made = table.run_table(_tiny_spec(), out, progress=False, log=lambda _: None,
                           command="test", protocols=table.PROTOCOLS)
    return out, made


@pytest.mark.slow  # a whole (tiny) table: ~10-30 s on a shared CPU
def test_tiny_table_rows_columns_and_protocols(tiny_table):
    out, made = tiny_table
    rows = list(csv.DictReader(made["csv"].open()))
    assert list(rows[0])[:9] == list(table.CORE_COLUMNS)
    assert all(r["status"] == "ok" for r in rows)
    got = {(r["protocol"], r["method"]) for r in rows}
    assert got == ({("supervised", m) for m in table.SUPERVISED_METHODS}
                   | {("transfer", m) for m in ("sgd", *table.FINETUNE_METHODS)}
                   | {("fewshot", "maml"), ("ablation", "dsbp")}
                   | {("pruning", f"{m}+factorise@0.9") for m in ("sgd", "dsbp", "dsbp_tuned")})
    ab = {(r["rank"], r["interval"]) for r in rows if r["protocol"] == "ablation"}
    # k at the paper's p, p at its k; (2, 1) itself is the supervised DSBP run
    assert ab == {("1", "1"), ("2", "3")}
    fs = next(r for r in rows if r["protocol"] == "fewshot")
    assert fs["model"] == "conv4" and fs["device"] and fs["test_loss"] and fs["n_way"] == "3"
    # the recommended configuration's warm-up is one epoch of steps: 100 images / batch 50
    cfg = json.loads((out / "supervised/runs/bundled-cnn-dsbp_tuned-s0/config.json").read_text())
    assert cfg["method_kwargs"]["warmup"] == 2 and cfg["method_kwargs"]["residual"] == 0.5
    report = made["report"].read_text()
    assert "| Fashion-MNIST |" in report and "93.8" in report  # the paper's claim, quoted
    assert "[ours]" in report and "Every gap" in report
    assert "## Ablations of k and p" in report and "## Pruning ablation" in report
    info = json.loads((out / "table.json").read_text())
    assert info["env"]["cpu_vector"] and info["env"]["blas"]


@pytest.mark.slow  # a whole (tiny) table: ~10-30 s on a shared CPU
def test_tiny_table_finetunes_start_from_the_pretrained_checkpoint(tiny_table):
    out, _ = tiny_table
    runs = out / "transfer" / "runs"
    pre = torch.load(runs / "bundled@c0-4-cnn-sgd-s0" / "checkpoint.pt", weights_only=True)
    lora = torch.load(runs / "bundled@c5-9-cnn-ft_lora-s0" / "checkpoint.pt", weights_only=True)
    cfg = json.loads((runs / "bundled@c5-9-cnn-ft_lora-s0" / "config.json").read_text())
    assert cfg["method_kwargs"]["init"].endswith("bundled@c0-4-cnn-sgd-s0/checkpoint.pt")
    # LoRA freezes the body: its base weights are still exactly the pretrained ones
    conv = [k for k in lora["model"] if k.endswith("features.0.base_layer.weight")]
    assert conv, sorted(lora["model"])[:5]
    torch.testing.assert_close(lora["model"][conv[0]], pre["model"]["features.0.weight"],
                               rtol=0, atol=0)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in lora["model"].items())


@pytest.mark.slow  # a whole (tiny) table: ~10-30 s on a shared CPU
def test_report_is_remade_from_run_files_alone(tiny_table, tmp_path):
    out, made = tiny_table
    copy_dir = tmp_path / "copy"
    shutil.copytree(out, copy_dir, ignore=shutil.ignore_patterns("checkpoint.pt"))
    for name in ("results.csv", "report.md", "table.png"):
        (copy_dir / name).unlink()
    from dsbp.cli import main

    assert main(["report", str(copy_dir)]) == 0
    assert (copy_dir / "report.md").read_text() == made["report"].read_text()
    assert (copy_dir / "results.csv").read_text() == made["csv"].read_text()
    assert (copy_dir / "table.png").exists()


def test_committed_cpu_table_regenerates(tmp_path):
    committed = REPO / "results" / "table_cpu"
    if not (committed / "report.md").exists():
        pytest.skip("results/table_cpu is not committed in this checkout")
    copy_dir = tmp_path / "table_cpu"
    # what a fresh clone has: checkpoints are never committed (runs/ is git-ignored)
    shutil.copytree(committed, copy_dir, ignore=shutil.ignore_patterns("checkpoint.pt"))
    made = table.finish_table(copy_dir)
    assert made["report"].read_text() == (committed / "report.md").read_text()
    assert made["csv"].read_text() == (committed / "results.csv").read_text()


@pytest.mark.slow  # a whole (tiny) table: ~10-30 s on a shared CPU
def test_table_refuses_a_used_folder_and_unknown_rows(tiny_table):
    out, _ = tiny_table
    with pytest.raises(FileExistsError, match="--resume"):
        table.run_table(_tiny_spec(), out, progress=False)
    with pytest.raises(ValueError, match="unknown"):
        table.supervised_runs(table.get_variant("cpu"), table.TaskLoader(), ["mnist"])
    with pytest.raises(ValueError, match="known"):
        table.get_variant("tpu")


# ------------------------------------------------------------------------- GPU estimate
def test_gpu_estimate_matches_a_hand_computation(tmp_path, bundled):
    timings = {"args": {"batch": 100}, "env": {"device": "GPU X"},
               "arms": {"base": {"full_s": {"median": 1.0}},
                        "dsbp": {"full_s": {"median": 1.5}},
                        "dsbp_refresh": {"full_s": {"median": 11.5}}}}
    (tmp_path / "t.json").write_text(json.dumps(timings))
    spec = _tiny_spec()
    est = table.gpu_estimate(spec, tmp_path / "t.json")
    # per image: SGD 0.01 s, DSBP 0.015 s + (0.115 - 0.015) / p; bundled is 28 px (x 0.766).
    # Supervised: SGD + SAM (2 steps) + 2 DSBP runs; transfer: pretraining, LoRA and full
    # fine-tuning (SGD-priced) + 2 DSBP fine-tunings; 100 images, 1 epoch, 1 seed each.
    imgs = 100 * 1 * 1 * (28 / 32) ** 2
    dsbp = 0.015 + 0.1 / 1
    want = imgs * (0.01 * 3 + 2 * dsbp) + imgs * (0.01 * 3 + 2 * dsbp)
    assert est["hours"] == pytest.approx(want / 3600)
    assert est["device"] == "GPU X"


# ----------------------------------------------------------------------------- host facts
def test_vector_level_and_blas_parsing():
    assert vector_level(["sse4_2", "avx", "avx2", "fma"]) == "AVX2"
    assert vector_level(["avx2", "avx512f", "amx_tile"]) == "AVX-512 +AMX"
    assert vector_level(["neon"]) == "unknown"
    text = ("  - Intel(R) oneAPI Math Kernel Library Version 2024.2\n"
            "  - Build settings: BLAS_INFO=open, BUILD_TYPE=Release, LAPACK_INFO=mkl, X=1")
    info = blas_info(text)
    assert info["blas"] == "open" and info["lapack"] == "mkl"
    assert info["blas_version"].startswith("Intel(R) oneAPI Math Kernel Library")


def test_environment_records_vector_capability_and_blas():
    from dsbp.experiments.run import environment

    env = environment(torch.device("cpu"))
    for key in ("cpu_vector", "cpu_vector_flags", "torch_cpu_capability", "blas", "lapack"):
        assert key in env
    assert env["blas"] == compute_info()["blas"]
    assert env["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_pool_refuses_sizes_that_do_not_divide(bundled):
    with pytest.raises(ValueError, match="average-pool"):
        table.derive_task(bundled, "bundled@10px")


def test_run_timings_is_wall_time_per_trained_image(tmp_path):
    def fake(name, method, wall, epochs, subset=None, val=None, status="ok"):
        d = tmp_path / name
        d.mkdir()
        cfg = RunConfig(dataset="cifar10", method=method, subset=subset, val_split=val)
        (d / "config.json").write_text(cfg.to_json())
        (d / "result.json").write_text(json.dumps({
            "status": status, "wall_s": wall, "epochs_done": epochs, "device_name": "G"}))

    fake("a", "sgd", 90.0, 2, val=5000)      # 45000 images x 2 epochs
    fake("b", "sgd", 10.0, 1, subset=1000)   # 1000 images x 1 epoch
    fake("c", "sgd", 0.0, 1, status="diverged")
    fake("d", "sam", 50.0, 1)                # 50000 x 1
    t = table.run_timings(tmp_path)
    assert t["runs"] == 3 and t["devices"] == ["G"] and t["batch"] == [128]
    assert t["per_image"]["sgd"] == pytest.approx((90 / 90000 + 10 / 1000) / 2)
    assert t["per_image"]["sam"] == pytest.approx(50 / 50000)
    with pytest.raises(ValueError, match="no finished runs"):
        table.gpu_estimate_from_runs(_tiny_spec(), tmp_path)


@pytest.mark.slow  # a whole (tiny) table: ~10-30 s on a shared CPU
def test_report_names_ablation_settings_missing_from_an_older_table_json(tiny_table, tmp_path):
    out, _ = tiny_table
    copy_dir = tmp_path / "old"
    shutil.copytree(out, copy_dir, ignore=shutil.ignore_patterns("checkpoint.pt"))
    info = json.loads((copy_dir / "table.json").read_text())
    for key in ("ablate_rank", "ablate_interval", "ablate_seeds", "prune_taus"):
        del info["spec"][key]  # as written before the ablation protocol existed
    (copy_dir / "table.json").write_text(json.dumps(info))
    report = table.finish_table(copy_dir)["report"].read_text()
    assert "k in [1, 2] at the paper's p and p in [1, 3]" in report  # read from the runs
    assert "tau in [0.9]" in report
    # resuming with this version adds the settings it knows, keeping the recorded ones
    table.run_table(_tiny_spec(), copy_dir, resume=True, protocols=(), progress=False,
                    log=lambda _: None)
    spec = json.loads((copy_dir / "table.json").read_text())["spec"]
    assert spec["ablate_rank"] == [1, 2] and spec["base"] == info["spec"]["base"]
