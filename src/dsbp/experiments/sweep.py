"""A grid of runs (data sets x methods x ablated settings x seeds) into one output folder.

Layout of ``out``::

    bench.json          the command, preset, grid and environment of the sweep
    runs/<run name>/    one run directory per run (see dsbp.experiments.run)
    results.csv         one row per run (from the run directories)
    report.md           measured mean ± std beside the paper's claimed table
    learning_curves.png, acc_vs_wallclock.png

A diverging run stops with status ``diverged``; a run that raises is recorded with status
``error`` (traceback in its ``error.txt``); either way the rest of the grid goes on.

Nothing the harness does to itself loses work: a run whose ``result.json`` is final (``ok``,
``diverged``) is never rewritten; before any file is written, :func:`preflight` refuses a
folder that holds runs without ``resume`` and a resume whose configs differ (naming the runs
and keys); a run with an unreadable file is named and left alone while the other runs go on;
one bench at a time holds ``out/.lock`` (:class:`~dsbp.experiments.atomic.FolderLock`); and a
resume removes the temporary files an interrupted atomic write left behind.

Under a process group of several ranks (``dsbp bench --nproc N``) every rank calls
:func:`bench` with the same grid; rank 0 alone writes files and logs.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsbp.experiments import atomic, prune, shift
from dsbp.experiments.build import METHODS, get_method
from dsbp.experiments.config import CONFIG_FIELDS, RunConfig, setting_value, with_setting
from dsbp.experiments.posthoc import PostHoc
from dsbp.experiments.run import (
    FINISHED,
    RunResult,
    barrier,
    check_data_root,
    config_diff,
    describe_diff,
    environment,
    is_writer,
    load_config,
    read_result,
    run,
    write_error,
)

# The post-training analyses whose per-run results `finish` puts into results.csv and
# report.md, in this order.
ANALYSES: tuple[PostHoc, ...] = (prune.ANALYSIS, shift.ANALYSIS)

# Columns every results.csv has, in this order; ablated settings follow them.
RESULT_COLUMNS = ("dataset", "model", "method", "seed", "epochs", "test_acc", "test_loss",
                  "wall_s", "device", "status", "epochs_done", "steps", "batch_size", "lr",
                  "subset", "run", "message")


@dataclass(frozen=True)
class GridRun:
    """One cell of the grid: its config, the ablated setting names it spells out, its name."""

    cfg: RunConfig
    ablated: tuple[str, ...]

    @property
    def name(self) -> str:
        """The run directory's name (see :meth:`RunConfig.run_name`)."""
        return self.cfg.run_name(self.ablated)


