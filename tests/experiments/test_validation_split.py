"""Validation split held out from the training data (issue 7) and DSBP's switch pass-through.

The validation split must be class-balanced, disjoint from the training examples, the same for
every run seed, and its logged ``val_acc`` must be the model's accuracy on exactly those images.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from dsbp.cli import _grid_from_args, build_parser
from dsbp.experiments.build import BuildContext, build_method, build_model_for, load_data
from dsbp.experiments.config import RunConfig
from dsbp.experiments.run import run


def _indexed_dataset(n_per_class: int = 30, classes: int = 10) -> SimpleNamespace:
    """A data set whose every training image carries its own index in its pixels, so that
    which examples a loader holds can be read back exactly (the point here is set identity,
    not learning)."""
    n = n_per_class * classes
    idx = torch.arange(n)
    x = torch.zeros(n, 1, 8, 8, dtype=torch.uint8)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = (idx // 256).to(torch.uint8), (idx % 256).to(torch.uint8)
    y = idx % classes
    return SimpleNamespace(x_train=x, y_train=y, x_test=x[:20], y_test=y[:20],
                           classes=[str(c) for c in range(classes)], mean=(0.0,), std=(1.0,),
                           source="indexed")


def _ids(loader) -> tuple[torch.Tensor, torch.Tensor]:
    """(example ids, labels) held by a DeviceLoader (mean 0, std 1: x is pixel / 255)."""
    ids, ys = [], []
    for x, y in loader.iter_epoch(0):
        px = torch.round(x[:, 0, 0, :2] * 255).long()
        ids.append(px[:, 0] * 256 + px[:, 1])
        ys.append(y)
    return torch.cat(ids), torch.cat(ys)


def test_val_split_is_balanced_disjoint_and_fixed_across_seeds():
    ds = _indexed_dataset()
    val_sets = []
    for seed in (0, 1):
        cfg = RunConfig(dataset="indexed", val_split=50, subset=100, seed=seed, batch_size=16)
        data = load_data(cfg, torch.device("cpu"), dataset=ds)
        val_ids, val_y = _ids(data.val)
        tr_ids, tr_y = _ids(data.train)
        assert data.n_val == 50 and len(val_ids) == 50 and len(tr_ids) == 100
        assert torch.equal(torch.bincount(val_y, minlength=10), torch.full((10,), 5))
        assert torch.equal(val_y, ds.y_train[val_ids])  # labels travel with their images
        assert not set(val_ids.tolist()) & set(tr_ids.tolist())  # disjoint
        val_sets.append(set(val_ids.tolist()))
    assert val_sets[0] == val_sets[1]  # one validation split for every run seed


def test_no_val_split_by_default():
    data = load_data(RunConfig(dataset="indexed"), torch.device("cpu"),
                     dataset=_indexed_dataset())
    assert data.val is None and data.n_val == 0 and data.n_train == 300


def test_val_split_validation():
    with pytest.raises(ValueError, match="val_split"):
        RunConfig(val_split=0)


def test_logged_val_acc_is_accuracy_on_the_held_out_images(tmp_path, bundled):
    cfg = RunConfig(dataset="bundled", model="cnn", method="sgd", epochs=1, subset=300,
                    eval_subset=100, val_split=200, batch_size=50, model_kwargs={"width": 4},
                    checkpoint_every=0)
    run(cfg, tmp_path / "r", progress=False, dataset=bundled)
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").open()]
    ev = [r for r in records if r["kind"] == "eval"][-1]
    # Independent answer: rebuild the model from the checkpoint, classify the val images.
    data = load_data(cfg, torch.device("cpu"), dataset=bundled)
    model = build_model_for(cfg, data)
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)
    model.load_state_dict(ckpt["model"])
    model.eval()
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in data.val.iter_epoch(0))
    assert ev["val_acc"] == pytest.approx(correct / 200, abs=1e-12)
    assert ev["val_loss"] > 0


def test_cli_val_flag_sets_val_split():
    argv = ["bench", "--methods", "sgd", "--val", "500", "--subset", "1000"]
    args = build_parser(argv).parse_args(argv)
    runs, _ = _grid_from_args(args)
    assert runs[0].cfg.val_split == 500


def test_dsbp_switches_reach_the_projector(bundled):
    cfg = RunConfig(dataset="bundled", model="cnn", method="dsbp", subset=100,
                    model_kwargs={"width": 4},
                    method_kwargs={"rank": 3, "residual": 0.25, "rescale": True,
                                   "max_rescale": 4.0, "warmup": 7, "energy": 0.9,
                                   "skip_first_last": True})
    data = load_data(cfg, torch.device("cpu"), dataset=bundled)
    model = build_model_for(cfg, data)
    ctx = BuildContext(loss_fn=torch.nn.functional.cross_entropy, train=data.train,
                       device=torch.device("cpu"), num_classes=10)
    method = build_method(model, cfg, ctx)
    proj = method.optimizer.projector
    assert (proj.rank, proj.residual, proj.rescale, proj.max_rescale, proj.warmup,
            proj.energy) == (3, 0.25, True, 4.0, 7, 0.9)
    convs = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    assert proj.layer_names() == convs[1:-1]  # first and last left out
    method.close()


def test_dsbp_tuned_is_dsbp_with_the_recommended_switches(bundled):
    from dsbp.experiments.build import DSBP_TUNED

    cfg = RunConfig(dataset="bundled", model="cnn", method="dsbp_tuned", subset=100,
                    model_kwargs={"width": 4}, method_kwargs={"rank": 3})
    data = load_data(cfg, torch.device("cpu"), dataset=bundled)
    ctx = BuildContext(loss_fn=torch.nn.functional.cross_entropy, train=data.train,
                       device=torch.device("cpu"), num_classes=10)
    proj = build_method(build_model_for(cfg, data), cfg, ctx).optimizer.projector
    assert (proj.rank, proj.residual, proj.rescale, proj.side) == (
        3, DSBP_TUNED["residual"], DSBP_TUNED.get("rescale", False), "output")
    assert proj.residual > 0  # the recommendation is not plain DSBP
    # method_kwargs override the recommendation
    cfg2 = cfg.replace(method_kwargs={"residual": 0.0, "rescale": True})
    proj2 = build_method(build_model_for(cfg2, data), cfg2, ctx).optimizer.projector
    assert (proj2.residual, proj2.rescale) == (0.0, True)
    proj.remove()
    proj2.remove()
