"""``dsbp bench --nproc 2``: 2 gloo CPU processes against one process on the same global batch.

The 2-process grid (sgd, adamw, sam, dsbp, dsbp_input; MLP without BatchNorm, bundled Fashion-MNIST,
augmentation on, 2 epochs of 4 steps, DSBP refreshes every 2 steps) runs through the worker of
the CLI, ``dsbp.cli._bench_worker``, with each method's factory wrapped (inside the worker
processes) so that every rank saves its final weights, its DSBP bases and its slice of the
first global batch. dsbp_input is first run for 7 steps in this process and interrupted (its
last checkpoint is at step 6, mid-epoch), then resumed by the 2 processes: resume works across
process counts and crosses a distributed refresh (step 6).

Checked against independent answers:
* the ranks' slices, concatenated in rank order, are the first global batch of the
  single-process loader (so each rank really trains on half of it);
* weights and bases are bit-identical on both ranks, and rank 0's checkpoint is its weights;
* final weights equal a single-process ``bench`` of the same grid within rtol 1e-4,
  atol 1e-6 (measured: max abs difference ~1e-8), and moved from the initialisation. AdamW is
  compared by relative Frobenius error < 1e-4 instead: where a weight's gradient is ~1e-9
  (inputs of a nearly dead ReLU unit), Adam's ``g / (sqrt(v) + eps)`` turns the round-off of a
  different summation order into update differences of up to ~1e-3 of the learning rate;
* DSBP bases span the single-process subspaces (largest principal angle < 1e-3 rad);
* the logged train loss (all-reduced over ranks) is the single-process one within 1e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsbp.core.subspace import principal_angles
from dsbp.experiments.atomic import read_jsonl
from dsbp.experiments.build import build_model_for, load_data
from dsbp.experiments.config import RunConfig
from dsbp.experiments.run import RankShard, run
from dsbp.experiments.sweep import GridRun, bench

WORLD = 2
METHODS = ("sgd", "adamw", "sam", "dsbp", "dsbp_input")
RESUMED = "dsbp_input"
# 240 balanced images / batch 64: 4 steps per epoch (64, 64, 64, 48), each even.
CFG = RunConfig(
    model="mlp", epochs=2, batch_size=64, lr=0.05, momentum=0.9, subset=240, eval_subset=200,
    schedule="cosine", augment=True, log_every=2, checkpoint_every=2,
    method_kwargs={"rank": 3, "interval": 2, "power_iters": 2},
)


class Interrupted(Exception):
    pass


def _grid() -> list[GridRun]:
    # AdamW at its own learning rate (that of the smoke preset); 0.05 diverges
    return [GridRun(CFG.replace(method=m, lr=2e-3 if m == "adamw" else CFG.lr), ())
            for m in METHODS]


def _probed(factory, name: str, rank: int, probe_dir: Path):
    """``factory`` whose method, at cleanup, saves this rank's weights, bases and first slice."""

    def make(model, cfg, ctx):
        method = factory(model, cfg, ctx)
        x0, y0 = next(iter(ctx.train.iter_epoch(0)))  # this rank's slice of global batch 0
        old_cleanup = method.cleanup

        def cleanup():
            proj = getattr(method.optimizer, "projector", None)
            torch.save({
                "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "bases": {} if proj is None else {n: proj.basis(n).clone()
                                                  for n in proj.layer_names()},
                "x0": x0.clone(), "y0": y0.clone(),
            }, probe_dir / f"{name}-rank{rank}.pt")
            if old_cleanup is not None:
                old_cleanup()

        method.cleanup = cleanup
        return method

    return make


def _probe_worker(rank: int, world: int, probe_dir: str, out: str) -> None:
    from dsbp.cli import _bench_worker
    from dsbp.experiments.build import METHODS as REGISTRY
    from dsbp.experiments.build import discover_methods, register_method

    discover_methods()
    for name in METHODS:
        spec = REGISTRY[name]
        register_method(name, settings=spec.settings, description=spec.description,
                        replace=True)(_probed(spec.factory, name, rank, Path(probe_dir)))
    _bench_worker(rank, world, _grid(), out, {"command": "test"}, True, False, 1)


def _ckpt(out: Path, method: str) -> dict:
    path = out / "runs" / ck_name(method) / "checkpoint.pt"
    return torch.load(path, weights_only=True)