def expand_grid(
    base: RunConfig,
    datasets: Sequence[str],
    methods: Sequence[str],
    seeds: Sequence[int],
    ablations: Mapping[str, Sequence[Any]] | None = None,
    method_overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[GridRun]:
    """Every run of the grid, dataset-major, then method, then ablated values, then seed.

    An ablated key that is a :class:`RunConfig` field (``lr``, ``batch_size``...) multiplies
    every method; a method setting (``rank``, ``interval``, ``rho``...) multiplies only the
    methods that declare it (``--ablate rank=...`` does not re-run SGD per rank).

    Raises:
        ValueError: unknown method, empty lists, or an ablated key that neither is a config
            field nor is read by any method of the grid.
    """
    if not datasets or not methods or not seeds:
        raise ValueError("the grid needs at least one data set, one method and one seed")
    specs = [get_method(m) for m in methods]
    ablations = dict(ablations or {})
    for key in ablations:
        if key not in CONFIG_FIELDS and not any(key in s.settings for s in specs):
            readers = sorted(m for m, s in METHODS.items() if key in s.settings)
            raise ValueError(
                f"--ablate {key}: not a RunConfig field and not a setting of any method in "
                f"this grid ({', '.join(methods)}); methods that read it: {readers or 'none'}"
            )
    out: list[GridRun] = []
    for ds in datasets:
        for spec in specs:
            cfg = dataclasses.replace(base, dataset=ds, method=spec.name)
            for k, v in (method_overrides or {}).get(spec.name, {}).items():
                cfg = with_setting(cfg, k, v)
            keys = tuple(k for k in ablations if k in CONFIG_FIELDS or k in spec.settings)
            variants: list[tuple[RunConfig, tuple[str, ...]]] = [] if keys else [(cfg, ())]
            if keys:
                combos: list[dict[str, Any]] = [{}]
                for k in keys:
                    combos = [{**c, k: v} for c in combos for v in ablations[k]]
                for c in combos:
                    v_cfg = cfg
                    for k, v in c.items():
                        v_cfg = with_setting(v_cfg, k, v)
                    variants.append((v_cfg, keys))
            for v_cfg, ablated in variants:
                out += [GridRun(dataclasses.replace(v_cfg, seed=s), ablated) for s in seeds]
    names = [r.name for r in out]
    if len(set(names)) != len(names):
        raise ValueError("the grid has duplicate runs (repeated data set, method or value)")
    return out


def run_grid(
    runs: Sequence[GridRun],
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    loader: Callable[[RunConfig], Any] | None = None,
    refused: Mapping[str, str] | None = None,
) -> list[tuple[GridRun, RunResult]]:
    """Run every cell of ``runs`` into ``out/runs/<name>``; never stops on a failing run.

    Args:
        runs: the grid (see :func:`expand_grid`).
        out: output folder (created).
        resume: continue interrupted runs and skip finished ones; without it, an output
            folder that already holds runs is an error.
        progress: tqdm bars per run.
        log: where one line per finished run goes.
        loader: ``loader(cfg) -> ImageDataset`` (default ``dsbp.data.load_dataset``); each
            (data set, root) is loaded once.
        refused: ``{run name: why}`` of runs not to touch (see :func:`preflight`): reported
            with status ``error``, their directories left as they are.

    Returns:
        ``(grid run, result)`` pairs in grid order.

    Raises:
        FileExistsError: ``out/runs`` holds runs and ``resume`` is False.
    """
    out = Path(out)
    runs_dir = out / "runs"
    _refuse_existing(runs_dir, resume)
    refused = dict(refused or {})
    barrier()  # every rank has checked `out` before rank 0 writes into it
    if is_writer():
        runs_dir.mkdir(parents=True, exist_ok=True)
    if loader is None:
        from dsbp.data import load_dataset

        def loader(cfg: RunConfig) -> Any:
            check_data_root(cfg)
            return load_dataset(cfg.dataset, root=cfg.data_root)

    cache: dict[tuple[str, str | None], Any] = {}
    results = []
    for i, gr in enumerate(runs):
        rdir = runs_dir / gr.name
        desc = f"[{i + 1}/{len(runs)}] {gr.name}"
        if gr.name in refused:  # named, left alone; the grid goes on
            res = RunResult("error", math.nan, math.nan, 0.0, 0, 0, refused[gr.name])
            results.append((gr, res))
            if is_writer():
                log(f"{desc}: not run, left as it is: {refused[gr.name]}")
            continue
        try:
            key = (gr.cfg.dataset, gr.cfg.data_root)
            if key not in cache:
                cache[key] = loader(gr.cfg)
            res = run(gr.cfg, rdir, resume=resume, progress=progress, dataset=cache[key],
                      desc=desc)
        except KeyboardInterrupt:
            raise
        except Exception as err:  # a failing run is recorded; the grid goes on
            if not is_writer():  # (the ranks raise alike: same config, same data)
                results.append((gr, RunResult("error", math.nan, math.nan, 0.0, 0, 0,
                                              f"{type(err).__name__}: {err}")))
                continue
            res = write_error(rdir, gr.cfg, err, traceback.format_exc())
            if res.status in FINISHED:  # a finished record is never rewritten
                res = RunResult("error", math.nan, math.nan, 0.0, 0, 0,
                                f"{type(err).__name__}: {err} (its finished record is kept)")
        results.append((gr, res))
        if not is_writer():
            continue
        extra = f" ({res.message})" if res.status != "ok" else ""
        log(f"{desc}: {res.status} test_acc={res.test_acc:.4f} test_loss={res.test_loss:.4f} "
            f"wall_s={res.wall_s:.1f}{extra}")
    return results


def _refuse_existing(runs_dir: Path, resume: bool) -> None:
    if not resume and runs_dir.exists() and any(runs_dir.iterdir()):
        raise FileExistsError(f"{runs_dir} already holds runs; pass --resume to continue them "
                              "or choose another --out")


def preflight(runs: Sequence[GridRun], out: str | Path, resume: bool) -> dict[str, str]:
    """Check ``out`` against the grid before anything is written.

    Returns:
        ``{run name: why}`` of runs to leave alone: their ``config.json`` or ``result.json``
        is unreadable (the file is named). The other runs go on.

    Raises:
        FileExistsError: ``out/runs`` holds runs and ``resume`` is False; or ``out`` holds
            other files and is not a bench folder (no ``bench.json``, no ``runs/``).
        ValueError: ``resume`` and some saved configs differ from the grid's: every such run
            and its differing keys are named.
    """
    out = Path(out)
    runs_dir = out / "runs"
    if out.is_dir() and not (out / "bench.json").exists() and not runs_dir.exists():
        foreign = sorted(p.name for p in out.iterdir() if p.name != ".lock")
        if foreign:  # e.g. `dsbp demo --out ~/project`: its report.md is not ours to replace
            raise FileExistsError(
                f"{out} is not a `dsbp bench` folder and is not empty ({', '.join(foreign[:5])}"
                f"{', ...' if len(foreign) > 5 else ''}); choose a new or empty --out")
    _refuse_existing(runs_dir, resume)
    refused: dict[str, str] = {}
    differ: list[str] = []
    for gr in runs:
        rdir = runs_dir / gr.name
        if not (rdir / "config.json").exists():
            continue
        try:
            diff = config_diff(load_config(rdir), gr.cfg)
            read_result(rdir)
        except atomic.CorruptFileError as err:
            refused[gr.name] = str(err)
            continue
        if diff:
            differ.append(f"  {gr.name}: {describe_diff(diff)}")
    if differ:
        raise ValueError(
            f"cannot resume {out}: {len(differ)} run(s) were made with other settings than "
            "this command asks for (nothing was written):\n" + "\n".join(differ)
            + "\nrun the command that made them (see bench.json), or choose another --out")
    return refused


def remove_orphans(out: str | Path) -> list[Path]:
    """Remove the temporary files interrupted atomic writes left in ``out`` and its run
    directories (call it under the folder's lock)."""
    out = Path(out)
    removed = atomic.remove_orphans(out) if out.is_dir() else []
    if (out / "runs").is_dir():
        for rdir in (out / "runs").iterdir():
            if rdir.is_dir():
                removed += atomic.remove_orphans(rdir)
    return removed


# ------------------------------------------------------------------ tables from run folders
def collect_rows(out: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per run directory under ``out/runs`` (from ``config.json`` + ``result.json``),
    and the names of the settings that vary between runs of the same data set and method
    (the ablated settings).

    Runs without ``result.json`` (still running or killed) get status ``incomplete``; a run
    whose ``result.json`` is unreadable gets status ``error`` with the file named; a run whose
    ``config.json`` is unreadable is left out (see :func:`unreadable_runs`).
    """
    runs_dir = Path(out) / "runs"
    if not runs_dir.is_dir():
        raise ValueError(f"{out} is not a `dsbp bench` output folder (no runs/ inside)")
    rows, cfgs = [], []
    for rdir in sorted(runs_dir.iterdir()):
        if not (rdir / "config.json").exists():
            continue
        try:
            cfg = load_config(rdir)
        except atomic.CorruptFileError:
            continue
        try:
            res = read_result(rdir)
        except atomic.CorruptFileError as err:
            res = RunResult("error", math.nan, math.nan, math.nan, 0, 0, str(err))
        if res is None:
            res = RunResult("incomplete", math.nan, math.nan, math.nan, 0, 0, "no result.json")
        rows.append({
            "dataset": cfg.dataset, "model": cfg.model, "method": cfg.method, "seed": cfg.seed,
            "epochs": cfg.epochs, "test_acc": res.test_acc, "test_loss": res.test_loss,
            "wall_s": res.wall_s, "device": res.device_name or cfg.device, "status": res.status,
            "epochs_done": res.epochs_done, "steps": res.steps, "batch_size": cfg.batch_size,
            "lr": cfg.lr, "subset": cfg.subset, "run": rdir.name, "message": res.message,
        })
        cfgs.append(cfg)
    varying = _varying_settings(cfgs)
    for row, cfg in zip(rows, cfgs, strict=True):
        row.update({k: setting_value(cfg, k) for k in varying})
    return rows, varying


def _varying_settings(cfgs: Sequence[RunConfig]) -> list[str]:
    """Settings (config fields other than dataset/method/seed, or method kwargs) that differ
    between runs sharing a data set and method."""
    groups: dict[tuple[str, str], list[RunConfig]] = {}
    for c in cfgs:
        groups.setdefault((c.dataset, c.method), []).append(c)
    varying: list[str] = []
    skip = {"dataset", "method", "seed", "method_kwargs", "model_kwargs", "track"}
    for group in groups.values():
        keys = [f for f in sorted(CONFIG_FIELDS) if f not in skip]
        keys += sorted({k for c in group for k in c.method_kwargs})
        for k in keys:
            values = {json.dumps(setting_value(c, k), sort_keys=True) for c in group}
            if len(values) > 1 and k not in varying:
                varying.append(k)
    return varying


def write_results_csv(
    path: str | Path, rows: Iterable[dict[str, Any]], extra: Sequence[str]
) -> None:
    """Atomically write ``rows`` with :data:`RESULT_COLUMNS` then ``extra`` columns."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[*RESULT_COLUMNS, *extra], extrasaction="ignore",
                       lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in w.fieldnames})
    atomic.write_text(path, buf.getvalue())


