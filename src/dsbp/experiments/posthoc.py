"""Post-training analyses of finished runs (the pruning ablation, shifted test streams, and
any later one): one small interface, :class:`PostHoc`, that the sweep's ``finish`` iterates
over, and the pieces every analysis shares (loading a run's final network, applying an
analysis to every run of a ``dsbp bench`` output folder, reading its per-run result file).

An analysis writes one JSON file per run directory (``prune.json``, ``shift.json``). From it,
:meth:`PostHoc.rows` derives ``results.csv`` rows and :meth:`PostHoc.section` a ``report.md``
section. A run the analysis cannot use gets ``{"skipped": reason, ...}`` in that file.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsbp.experiments import atomic

# Methods whose checkpoint holds a wrapped model (adapter / LoRA parameters), not the plain
# network that config.json builds.
WRAPPED_METHODS = ("lora", "spectral_adapter")

Row = dict[str, Any]


class SkipRun(Exception):
    """A run the analysis cannot use; the message says why (it is recorded, not raised on)."""


@dataclass(frozen=True)
class PostHoc:
    """One post-training analysis of finished runs.

    Attributes:
        name: short name (``prune``, ``shift``); also the ``dsbp`` subcommand.
        result_file: the JSON file it writes into each run directory.
        columns: the ``results.csv`` columns its rows add.
        run: ``run(run_dir, *, dataset, log, **settings) -> dict``: analyse one finished run
            and write ``result_file`` (a skipped run: ``{"skipped": reason, ...}``).
        want: ``want(**settings) -> dict``: the settings a kept result must match (resume).
        rows: ``rows(result, trained_row) -> (annotations, derived rows)``: the columns it
            adds to the run's own row, and its own ``results.csv`` rows, from one run's result.
        section: ``section(out, rows) -> markdown lines`` of ``report.md`` (empty: none).
    """

    name: str
    result_file: str
    columns: tuple[str, ...]
    run: Callable[..., dict[str, Any]]
    want: Callable[..., dict[str, Any]]
    rows: Callable[[dict[str, Any], Row], tuple[Row, list[Row]]]
    section: Callable[[Path, Sequence[Row]], list[str]]

    def apply(self, out: str | Path, *, resume: bool = True,
              log: Callable[[str], None] = print, **settings: Any) -> list[dict[str, Any]]:
        """:attr:`run` on every run directory of the bench folder ``out`` (see
        :func:`for_each_run`)."""
        want = self.want(**settings)
        return for_each_run(
            out, self.result_file, want,
            lambda rdir, ds: self.run(rdir, dataset=ds, log=log, **settings),
            resume=resume, log=log)


def read_result_file(run_dir: Path, name: str) -> dict[str, Any] | None:
    """The analysis result ``run_dir/name``, or None when absent or skipped.

    Raises:
        CorruptFileError: the file is unreadable (named in the message).
    """
    f = Path(run_dir) / name
    if not f.exists():
        return None
    p = atomic.read_json(f)
    if not isinstance(p, dict):
        raise atomic.CorruptFileError(f"{f} is not a JSON object")
    return None if "skipped" in p else p


def skipped_result(run_dir: Path, name: str, head: Mapping[str, Any], reason: str, *,
                   write: bool, log: Callable[[str], None], what: str) -> dict[str, Any]:
    """Record (and return) that the analysis ``what`` left ``run_dir`` out, and why."""
    log(f"{what} {run_dir.name}: skipped: {reason}")
    out = {**head, "skipped": reason}
    if write:
        atomic.write_json(run_dir / name, out)
    return out


def evaluate(model: torch.nn.Module, loader: Any) -> tuple[float, float]:
    """``(loss, accuracy)`` of ``model`` on ``loader``, as the training loop evaluates."""
    from dsbp.experiments.loop import evaluate as loop_evaluate

    return loop_evaluate(model, loader, contextlib.nullcontext)


def mean_std_text(values: Sequence[Any], scale: float = 1.0, digits: int = 2) -> str:
    """``"m ± s"`` of the non-empty values times ``scale`` (``"m (n=1)"``; ``"n/a"``)."""
    from dsbp.experiments.report import mean_std

    vals = [float(v) * scale for v in values if v not in (None, "")]
    if not vals:
        return "n/a"
    m, s = mean_std(vals)
    return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if not math.isnan(s) else " (n=1)")


def load_finished(run_dir: Path, cfg: Any, dev: torch.device, dataset: Any | None = None
                  ) -> tuple[Any, Any, Any, torch.nn.Module]:
    """The finished run's result, data, and network with the final weights, on ``dev``.

    Returns:
        ``(RunResult, dataset, RunData, model)``; the model is in train mode as built.

    Raises:
        SkipRun: the run did not finish ``ok``, trains a wrapped model, kept no checkpoint, or
            its checkpoint does not fit the network ``config.json`` builds.
        CorruptFileError: an unreadable ``result.json`` or ``checkpoint.pt`` (named).
    """
    from dsbp.data import load_dataset
    from dsbp.experiments.build import build_model_for, load_data
    from dsbp.experiments.run import check_data_root, load_checkpoint, read_result

    res = read_result(run_dir)
    if res is None or res.status != "ok":
        raise SkipRun(f"run status is {res.status if res else 'unfinished'}, not ok")
    if cfg.method in WRAPPED_METHODS:
        raise SkipRun(f"method {cfg.method!r} trains a wrapped model (adapter / LoRA "
                      "parameters), not the plain network config.json builds")
    if not (run_dir / "checkpoint.pt").exists():
        raise SkipRun("no checkpoint.pt (the final weights were not kept)")
    if dataset is None:
        check_data_root(cfg)
    ds = dataset if dataset is not None else load_dataset(cfg.dataset, root=cfg.data_root)
    data = load_data(cfg, dev, ds)
    model = build_model_for(cfg, data).to(dev)
    state = load_checkpoint(run_dir / "checkpoint.pt", dev)["model"]
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
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """``analyse(run_dir, dataset)`` on every run directory of a bench output folder.

    A run whose own files are unreadable (a corrupt ``config.json``, ``result.json`` or
    checkpoint) is logged with the file named and left out; the other runs go on. A previous
    ``result_name`` that is unreadable is redone.

    Args:
        out: the sweep's output folder (``out/runs/<name>``).
        result_name: the JSON file the analysis writes into each run directory.
        want: settings that must match a previous result for it to be kept.
        analyse: the per-run analysis; gets the run directory and its (cached) data set.
        resume: keep a previous result made with the same settings instead of redoing it.
        log: progress and problem lines.

    Returns:
        The results, in run-name order.
    """
    from dsbp.data import load_dataset
    from dsbp.experiments.run import check_data_root, load_config

    runs_dir = Path(out) / "runs"
    if not runs_dir.is_dir():
        raise ValueError(f"{out} is not a `dsbp bench` output folder (no runs/ inside)")
    cache: dict[tuple[str, str | None], Any] = {}
    done = []
    for rdir in sorted(p for p in runs_dir.iterdir() if (p / "config.json").exists()):
        old = rdir / result_name
        if resume and old.exists():
            try:
                prev = atomic.read_json(old)
            except atomic.CorruptFileError as err:
                log(f"{err}: redoing it")
                prev = None
            if isinstance(prev, dict) and "skipped" not in prev and \
                    all(prev.get(k) == v for k, v in want.items()):
                done.append(prev)
                continue
        try:
            cfg = load_config(rdir)
            key = (cfg.dataset, cfg.data_root)
            if key not in cache:
                check_data_root(cfg)  # the run's data folder is gone: no silent fallback
                cache[key] = load_dataset(cfg.dataset, root=cfg.data_root)
            done.append(analyse(rdir, cache[key]))
        except atomic.CorruptFileError as err:
            log(f"{rdir.name}: left out: {err}")
    return done


__all__ = ["PostHoc", "SkipRun", "WRAPPED_METHODS", "evaluate", "for_each_run",
           "load_finished", "mean_std_text", "read_result_file", "skipped_result"]
