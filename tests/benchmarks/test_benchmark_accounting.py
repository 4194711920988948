"""The accounting of two benchmarks, checked against independent answers (no timing asserted):

* benchmarks/lowrank_backward.py: its matmul-flop model equals what torch's FlopCounterMode
  counts on a real training step of each arm (so the low-rank arm really skips the full
  d_out x d_in weight-gradient GEMM);
* benchmarks/time_to_accuracy.py: the time-to-target and equal-time numbers of ``analyse``
  on hand-made curves, worked out by hand.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("kind", ["sgd", "lowrank", "project_after", "coords"])
def test_lowrank_flop_model_matches_flop_counter(kind):
    """Catches: a low-rank arm that still runs the full weight-gradient GEMM (its count would
    exceed the model by 2 n d_out d_in per layer), an expansion done twice, or a flop model
    that forgets the input gradient or the classifier."""
    lb = _load("lowrank_backward")
    n, d, k = 16, 32, 4
    torch.manual_seed(0)
    arm = lb.Arm(kind, lb.mlp(784, d), kind, k)
    x, y = torch.randn(n, 784), torch.randint(0, 10, (n,))
    arm.step(x, y)  # first step: optimizer state allocated outside the count
    with FlopCounterMode(display=False) as fc:
        arm.step(x, y)
    counted = fc.get_total_flops()
    if kind == "coords":
        # FlopCounterMode does not count in-place aten.addmm_ (it counts 0 for W.addmm_(E, M));
        # the arm's update is one such call per hidden layer, (d, k) @ (k, d_in)
        counted += 2 * k * d * 784 + 2 * k * d * d
    assert counted == lb.step_flops(kind, n, d, k)
    if kind == "lowrank":
        full = lb.step_flops("sgd", n, d, k)
        assert counted < full
    for h in arm.handles:
        h.remove()


def test_time_to_accuracy_analysis_by_hand():
    """Two methods; 'adamw' costs 2 SGD steps per step. Catches: time not scaled by the step
    ratio, the target crossing read from the wrong point, equal-time accuracy read past the
    budget, targets not taken from SGD's final mean."""
    tta = _load("time_to_accuracy")

    def run(method, accs, seed):
        curve = [{"step": 10 * i, "wall_s": 1.0 * i, "test_acc": a} for i, a in enumerate(accs)]
        return {"method": method, "lr": 0.1, "seed": seed, "curve": curve,
                "final_test_acc": accs[-1]}

    task = {
        "timing": {"sgd_step_s": 0.5, "methods": {
            "sgd": {"ratio_to_sgd": {"median": 1.0}},
            "adamw": {"ratio_to_sgd": {"median": 2.0}}}},
        "runs": [run("sgd", [0.1, 0.5, 0.8, 0.9, 1.0], 0), run("sgd", [0.1, 0.6, 0.7, 0.8, 0.8], 1),
                 run("adamw", [0.1, 0.9, 0.95, 0.95, 0.95], 0),
                 run("adamw", [0.1, 0.85, 0.9, 0.9, 0.9], 1)],
    }
    a = tta.analyse(task)
    assert a["sgd_final_mean"] == pytest.approx(0.9)
    assert a["targets"]["0.99"] == pytest.approx(0.891)
    # SGD budget: 40 steps x 1.0 x 0.5 s
    assert a["equal_time_budget_s"] == pytest.approx(20.0)
    ad = a["methods"]["adamw"]
    # 0.891: seed 0 at step 10, seed 1 at step 20; ratio time = step x 2 x 0.5 s
    assert ad["to_0.99_step"] == [10, 20]
    assert ad["to_0.99_ratio_time_s"] == [10.0, 20.0]
    assert ad["to_0.99_wall_s"] == [1.0, 2.0]
    # at SGD's 20 s adamw has done 20 steps: accuracies 0.95 and 0.9
    assert ad["acc_at_1x_sgd_time"] == pytest.approx([0.95, 0.9])
    sg = a["methods"]["sgd"]
    assert sg["to_0.99_reached"] == "1/2" and sg["to_0.99_step_median"] is None
    assert sg["acc_at_0.5x_sgd_time"] == pytest.approx([0.8, 0.7])