def unreadable_runs(out: str | Path) -> list[str]:
    """One line per run directory of ``out`` whose ``config.json`` cannot be read."""
    bad = []
    runs_dir = Path(out) / "runs"
    for rdir in sorted(runs_dir.iterdir()) if runs_dir.is_dir() else []:
        if (rdir / "config.json").exists():
            try:
                load_config(rdir)
            except atomic.CorruptFileError as err:
                bad.append(str(err))
    return bad


def data_records(run_dirs: Sequence[Path]) -> list[dict[str, Any]]:
    """The distinct data files the runs trained on (from their ``env.json``): data set,
    path, bytes, sha256."""
    seen: dict[tuple[Any, ...], dict[str, Any]] = {}
    for d in run_dirs:
        try:
            env = atomic.read_json(d / "env.json") if (d / "env.json").exists() else {}
        except atomic.CorruptFileError:
            continue
        data = env.get("data") if isinstance(env, dict) else None
        if not isinstance(data, dict):
            continue
        for f in data.get("files", []):
            key = (data.get("dataset"), f.get("path"), f.get("sha256"))
            seen.setdefault(key, {"dataset": data.get("dataset"), **f})
    return list(seen.values())


def posthoc_rows(out: Path, rows: list[dict[str, Any]],
                 analyses: Sequence[PostHoc] | None = None
                 ) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """The rows every analysis (default :data:`ANALYSES`) derives from the training ``rows``
    (which get the analyses' annotations in place), the columns they add, and a line per
    unreadable result file."""
    analyses = ANALYSES if analyses is None else analyses
    pristine = [dict(r) for r in rows]
    added: list[dict[str, Any]] = []
    columns: list[str] = []
    problems: list[str] = []
    for a in analyses:
        used = False
        for r, clean in zip(rows, pristine, strict=True):
            try:
                result = posthoc_result(out, a, str(r["run"]))
            except atomic.CorruptFileError as err:
                problems.append(str(err))
                continue
            if result is None:
                continue
            ann, new = a.rows(result, dict(clean))
            r.update(ann)
            added += new
            used = True
        if used:
            columns += [c for c in a.columns if c not in columns]
    return rows + added, columns, problems


