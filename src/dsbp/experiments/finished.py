"""Post-training analyses of finished runs (the pruning ablation, shifted streams): loading a
run's final network, and applying an analysis to every run of a ``dsbp bench`` output folder."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

# Methods whose checkpoint holds a wrapped model (adapter / LoRA parameters), not the plain
# network that config.json builds.
WRAPPED_METHODS = ("lora", "spectral_adapter")


class SkipRun(Exception):
    """A run the analysis cannot use; the message says why (it is recorded, not raised on)."""


def load_finished(run_dir: Path, cfg: Any, dev: torch.device, dataset: Any | None = None
                  ) -> tuple[Any, Any, Any, torch.nn.Module]:
    """The finished run's result, data, and network with the final weights, on ``dev``.

    Returns:
        ``(RunResult, dataset, RunData, model)``; the model is in train mode as built.

    Raises:
        SkipRun: the run did not finish ``ok``, trains a wrapped model, kept no checkpoint, or
            its checkpoint does not fit the network ``config.json`` builds.
    """
    from dsbp.data import load_dataset
    from dsbp.experiments.build import build_model_for, load_data
    from dsbp.experiments.run import read_result

    res = read_result(run_dir)
    if res is None or res.status != "ok":
        raise SkipRun(f"run status is {res.status if res else 'unfinished'}, not ok")
    if cfg.method in WRAPPED_METHODS:
        raise SkipRun(f"method {cfg.method!r} trains a wrapped model (adapter / LoRA "
                      "parameters), not the plain network config.json builds")
    if not (run_dir / "checkpoint.pt").exists():
        raise SkipRun("no checkpoint.pt (the final weights were not kept)")
    ds = dataset if dataset is not None else load_dataset(cfg.dataset, root=cfg.data_root)
    data = load_data(cfg, dev, ds)
    model = build_model_for(cfg, data).to(dev)
    state = torch.load(run_dir / "checkpoint.pt", map_location=dev, weights_only=True)["model"]
    if set(state) != set(model.state_dict()):
        raise SkipRun("checkpoint's model keys differ from the network config.json builds "
                      "(a wrapped model)")
    model.load_state_dict(state)
    return res, ds, data, model


def for_each_run(
    out: str | Path,
    result_name: str,
    want: Mapping[str, Any],
    analyse: Callable[[Path, Any], dict[str, Any]],
    *,
    resume: bool = True,
) -> list[dict[str, Any]]:
    """``analyse(run_dir, dataset)`` on every run directory of a bench output folder.

    Args:
        out: the sweep's output folder (``out/runs/<name>``).
        result_name: the JSON file the analysis writes into each run directory.
        want: settings that must match a previous result for it to be kept.
        analyse: the per-run analysis; gets the run directory and its (cached) data set.
        resume: keep a previous result made with the same settings instead of redoing it.

    Returns:
        The results, in run-name order.
    """
    from dsbp.data import load_dataset
    from dsbp.experiments.run import load_config

    runs_dir = Path(out) / "runs"
    if not runs_dir.is_dir():
        raise ValueError(f"{out} is not a `dsbp bench` output folder (no runs/ inside)")
    cache: dict[tuple[str, str | None], Any] = {}
    done = []
    for rdir in sorted(p for p in runs_dir.iterdir() if (p / "config.json").exists()):
        old = rdir / result_name
        if resume and old.exists():
            prev = json.loads(old.read_text())
            if all(prev.get(k) == v for k, v in want.items()) and "skipped" not in prev:
                done.append(prev)
                continue
        cfg = load_config(rdir)
        key = (cfg.dataset, cfg.data_root)
        if key not in cache:
            cache[key] = load_dataset(cfg.dataset, root=cfg.data_root)
        done.append(analyse(rdir, cache[key]))
    return done
