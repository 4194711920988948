"""Nothing the harness does to itself loses work: finished records are never rewritten, a
refusal comes before any write, one bench at a time holds a folder, corrupt files are named and
the rest of the grid goes on, interrupted writes leave nothing behind after a resume.

Each test reproduces a fault found against ``dsbp bench`` (the fault is named in the docstring)
on tiny runs of the bundled data set: SmallCNN of width 4, 64 training images, 1 epoch.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dsbp
from dsbp.cli import main

TINY = ["--epochs", "1", "--subset", "64", "--eval-subset", "100", "--batch-size", "32",
        "--set", 'model_kwargs={"width": 4}', "--no-progress", "--threads", "1"]


def _bench(out: Path, *flags: str) -> int:
    return main(["bench", "--methods", "sgd", "--seeds", "2", *TINY, "--out", str(out), *flags])


def _snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _env() -> dict[str, str]:
    src = str(Path(dsbp.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished two-run bench folder (sgd, seeds 0 and 1)."""
    out = tmp_path_factory.mktemp("finished")
    assert _bench(out) == 0
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_resume_with_a_changed_flag_refuses_naming_the_key_and_writes_nothing(
        finished, tmp_path, capsys):
    """Was: `--resume` with one changed flag turned every finished run to status error."""
    out = _copy(finished, tmp_path / "out")
    before = _snapshot(out)
    with pytest.raises(SystemExit) as exc:
        _bench(out, "--resume", "--lr", "0.1")
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "lr: saved 0.05, requested 0.1" in err and "bundled-cnn-sgd-s0" in err
    assert _snapshot(out) == before  # bench.json, result.json, metrics: all as they were
    for rdir in (out / "runs").iterdir():
        assert json.loads((rdir / "result.json").read_text())["status"] == "ok"


def test_second_bench_without_resume_refuses_before_writing(finished, tmp_path, capsys):
    """Was: re-running without --resume overwrote bench.json (command, label) first."""
    out = _copy(finished, tmp_path / "out")
    before = _snapshot(out)
    with pytest.raises(SystemExit) as exc:
        _bench(out, "--label", "another sweep")
    assert exc.value.code == 2 and "already holds runs" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_demo_into_an_existing_bench_folder_damages_nothing(finished, tmp_path, capsys):
    """Was: `dsbp demo --out EXISTING` rewrote the existing (differently configured) runs
    of the same names as errors."""
    out = _copy(finished, tmp_path / "out")
    before = _snapshot(out)
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--out", str(out), "--no-progress"])
    assert exc.value.code == 2
    assert "bundled-cnn-sgd-s0" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_resume_of_a_finished_grid_rewrites_nothing(finished, tmp_path):
    """A resume with the same flags keeps every finished record byte for byte."""
    out = _copy(finished, tmp_path / "out")
    runs = {p: p.read_bytes() for p in (out / "runs").rglob("*") if p.is_file()}
    assert _bench(out, "--resume") == 0
    assert all(p.read_bytes() == b for p, b in runs.items())
    assert not [p for p in (out / "runs").rglob("*") if p.is_file() and p not in runs]


def test_a_second_bench_on_a_locked_folder_refuses(tmp_path, capsys):
    """Was: two benches on one folder ran together and turned each other's runs to error.
    The holder is a real second process."""
    out = tmp_path / "out"
    out.mkdir()
    child = ("import sys, time\nfrom dsbp.experiments.atomic import FolderLock\n"
             "with FolderLock(sys.argv[1]):\n    print('locked', flush=True)\n"
             "    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", child, str(out)], env=_env(),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit) as exc:
            _bench(out)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "is in use by another process" in err
        assert f"pid {proc.pid}, dsbp bench" in err
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing else written
    finally:
        proc.kill()  # SIGKILL: the kernel releases the lock, no stale lock is left
        proc.wait()
    from dsbp.experiments.atomic import FolderLock

    with FolderLock(out):
        pass


def test_truncated_config_is_named_and_the_other_runs_go_on(finished, tmp_path, capsys):
    """Was: a truncated config.json turned every run to error, and every later bench or
    report aborted without naming the file."""
    out = _copy(finished, tmp_path / "out")
    bad = out / "runs" / "bundled-cnn-sgd-s0" / "config.json"
    bad.write_text(bad.read_text()[:40])
    bad_dir = _snapshot(bad.parent)
    other = out / "runs" / "bundled-cnn-sgd-s1" / "result.json"
    other_before = other.read_bytes()
    assert _bench(out, "--resume") == 1  # one run could not be used: exit status 1
    text = capsys.readouterr().out
    assert str(bad) in text
    assert _snapshot(bad.parent) == bad_dir  # the damaged run is left as it is
    assert other.read_bytes() == other_before  # the other run is kept, finished
    assert main(["report", str(out)]) == 0
    assert str(bad) in capsys.readouterr().out
    assert str(bad) in (out / "report.md").read_text()