def _result_readable(run_dir: Path) -> bool:
    try:
        read_result(run_dir)
    except atomic.CorruptFileError:
        return False
    return True


def posthoc_result(out: Path, analysis: PostHoc, run_name: str) -> dict[str, Any] | None:
    """``out/runs/<run_name>/<analysis.result_file>`` (None: absent or skipped)."""
    from dsbp.experiments.posthoc import read_result_file

    return read_result_file(out / "runs" / run_name, analysis.result_file)


def finish(out: str | Path, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """(Re)make ``results.csv``, ``report.md`` and the plots of ``out`` from its run folders.

    Every post-training analysis of :data:`ANALYSES` adds its rows and its report section.
    Unreadable files are named in the report (and left out); they do not stop it.

    Args:
        out: a sweep's output folder.
        meta: overrides of ``out/bench.json`` (command, preset, label...), saved into it.

    Returns:
        ``{"csv": ..., "report": ..., "plots": [...], "problems": [...]}``.
    """
    from dsbp.experiments.report import write_report
    from dsbp.plots.curves import plot_accuracy_vs_wallclock, plot_learning_curves

    out = Path(out)
    problems = unreadable_runs(out)
    info: dict[str, Any] = {}
    if (out / "bench.json").exists():
        try:
            info = atomic.read_json(out / "bench.json")
        except atomic.CorruptFileError as err:
            problems.append(str(err))
    if meta:  # e.g. `dsbp report --label`: kept, so the next remake shows it too
        info.update(meta)
        atomic.write_json(out / "bench.json", info)
    rows, varying = collect_rows(out)
    all_rows, extra, bad = posthoc_rows(out, rows)
    problems += bad
    write_results_csv(out / "results.csv", all_rows, [*varying, *extra])
    # The plots read the run folders themselves: only those whose files are readable.
    run_dirs = [out / "runs" / str(r["run"]) for r in rows]
    run_dirs = [d for d in run_dirs if _result_readable(d)]
    plots = [plot_learning_curves(run_dirs, out / "learning_curves.png"),
             plot_accuracy_vs_wallclock(run_dirs, out / "acc_vs_wallclock.png")]
    report = write_report(out / "report.md", rows, varying,
                          {**info, "data_files": data_records(run_dirs), "problems": problems},
                          plots=[p.name for p in plots if p is not None],
                          configs=[load_config(d) for d in run_dirs])
    sections = [line for a in ANALYSES for line in a.section(out, all_rows)]
    if sections:
        atomic.write_text(report, report.read_text().rstrip("\n") + "\n"
                          + "\n".join(sections) + "\n")
    return {"csv": out / "results.csv", "report": report, "plots": [p for p in plots if p],
            "problems": problems}


def bench(
    runs: Sequence[GridRun],
    out: str | Path,
    *,
    meta: Mapping[str, Any],
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    lock: bool = True,
) -> dict[str, Any]:
    """Run the grid and write the sweep's tables, report and plots (see the module docstring).

    Args:
        runs: the grid.
        out: output folder.
        meta: what the report shows about how the sweep was made (``command``, ``preset``,
            ``label``); saved to ``bench.json`` with the environment.
        resume, progress, log: as for :func:`run_grid`.
        lock: hold ``out/.lock`` while running (rank 0); False when the caller holds it.

    Raises:
        FileExistsError: another bench holds the lock, or ``out`` holds runs and ``resume``
            is False (nothing is written).
        ValueError: resuming with other settings than the saved runs' (nothing is written).

    Returns:
        ``{"results": [(GridRun, RunResult)...], "csv", "report", "plots"}`` (ranks other
        than 0 of a multi-process sweep: ``results`` only).
    """
    out = Path(out)
    preflight(runs, out, resume)  # a refusal leaves no trace, not even the lock file
    lock_ctx: Any = (atomic.FolderLock(out) if lock and is_writer()
                     else contextlib.nullcontext())
    with lock_ctx:
        refused = preflight(runs, out, resume)  # again under the lock, before any write
        for cfg in {gr.cfg.data_root: gr.cfg for gr in runs}.values():
            check_data_root(cfg)
        device = runs[0].cfg.device if runs else "cpu"
        from dsbp.experiments.build import resolve_device

        info = {**dict(meta), "env": environment(resolve_device(device)),
                "seeds": sorted({r.cfg.seed for r in runs}), "runs": [r.name for r in runs]}
        # Do not clobber the record of an earlier sweep when resuming it.
        exists = (out / "bench.json").exists()
        barrier()  # every rank has looked before rank 0 writes
        if is_writer():
            out.mkdir(parents=True, exist_ok=True)
            if resume:
                for p in remove_orphans(out):
                    log(f"removed {p} (left by an interrupted write)")
            if not (resume and exists):
                atomic.write_json(out / "bench.json", info)
        results = run_grid(runs, out, resume=resume, progress=progress, log=log,
                           refused=refused)
        if not is_writer():  # other ranks: the results only (rank 0 writes the tables)
            return {"results": results}
        made = finish(out)
        for line in made["problems"]:
            log(f"unreadable, left out of the tables: {line}")
    return {"results": results, **made}
