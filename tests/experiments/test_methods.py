"""Every registered method trains through the harness, and the Dom-/Bulk-SGD factories step
in the subspace their names say (checked against the optimizer's own Hessian basis)."""

from __future__ import annotations

import pytest
import torch

from dsbp.experiments.build import (
    METHODS,
    BuildContext,
    build_loss,
    build_method,
    build_model_for,
    load_data,
)
from dsbp.experiments.config import RunConfig
from dsbp.experiments.run import run

# interp_sgd shares dom_sgd's and bulk_sgd's code path (only a, b differ): registered, not re-run.
BUILT_IN = ("sgd", "adamw", "sam", "dsbp", "dsbp_input", "lora", "dom_sgd", "bulk_sgd")


def _cfg(method: str, **kw) -> RunConfig:
    # interval 1: DSBP and Dom/Bulk-SGD refresh their bases on both steps.
    base = dict(method=method, subset=40, eval_subset=20, batch_size=20, epochs=1,
                log_every=1, checkpoint_every=0, momentum=0.0, weight_decay=0.0,
                model_kwargs={"width": 4},
                method_kwargs={"rank": 2, "interval": 1, "power_iters": 2, "k": 3,
                               "lanczos_iters": 12})
    return RunConfig(**{**base, **kw})


@pytest.mark.parametrize("method", BUILT_IN)
def test_each_method_runs_through_the_loop(tmp_path, bundled, method):
    assert method in METHODS and "interp_sgd" in METHODS
    if method == "lora":
        pytest.importorskip("peft")
    res = run(_cfg(method), tmp_path, progress=False, dataset=bundled)
    assert res.status == "ok", res.message
    assert res.steps == 2 and 0.0 <= res.test_acc <= 1.0
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    torch.manual_seed(0)
    init = build_model_for(_cfg(method), load_data(_cfg(method), torch.device("cpu"), bundled))
    trained = {k.removeprefix("base_model.model."): v for k, v in ckpt["model"].items()}
    changed = [k for k, v in init.state_dict().items()
               if k in trained and v.dtype.is_floating_point and not torch.equal(v, trained[k])]
    assert changed, "training changed no parameter"


@pytest.mark.parametrize("method", ["dom_sgd", "bulk_sgd"])
def test_subspace_methods_step_in_their_subspace(bundled, method):
    cfg = _cfg(method)
    dev = torch.device("cpu")
    data = load_data(cfg, dev, bundled)
    model = build_model_for(cfg, data)
    loss_fn = build_loss(cfg)
    m = build_method(model, cfg, BuildContext(loss_fn, data.train, dev, data.num_classes))
    assert m.wants_batch
    x, y = next(iter(data.train.iter_epoch(0)))
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    m.optimizer.zero_grad()
    loss_fn(model(x), y).backward()
    m.optimizer.step(batch=(x, y))
    delta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - before
    V = m.optimizer.basis.double()  # (dim, k) top Hessian eigenvectors on this batch
    inside = V @ (V.T @ delta.double())
    assert delta.norm() > 0
    # float32 weights: the step is exact up to rounding of w + delta (~1e-7 relative).
    if method == "dom_sgd":  # only the dominant component moves
        assert (inside - delta.double()).norm() <= 1e-4 * delta.norm()
    else:  # only the bulk moves
        assert inside.norm() <= 1e-4 * delta.norm()


def test_trackers_record_into_eval_records(tmp_path, bundled):
    from dsbp.experiments.atomic import read_jsonl
    from dsbp.experiments.track import TRACKERS

    assert {"spectrum", "hessian", "alignment"} <= set(TRACKERS)
    cfg = _cfg("dsbp", epochs=2, track=("spectrum", "hessian", "alignment"))
    assert run(cfg, tmp_path / "tracked", progress=False, dataset=bundled).status == "ok"
    evals = [r for r in read_jsonl(tmp_path / "tracked" / "metrics.jsonl")
             if r["kind"] == "eval"]
    assert len(evals) == 2
    for r in evals:
        assert r["hessian/top_eigenvalue"] > 0  # a trained-from-init CE loss: curvature > 0
        assert 0.0 <= r["alignment/energy_kept/mean"] <= 1.0 + 1e-9
        assert 0.0 < r["spectrum/lam1_over_trace"] <= 1.0 + 1e-9  # lambda_1 <= trace(C)
    # Drift needs a previous basis: present from the second evaluation on, in [0, 1].
    assert 0.0 <= evals[1]["spectrum/drift"] <= 1.0 + 1e-9
    # Tracking does not change training: same final weights as an untracked run.
    run(cfg.replace(track=()), tmp_path / "plain", progress=False, dataset=bundled)
    a = torch.load(tmp_path / "tracked" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "plain" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["sam", "dsbp"])
def test_bf16_autocast_trains(tmp_path, bundled, method):
    res = run(_cfg(method, amp="bf16"), tmp_path, progress=False, dataset=bundled)
    assert res.status == "ok" and res.steps == 2
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    # Autocast changes the compute dtype only: parameters stay float32 and finite.
    for k, v in ckpt["model"].items():
        if v.dtype.is_floating_point:
            assert v.dtype == torch.float32 and torch.isfinite(v).all(), k


def test_fp16_needs_cuda(tmp_path, bundled):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU error message")
    with pytest.raises(ValueError, match="fp16"):
        run(_cfg("sgd", amp="fp16"), tmp_path, progress=False, dataset=bundled)