def test_corrupt_metrics_line_is_named_and_the_grid_goes_on(tmp_path, capsys):
    """Was: one bad line in one run's metrics.jsonl aborted the whole grid, on every
    resume, naming no file. Here run s0 was interrupted (no result.json) and its metrics
    file then damaged; run s1 must still train, and s0's error must name the file."""
    out = tmp_path / "out"
    assert _bench(out) == 0
    s0 = out / "runs" / "bundled-cnn-sgd-s0"
    (s0 / "result.json").unlink()  # as if killed before the end
    shutil_rm(out / "runs" / "bundled-cnn-sgd-s1")
    metrics = s0 / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], '{"kind": "train", "step": ', *lines[2:]]) + "\n")
    damaged = metrics.read_bytes()
    assert _bench(out, "--resume") == 1
    printed = capsys.readouterr().out
    assert f"{metrics}: line 2 is corrupt" in printed
    assert metrics.read_bytes() == damaged  # the evidence is kept
    res1 = json.loads((out / "runs" / "bundled-cnn-sgd-s1" / "result.json").read_text())
    assert res1["status"] == "ok"
    res0 = json.loads((s0 / "result.json").read_text())
    assert res0["status"] == "error" and str(metrics) in res0["message"]


def shutil_rm(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


def test_corrupt_checkpoint_is_named_without_unsafe_advice(tmp_path, capsys):
    """Was: a corrupt checkpoint passed on torch's advice to retry with weights_only=False
    (unsafe) and named no file."""
    out = tmp_path / "out"
    assert _bench(out) == 0
    s0 = out / "runs" / "bundled-cnn-sgd-s0"
    (s0 / "result.json").unlink()
    ckpt = s0 / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    assert _bench(out, "--resume") == 1
    printed = capsys.readouterr().out
    assert str(ckpt) in printed and "weights_only=False" not in printed
    res0 = json.loads((s0 / "result.json").read_text())
    assert res0["status"] == "error" and str(ckpt) in res0["message"]
    assert "weights_only" not in (s0 / "error.txt").read_text().splitlines()[-1]


def test_finished_record_survives_a_later_failure(finished, tmp_path):
    """write_error never rewrites a finished run's record (the grid's catch-all used to)."""
    from dsbp.experiments.config import RunConfig
    from dsbp.experiments.run import write_error

    out = _copy(finished, tmp_path / "out")
    rdir = out / "runs" / "bundled-cnn-sgd-s0"
    before = _snapshot(rdir)
    cfg = RunConfig.from_json((rdir / "config.json").read_text())
    res = write_error(rdir, cfg, RuntimeError("later failure"), "traceback")
    assert res.status == "ok" and _snapshot(rdir) == before


def test_diagnose_refuses_an_unfinished_run(tmp_path, capsys):
    """Was: `dsbp diagnose` on an unfinished run reported a mid-training checkpoint as the
    run."""
    out = tmp_path / "out"
    assert _bench(out, "--seeds", "1") == 0
    rdir = out / "runs" / "bundled-cnn-sgd-s0"
    (rdir / "result.json").unlink()
    with pytest.raises(SystemExit) as exc:
        main(["diagnose", str(rdir), "--no-png"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "has not finished" in err and "step 2" in err
    assert not (rdir / "diagnostics").exists()


# -------------------------------------------------------------------- real process kills
_KILL_AT_CHECKPOINT_RENAME = """
import os, signal, sys
import torch
torch.set_num_threads(1)
from dsbp.experiments import atomic
real_replace = os.replace
def replace(src, dst):
    if str(dst).endswith("checkpoint.pt") and "s1" in str(dst):
        os.kill(os.getpid(), signal.SIGKILL)  # the temporary file is written and fsynced
    real_replace(src, dst)
atomic.os.replace = replace
from dsbp.cli import main
main(sys.argv[1:])
"""


def test_sigkill_before_a_rename_leaves_an_orphan_that_resume_removes(tmp_path):
    """A real SIGKILL between the fsync of a checkpoint's temporary file and its rename:
    the temporary file is orphaned and the folder's lock dies with the process. The resume
    takes the lock, removes the orphan, and finishes the grid."""
    out = tmp_path / "out"
    argv = ["bench", "--methods", "sgd", "--seeds", "2", *TINY, "--out", str(out)]
    proc = subprocess.run([sys.executable, "-c", _KILL_AT_CHECKPOINT_RENAME, *argv],
                          env=_env(), capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    s1 = out / "runs" / "bundled-cnn-sgd-s1"
    orphans = list(s1.glob(".checkpoint.pt.*.tmp"))
    assert len(orphans) == 1 and not (s1 / "result.json").exists()
    s0_result = (out / "runs" / "bundled-cnn-sgd-s0" / "result.json").read_bytes()
    assert _bench(out, "--resume") == 0
    assert not list(out.rglob("*.tmp"))
    assert (out / "runs" / "bundled-cnn-sgd-s0" / "result.json").read_bytes() == s0_result
    assert json.loads((s1 / "result.json").read_text())["status"] == "ok"
    torch.load(s1 / "checkpoint.pt", weights_only=True)  # a whole checkpoint


def test_fewshot_resume_with_other_settings_refuses_and_keeps_the_cells(tmp_path, capsys):
    """The few-shot runner used to recompute and overwrite kept cells (and config.json) when
    a resume asked for other settings."""
    args = ["fewshot", "--datasets", "bundled", "--shots", "1", "--n-query", "2", "--width",
            "8", "--meta-iters", "1", "--meta-batch", "2", "--test-episodes", "2", "--rank",
            "4", "--threads", "1", "--methods", "maml", "--out", str(tmp_path)]
    assert main(args) == 0
    before = _snapshot(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main([*args[:-2], "--inner-lr", "0.5", "--out", str(tmp_path), "--resume"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "bundled-5w1s-maml-s0: inner_lr: saved 0.1" in err
    assert _snapshot(tmp_path) == before
    cell = tmp_path / "runs" / "bundled-5w1s-maml-s0.json"
    cell.write_text(cell.read_text()[:30])  # a truncated cell: named, the report goes on
    assert main([*args, "--resume"]) == 0
    assert str(cell) in (tmp_path / "report.md").read_text()
    assert cell.read_text().startswith("{") and len(cell.read_text()) == 30


def test_diagnose_unfinished_says_it_is_a_mid_training_state(tmp_path):
    out = tmp_path / "out"
    assert _bench(out, "--seeds", "1") == 0
    rdir = out / "runs" / "bundled-cnn-sgd-s0"
    (rdir / "result.json").unlink()
    assert main(["diagnose", str(rdir), "--no-png", "--unfinished", "--batches", "1",
                 "--hessian-k", "1", "--trace-samples", "2", "--slice-points", "3",
                 "--slice-2d-points", "2", "--perturb-draws", "2", "--rank", "2"]) == 0
    diag = json.loads((rdir / "diagnostics" / "diagnostics.json").read_text())
    assert diag["run_status"] == "unfinished" and diag["checkpoint_step"] == 2


def test_truncated_result_is_named_and_left_alone(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path / "out")
    bad = out / "runs" / "bundled-cnn-sgd-s1" / "result.json"
    bad.write_text('{"status": "o')
    before = _snapshot(bad.parent)
    assert _bench(out, "--resume") == 1
    assert str(bad) in capsys.readouterr().out
    assert _snapshot(bad.parent) == before
    assert str(bad) in (out / "report.md").read_text()


def test_posthoc_refuses_a_run_whose_data_folder_is_gone(finished, tmp_path, capsys):
    """The run's config names a data folder that no longer exists: no silent fallback."""
    out = _copy(finished, tmp_path / "out")
    for rdir in (out / "runs").iterdir():
        cfg = json.loads((rdir / "config.json").read_text())
        cfg["data_root"] = str(tmp_path / "gone")
        (rdir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit) as exc:
        main(["shift", str(out), "--kinds", "noise", "--severities", "1", "--tta", "none"])
    assert exc.value.code == 2 and str(tmp_path / "gone") in capsys.readouterr().err


def test_demo_into_a_folder_that_is_not_a_bench_folder_refuses(tmp_path, capsys):
    """`dsbp demo --out EXISTING` on a folder of the user's: its report.md is not replaced."""
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "report.md").write_text("my own report\n")
    before = _snapshot(mine)
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--out", str(mine), "--no-progress"])
    assert exc.value.code == 2 and "is not a `dsbp bench` folder" in capsys.readouterr().err
    assert _snapshot(mine) == before and sorted(p.name for p in mine.iterdir()) == ["report.md"]
