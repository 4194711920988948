"""A run interrupted mid-epoch and resumed from its checkpoint ends bit-identical to an
uninterrupted run (weights, optimizer state, every metric except the clock)."""

from __future__ import annotations

import pytest
import torch

from dsbp.experiments.atomic import read_jsonl
from dsbp.experiments.config import RunConfig
from dsbp.experiments.run import run

# 320 balanced images / batch 32 = 10 steps per epoch; checkpoints at
# steps 5, 10 (epoch end), 15, 20; the interruption after step 17 is mid-epoch 1, two steps
# past the step-15 checkpoint, so resuming must replay steps 16-17 from batch 5 of epoch 1.
KILL_AFTER = 17


class Interrupted(Exception):
    pass


def _kill_after(step: int):
    def cb(state):
        if state.step == step:
            raise Interrupted(f"killed after step {step}")
    return cb


def _config(method: str) -> RunConfig:
    return RunConfig(
        method=method, epochs=2, batch_size=32, lr=0.05, momentum=0.9, subset=320,
        eval_subset=100, schedule="cosine", warmup_frac=0.1, augment=True, log_every=3,
        checkpoint_every=5, model_kwargs={"width": 8},
        # DSBP refreshes every 4 steps, so the resumed part crosses a refresh.
        method_kwargs={"rank": 3, "interval": 4, "power_iters": 2, "rho": 0.05},
    )


def _strip_clock(records):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in records]


@pytest.mark.parametrize("method", ["sgd", "dsbp", "sam"])
def test_resume_mid_epoch_is_bit_exact(tmp_path, bundled, method):
    cfg = _config(method)
    full = run(cfg, tmp_path / "full", progress=False, dataset=bundled)

    part = tmp_path / "part"
    with pytest.raises(Interrupted):
        run(cfg, part, progress=False, dataset=bundled, callbacks=[_kill_after(KILL_AFTER)])
    ckpt = torch.load(part / "checkpoint.pt", weights_only=True)
    assert (ckpt["state"]["epoch"], ckpt["state"]["batch"], ckpt["state"]["step"]) == (1, 5, 15)
    assert not (part / "result.json").exists()
    # metrics.jsonl agrees with the checkpoint: nothing after step 15.
    records = read_jsonl(part / "metrics.jsonl")
    assert len(records) == ckpt["n_records"] and max(r["step"] for r in records) <= 15

    with pytest.raises(FileExistsError):
        run(cfg, part, progress=False, dataset=bundled)  # no silent overwrite
    resumed = run(cfg, part, resume=True, progress=False, dataset=bundled)

    assert resumed.status == full.status == "ok"
    assert (resumed.test_acc, resumed.test_loss, resumed.steps) == (
        full.test_acc, full.test_loss, full.steps)
    assert _strip_clock(read_jsonl(part / "metrics.jsonl")) == _strip_clock(
        read_jsonl(tmp_path / "full" / "metrics.jsonl"))
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(part / "checkpoint.pt", weights_only=True)
    for name, w in a["model"].items():
        assert torch.equal(w, b["model"][name]), name
    assert a["state"]["step"] == b["state"]["step"] == 20
    # The momentum buffers too (the optimizer state is part of the result of training).
    sa, sb = a["method"]["optimizer"], b["method"]["optimizer"]
    sa, sb = sa.get("base", sa), sb.get("base", sb)
    for k, st in sa["state"].items():
        for key, t in st.items():
            if torch.is_tensor(t):
                assert torch.equal(t, sb["state"][k][key]), (k, key)


def test_resume_refuses_a_different_config(tmp_path, bundled):
    cfg = _config("sgd")
    with pytest.raises(Interrupted):
        run(cfg, tmp_path, progress=False, dataset=bundled, callbacks=[_kill_after(6)])
    with pytest.raises(ValueError, match="differs"):
        run(cfg.replace(lr=0.1), tmp_path, resume=True, progress=False, dataset=bundled)


def test_resume_of_a_finished_run_returns_its_result(tmp_path, bundled):
    cfg = _config("sgd").replace(epochs=1)
    first = run(cfg, tmp_path, progress=False, dataset=bundled)
    mtime = (tmp_path / "checkpoint.pt").stat().st_mtime_ns
    again = run(cfg, tmp_path, resume=True, progress=False, dataset=bundled)
    assert again == first
    assert (tmp_path / "checkpoint.pt").stat().st_mtime_ns == mtime  # not retrained


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_exact(tmp_path, bundled):
    """A real kill: the child process SIGKILLs itself after step 17 (no cleanup runs)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import dsbp

    cfg = _config("dsbp")
    (tmp_path / "cfg.json").write_text(cfg.to_json())
    child = (
        "import os, signal, sys, torch\n"
        "torch.set_num_threads(1)\n"
        "from dsbp.experiments.config import RunConfig\n"
        "from dsbp.experiments.run import run\n"
        "cfg = RunConfig.from_json(open(sys.argv[1]).read())\n"
        "def cb(state):\n"
        f"    if state.step == {KILL_AFTER}:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "run(cfg, sys.argv[2], progress=False, callbacks=[cb])\n"
    )
    src = str(Path(dsbp.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", child, str(tmp_path / "cfg.json"),
                           str(tmp_path / "part")], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    resumed = run(cfg, tmp_path / "part", resume=True, progress=False, dataset=bundled)
    full = run(cfg, tmp_path / "full", progress=False, dataset=bundled)
    assert (resumed.test_acc, resumed.test_loss) == (full.test_acc, full.test_loss)
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _strip_clock(read_jsonl(tmp_path / "part" / "metrics.jsonl")) == _strip_clock(
        read_jsonl(tmp_path / "full" / "metrics.jsonl"))
