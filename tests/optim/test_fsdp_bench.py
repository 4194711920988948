"""``dsbp bench --nproc 2 --fsdp``: the harness trains bench models under FSDP2.

The same grid (MLP, bundled Fashion-MNIST subset of 240, batch 64, 2 epochs = 8 steps, DSBP
refreshed every 2 steps on both sides) through the command line with 2 gloo processes and
FSDP2, and with 1 process. Checked: every logged train loss (the global batch's, all-reduced
over the ranks) and every evaluation (test loss and accuracy, all ranks evaluating with the
sharded model) equal the single-process run within fp32 round-off; the run records world size
2 and sharding ``fsdp2`` (env.json, config.json); the flag is refused without several
processes, and SAM is refused under FSDP2 before any process starts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dsbp.cli import main
from dsbp.experiments.atomic import read_jsonl

ARGS = ["bench", "--model", "mlp", "--methods", "sgd,dsbp,dsbp_input", "--subset", "240",
        "--batch-size", "64", "--epochs", "2", "--no-progress",
        "--set", "rank=3", "--set", "interval=2", "--set", "power_iters=2"]


def _records(out: Path, run: str) -> list[dict]:
    return read_jsonl(out / "runs" / run / "metrics.jsonl")


@pytest.mark.distributed
@pytest.mark.slow
def test_bench_fsdp_matches_one_process_and_records_the_sharding(tmp_path):
    one, two = tmp_path / "one", tmp_path / "fsdp"
    assert main([*ARGS, "--out", str(one)]) == 0
    assert main([*ARGS, "--nproc", "2", "--fsdp", "--out", str(two)]) == 0
    for m in ("sgd", "dsbp", "dsbp_input"):
        run = f"bundled-mlp-{m}-s0"
        env = json.loads((two / "runs" / run / "env.json").read_text())
        assert env["world_size"] == 2 and env["sharding"] == "fsdp2"
        assert json.loads((two / "runs" / run / "config.json").read_text())["sharding"] == "fsdp2"
        a, b = _records(one, run), _records(two, run)
        assert [r["kind"] for r in a] == [r["kind"] for r in b] and len(a) == 4
        for ra, rb in zip(a, b, strict=True):
            for key in ("train_loss", "test_loss", "test_acc"):
                if key in ra:
                    assert math.isclose(ra[key], rb[key], rel_tol=1e-5, abs_tol=1e-6), \
                        (m, key, ra, rb)
        assert a[-1]["test_loss"] != a[1]["test_loss"]  # it trained


def test_fsdp_flag_needs_several_processes_and_refuses_sam(tmp_path):
    with pytest.raises(SystemExit):
        main([*ARGS, "--fsdp", "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit):
        main([*ARGS[:3], "sam", *ARGS[4:], "--nproc", "2", "--fsdp", "--out",
              str(tmp_path / "b")])
    assert not (tmp_path / "b" / "runs").exists()