@pytest.mark.distributed
@pytest.mark.slow
def test_bench_two_processes_equal_one_process_on_the_global_batch(tmp_path, bundled):
    from dsbp.optim.distributed import launch

    out1, out2, probe = tmp_path / "one", tmp_path / "two", tmp_path / "probe"
    probe.mkdir()
    bench(_grid(), out1, meta={"command": "test"}, progress=False, log=lambda _: None)

    # dsbp_input: 7 steps in this process, interrupted; the 2 processes resume it from step 6
    cfg_r = CFG.replace(method=RESUMED)

    def kill(state):
        if state.step == 7:
            raise Interrupted

    with pytest.raises(Interrupted):
        run(cfg_r, out2 / "runs" / cfg_r.run_name(), progress=False, dataset=bundled,
            callbacks=[kill])
    assert _ckpt(out2, RESUMED)["state"]["step"] == 6

    launch(_probe_worker, WORLD, args=(str(probe), str(out2)), backend="gloo")

    assert (out2 / "results.csv").exists() and (out2 / "report.md").exists()
    data = load_data(CFG, torch.device("cpu"), bundled)
    x_glob, y_glob = next(iter(data.train.iter_epoch(0)))
    init = build_model_for(CFG, data).state_dict()
    for m in METHODS:
        r0, r1 = (torch.load(probe / f"{m}-rank{r}.pt", weights_only=True) for r in (0, 1))
        # each rank trained on its half of the same global batch
        assert r0["y0"].shape[0] == r1["y0"].shape[0] == CFG.batch_size // WORLD
        assert torch.equal(torch.cat([r0["x0"], r1["x0"]]), x_glob)
        assert torch.equal(torch.cat([r0["y0"], r1["y0"]]), y_glob)
        # ranks agree bit for bit; rank 0 wrote what it holds
        ck2, ck1 = _ckpt(out2, m), _ckpt(out1, m)
        assert ck2["state"]["step"] == ck1["state"]["step"] == 8
        for k, w in r0["weights"].items():
            assert torch.equal(w, r1["weights"][k]), (m, k)
            assert torch.equal(w, ck2["model"][k]), (m, k)
            # the same training as one process on the whole batch
            if m == "adamw":  # see the module docstring: elementwise, Adam amplifies round-off
                rel = float((w - ck1["model"][k]).norm() / ck1["model"][k].norm())
                assert rel < 1e-4, (m, k, rel)
            else:
                torch.testing.assert_close(w, ck1["model"][k], rtol=1e-4, atol=1e-6,
                                           msg=lambda text, m=m, k=k: f"{m} {k}: {text}")
            assert not torch.equal(w, init[k]), (m, k)
        assert set(r0["bases"]) == set(r1["bases"])
        assert bool(r0["bases"]) == m.startswith("dsbp")
        for n, E in r0["bases"].items():
            assert torch.equal(E, r1["bases"][n]), (m, n)
            E1 = ck1["method"]["optimizer"]["projector"]["layers"][n]["block"][:, :E.shape[1]]
            assert principal_angles(E1, E).max() < 1e-3, (m, n)
        loss1 = [r["train_loss"] for r in read_jsonl(out1 / "runs" / ck_name(m) / "metrics.jsonl")
                 if r["kind"] == "train"]
        loss2 = [r["train_loss"] for r in read_jsonl(out2 / "runs" / ck_name(m) / "metrics.jsonl")
                 if r["kind"] == "train"]
        assert len(loss1) == len(loss2) == 4
        assert loss1 == pytest.approx(loss2, rel=1e-5, abs=1e-5)
        env = json.loads((out2 / "runs" / ck_name(m) / "env.json").read_text())
        sizes = [env.get("world_size")] + [e["world_size"] for e in env.get("resumes", [])]
        assert sizes == ([1, 2] if m == RESUMED else [2])


def ck_name(method: str) -> str:
    return CFG.replace(method=method).run_name()


@pytest.mark.distributed
@pytest.mark.slow
def test_cli_bench_nproc_2_end_to_end(tmp_path, capsys):
    from dsbp.cli import main

    out = tmp_path / "b"
    status = main(["bench", "--model", "mlp", "--methods", "sgd", "--subset", "128",
                   "--eval-subset", "100", "--batch-size", "64", "--nproc", "2",
                   "--no-progress", "--out", str(out)])
    assert status == 0
    assert "bundled-mlp-sgd-s0" in capsys.readouterr().out
    rows = (out / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 2 and ",ok," in rows[1]
    env = json.loads((out / "runs" / "bundled-mlp-sgd-s0" / "env.json").read_text())
    assert env["world_size"] == 2


@pytest.mark.parametrize("argv, message", [
    (["--methods", "dom_sgd"], "not supported with --nproc 2"),
    (["--methods", "lora"], "not supported with --nproc 2"),
    (["--methods", "sgd", "--batch-size", "63"], "not divisible by --nproc 2"),
    (["--methods", "sgd", "--track", "spectrum"], "not supported with --nproc 2"),
])
def test_cli_rejects_what_ddp_cannot_run_before_starting_processes(tmp_path, capsys, argv,
                                                                    message):
    from dsbp.cli import main

    with pytest.raises(SystemExit) as err:
        main(["bench", *argv, "--nproc", "2", "--out", str(tmp_path / "x")])
    assert err.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_rank_shard_slices_partition_each_batch(bundled):
    data = load_data(CFG.replace(subset=100), torch.device("cpu"), bundled)  # 64 + 36
    shards = [RankShard(data.train, r, 2) for r in range(2)]
    assert len(shards[0]) == len(data.train) == 2
    for (x, y), (x0, y0), (x1, y1) in zip(data.train.iter_epoch(1), *(s.iter_epoch(1)
                                                                      for s in shards),
                                          strict=True):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
        assert y0.shape[0] == y.shape[0] // 2
    odd = RankShard(load_data(CFG.replace(subset=99), torch.device("cpu"), bundled).train, 0, 2)
    with pytest.raises(ValueError, match="cannot be split evenly"):
        list(odd.iter_epoch(0))
    with pytest.raises(ValueError, match="rank"):
        RankShard(data.train, 2, 2)


def test_nproc_under_torchrun_is_a_clear_error(tmp_path, capsys, monkeypatch):
    from dsbp.cli import main

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")  # what torchrun sets in its workers
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as err:
        main(["bench", "--methods", "sgd", "--nproc", "2", "--out", str(tmp_path / "x")])
    assert err.value.code == 2
    assert "under torchrun" in capsys.readouterr().err
