"""Test-time adaptation on shifted test streams, for finished runs (METHOD.md §2.1, issue 5).

:func:`shift_run` takes a finished run directory, rebuilds its model from ``config.json``,
loads the final weights from ``checkpoint.pt`` and evaluates it online on the run's own test
split shifted by :func:`dsbp.data.shifts.apply_shift` (``rotate``, ``noise``, ``blur``,
``contrast`` at severities 0..5; 0 is the clean stream) with each test-time method of
:func:`dsbp.extensions.inference.shift_benchmark`: ``none`` (no adaptation), ``bn_stats``,
``tent`` (unprojected entropy minimisation) and ``spectral_tta`` (projected). It writes
``shift.json`` and ``shift.csv`` into the run directory.

It is a post-hoc analysis (:data:`ANALYSIS`, a :class:`~dsbp.experiments.posthoc.PostHoc`):
``dsbp bench --shift rotate,noise --shift-severity 1,3,5`` runs it on every finished run of a
sweep (:func:`shift_bench`); the sweep's ``finish`` puts rows
``"<method>+<tta>@<kind><severity>"`` (``test_acc`` = online accuracy) into ``results.csv``
and a "Shifted test streams" table into ``report.md``. ``dsbp shift RUN_DIR_OR_OUT`` is the
standalone form (command line: ``dsbp.cli.posthoc``).

Protocol [ours] (the paper gives none):

- the stream is the run's test split (``eval_subset`` included, as the run evaluated it) in one
  random order drawn from ``stream_seed`` (default 0, the same for every run, method and seed;
  it also seeds the noise shift), cut into batches of ``batch_size``;
- every (shift, severity, test-time method) starts from the run's final weights; a batch is
  predicted by the forward pass of its own adaptation step (TENT's online protocol);
- TENT and spectral TTA: Adam at ``tta_lr`` (default 1e-3), ``tta_steps`` step(s) per batch on
  the BatchNorm affine parameters; spectral TTA projects them on the online-tracked top
  ``tta_rank`` output eigenvectors of the layer feeding each BatchNorm;
- it runs on the CPU (``shift_benchmark`` normalises its batches there);
- ``wall_s`` of a row: seconds of shifting plus the online pass of that method;
- severity 0 is the same clean stream for every kind (``apply_shift`` returns the images
  unchanged and the stream order does not depend on the kind): it is run once and its rows
  are repeated under each kind.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from dsbp.experiments import atomic
from dsbp.experiments.posthoc import (
    PostHoc,
    SkipRun,
    evaluate,
    load_finished,
    mean_std_text,
    skipped_result,
)

# Test-time methods of dsbp.extensions.inference.TTA_METHODS run by default.
DEFAULT_TTA = ("none", "tent", "spectral_tta")
KNOWN_TTA = ("none", "bn_stats", "tent", "spectral_tta")
KINDS = ("rotate", "noise", "blur", "contrast")

# Columns the shift rows add to results.csv.
SHIFT_COLUMNS = ["tta", "shift", "severity"]

_CSV_FIELDS = ["shift", "severity", "method", "accuracy", "n", "wall_s"]


def parse_kinds(text: str | Sequence[str]) -> list[str]:
    """``"rotate,noise"`` (or a sequence) -> ``["rotate", "noise"]``, each a known shift kind.

    Raises:
        ValueError: an empty list or an unknown kind.
    """
    items = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    kinds = [k for k in items if k]
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown shift kind(s) {bad}; expected some of {KINDS}")
    if not kinds:
        raise ValueError(f"expected a comma-separated list of shift kinds, got {text!r}")
    return kinds


def parse_severities(text: str | Sequence[int]) -> list[int]:
    """``"0,3,5"`` (or a sequence) -> ``[0, 3, 5]``, each an integer in 0..5 (0: clean).

    Raises:
        ValueError: an empty list, a non-integer, or a value outside 0..5.
    """
    items = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    out = []
    for t in items:
        if t == "":
            continue
        try:
            v = int(t)
        except (TypeError, ValueError):
            raise ValueError(f"shift severity {t!r} is not an integer") from None
        if isinstance(t, float) and t != v or not 0 <= v <= 5:
            raise ValueError(f"shift severity must be an integer in 0..5, got {t!r}")
        out.append(v)
    if not out:
        raise ValueError(f"expected a comma-separated list of severities, got {text!r}")
    return out


def parse_tta(text: str | Sequence[str]) -> list[str]:
    """``"none,tent"`` -> ``["none", "tent"]``, each a test-time method name.

    Raises:
        ValueError: an empty list or an unknown name.
    """
    items = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    names = [m for m in items if m]
    bad = [m for m in names if m not in KNOWN_TTA]
    if bad:
        raise ValueError(f"unknown test-time method(s) {bad}; expected some of {KNOWN_TTA}")
    if not names:
        raise ValueError(f"expected a comma-separated list of test-time methods, got {text!r}")
    return names


def _test_split(cfg: Any, dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's test images (uint8 (N, C, H, W)) and labels, as ``build.load_data`` cuts them."""
    from dsbp.data.subset import balanced_subset

    x, y = dataset.x_test, dataset.y_test
    if cfg.eval_subset is not None:
        x, y = balanced_subset(x, y, cfg.eval_subset, seed=0)  # = build.load_data's subset
    return x, y


def shift_run(
    run_dir: str | Path,
    kinds: Sequence[str],
    severities: Sequence[int],
    methods: Sequence[str] = DEFAULT_TTA,
    *,
    batch_size: int = 128,
    stream_seed: int = 0,
    tta_lr: float = 1e-3,
    tta_steps: int = 1,
    tta_rank: int = 10,
    dataset: Any | None = None,
    write: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Online accuracy of a finished run's final model on shifted test streams, per method.

    Args:
        run_dir: a run directory with ``config.json``, ``result.json`` (status ok) and
            ``checkpoint.pt``.
        kinds: shift kinds of :func:`dsbp.data.shifts.apply_shift`.
        severities: integers in 0..5 (0: the clean stream).
        methods: test-time methods: ``none``, ``bn_stats``, ``tent``, ``spectral_tta``.
        batch_size: test batch size of the stream (default 128).
        stream_seed: order of the stream and the noise draw (default 0) [ours].
        tta_lr, tta_steps: Adam learning rate and steps per batch of TENT / spectral TTA.
        tta_rank: k of the bases spectral TTA tracks on the stream.
        dataset: the already loaded ``ImageDataset`` of the run (else loaded).
        write: write ``shift.json`` and ``shift.csv`` into ``run_dir``.
        log: one line per stream.

    Returns:
        The content of ``shift.json``: ``run``, ``method``, ``dataset``, ``model``, ``seed``,
        the settings, ``clean_acc`` (the final model's accuracy on the unshifted test split,
        eval mode, via the training loop's evaluation), ``results`` (one dict per
        (shift, severity, tta): shift, severity, method, accuracy, n, wall_s) and
        ``tta_skipped`` (``{tta: reason}`` for methods the model does not admit, e.g. TENT on
        a network without BatchNorm). A run that cannot be evaluated gives
        ``{"skipped": reason, ...}`` (also written).

    Raises:
        ValueError: bad kinds, severities, methods, batch size or test-time settings;
            ``run_dir`` not a run.
    """
    from dsbp.data.shifts import apply_shift
    from dsbp.experiments.run import load_config
    from dsbp.extensions.inference import shift_benchmark

    kinds, severities, methods = parse_kinds(kinds), parse_severities(severities), \
        parse_tta(methods)
    for name, v in (("batch_size", batch_size), ("tta_steps", tta_steps),
                    ("tta_rank", tta_rank)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not tta_lr >= 0.0:
        raise ValueError(f"tta_lr must be >= 0, got {tta_lr}")
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise ValueError(f"{run_dir} is not a run directory (no config.json)")
    cfg = load_config(run_dir)
    settings = {"kinds": kinds, "severities": severities, "tta": methods,
                "batch_size": batch_size, "stream_seed": stream_seed, "tta_lr": tta_lr,
                "tta_steps": tta_steps, "tta_rank": tta_rank}
    head = {"run": run_dir.name, "method": cfg.method, "dataset": cfg.dataset,
            "model": cfg.model, "seed": cfg.seed, **settings}

    def skipped(reason: str) -> dict[str, Any]:
        return skipped_result(run_dir, "shift.json", head, reason, write=write, log=log,
                              what="shift")

    dev = torch.device("cpu")  # shift_benchmark normalises its batches on the CPU
    try:
        res, ds, data, model = load_finished(run_dir, cfg, dev, dataset)
    except SkipRun as why:
        return skipped(str(why))
    model.eval()
    _, clean_acc = evaluate(model, data.test)
    x_te, y_te = _test_split(cfg, ds)
    tta = {"lr": tta_lr, "steps": tta_steps}
    kw = {"tent": tta, "spectral_tta": {**tta, "rank": tta_rank}}
    rows: list[dict[str, Any]] = []
    tta_skipped: dict[str, str] = {}
    clean: dict[str, dict[str, Any]] = {}  # severity 0: one clean stream for every kind
    for kind in kinds:
        for sev in severities:
            accs = {}
            for name in methods:
                if name in tta_skipped:
                    continue
                if sev == 0 and name in clean:
                    rows.append({**clean[name], "shift": kind})
                    accs[name] = clean[name]["accuracy"]
                    continue
                t0 = time.perf_counter()
                try:
                    (row,) = shift_benchmark(model, apply_shift, x_te, y_te, ds.mean, ds.std,
                                             kinds=(kind,), severities=(sev,), methods=(name,),
                                             batch_size=batch_size, seed=stream_seed,
                                             method_kwargs=kw)
                except ValueError as err:  # e.g. TENT on a network without BatchNorm
                    tta_skipped[name] = str(err)
                    log(f"shift {run_dir.name}: {name} skipped: {err}")
                    continue
                row["wall_s"] = time.perf_counter() - t0
                rows.append(row)
                if sev == 0:
                    clean[name] = row
                accs[name] = row["accuracy"]
            log(f"shift {run_dir.name}: {kind}@{sev}: " + ", ".join(
                f"{k} {100 * v:.2f}%" for k, v in accs.items()))
    out = {**head, "clean_acc": clean_acc, "acc_logged": res.test_acc, "n_test": len(y_te),
           "results": rows, "tta_skipped": tta_skipped}
    if write:
        atomic.write_json(run_dir / "shift.json", out)
        atomic.write_text(run_dir / "shift.csv", _shift_csv(rows))
    return out


def _shift_csv(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_CSV_FIELDS, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


# ------------------------------------------------------------------------- sweep integration
_STREAM_SETTINGS = ("batch_size", "stream_seed", "tta_lr", "tta_steps", "tta_rank")


def _want(kinds: Sequence[str], severities: Sequence[int], methods: Sequence[str] = DEFAULT_TTA,
          **kwargs: Any) -> dict[str, Any]:
    """The settings a kept ``shift.json`` must match (resume)."""
    want: dict[str, Any] = {"kinds": parse_kinds(kinds),
                            "severities": parse_severities(severities),
                            "tta": parse_tta(methods)}
    want.update({k: kwargs[k] for k in _STREAM_SETTINGS if k in kwargs})
    return want


def _run(run_dir: str | Path, *, kinds: Sequence[str], severities: Sequence[int],
         methods: Sequence[str] = DEFAULT_TTA, **kwargs: Any) -> dict[str, Any]:
    return shift_run(run_dir, kinds, severities, methods, **kwargs)


def shift_bench(
    out: str | Path,
    kinds: Sequence[str],
    severities: Sequence[int],
    methods: Sequence[str] = DEFAULT_TTA,
    *,
    resume: bool = True,
    log: Callable[[str], None] = print,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """:func:`shift_run` on every run directory of a ``dsbp bench`` output folder
    (``ANALYSIS.apply``).

    Args:
        out: the sweep's output folder (``out/runs/<name>``).
        kinds, severities, methods: as for :func:`shift_run`.
        resume: keep a run's ``shift.json`` made with the same settings instead of redoing it.
        log: progress lines.
        **kwargs: passed on to :func:`shift_run`.

    Returns:
        The ``shift.json`` contents, in run-name order.
    """
    return ANALYSIS.apply(out, resume=resume, log=log, kinds=parse_kinds(kinds),
                          severities=parse_severities(severities), methods=parse_tta(methods),
                          **kwargs)


def shift_method(method: str, tta: str, kind: str, severity: int) -> str:
    """The results.csv method name of a shift row: ``"<method>+<tta>@<kind><severity>"``."""
    return f"{method}+{tta}@{kind}{int(severity)}"


def shift_rows(p: dict[str, Any], row: dict[str, Any]
               ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``results.csv`` rows of one run's ``shift.json`` ``p`` (its training row: ``row``).

    Each (shift, severity, test-time method) adds a row with method
    ``"<method>+<tta>@<kind><severity>"``, ``test_acc`` = the online accuracy on that stream,
    ``test_loss`` empty, ``wall_s`` = seconds of that pass, and the columns ``tta``, ``shift``,
    ``severity``.

    Returns:
        ``({}, added rows)`` (nothing is added to the training row).
    """
    base = {k: v for k, v in row.items()
            if k not in ("method", "test_acc", "test_loss", "wall_s", "message")}
    added = [{**base, "method": shift_method(p["method"], t["method"], t["shift"], t["severity"]),
              "tta": t["method"], "shift": t["shift"], "severity": t["severity"],
              "test_acc": t["accuracy"], "test_loss": None, "wall_s": t["wall_s"],
              "message": f"online accuracy, {t['n']} images"} for t in p["results"]]
    return {}, added


def _ms(values: Sequence[Any]) -> str:
    return mean_std_text(values, 100.0)


def shift_section(out: str | Path, rows: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown lines of the "Shifted test streams" section (empty without any shift.json).

    One line per (data set, model, training method, shift, severity); one column per
    test-time method: mean ± sample std over seeds of the online accuracy (%).
    """
    runs_dir = Path(out) / "runs"
    settings, skipped = None, []
    for rdir in sorted(p for p in runs_dir.iterdir() if (p / "shift.json").exists()):
        try:
            p = atomic.read_json(rdir / "shift.json")
        except atomic.CorruptFileError as err:
            skipped.append(f"- `{rdir.name}`: {err}")
            continue
        if "skipped" in p:
            skipped.append(f"- `{rdir.name}`: {p['skipped']}")
            continue
        settings = settings or p
        skipped += [f"- `{rdir.name}`: {m}: {why}" for m, why in p.get("tta_skipped", {}).items()]
    sr = [r for r in rows if r.get("tta") not in (None, "") and r.get("status") == "ok"]
    if not sr and not skipped:
        return []
    s = settings or {}
    ttas = [m for m in KNOWN_TTA if any(r["tta"] == m for r in sr)]
    lines = [
        "", "## Shifted test streams (test-time adaptation, METHOD.md §2.1)", "",
        "Each finished run's final model, evaluated online on its own test split shifted by "
        "`dsbp.data.shifts.apply_shift` (severity 0 = clean), in one seeded random order "
        f"(stream seed {s.get('stream_seed', '?')}), batches of {s.get('batch_size', '?')}. "
        "`none`: no adaptation (eval mode); `tent`: entropy minimisation of the BatchNorm "
        f"affine parameters (Adam lr {s.get('tta_lr', '?')}, {s.get('tta_steps', '?')} "
        "step(s) per batch); `spectral_tta`: the same with the updates projected on the "
        f"online-tracked top-{s.get('tta_rank', '?')} output eigenvectors of the layer feeding "
        "each BatchNorm; `bn_stats`: test-batch statistics, no update. Online accuracy (%), "
        "mean ± sample std over seeds. Protocol [ours]: see `dsbp.experiments.shift`.", "",
    ]
    header = ["data set", "model", "method", "shift", "severity", "runs", *ttas]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    groups: dict[tuple, dict[str, list[float]]] = {}
    counts: dict[tuple, set] = {}
    for r in sr:
        base = str(r["method"]).split("+")[0]
        key = (r["dataset"], r["model"], base, r["shift"], int(r["severity"]))
        groups.setdefault(key, {}).setdefault(r["tta"], []).append(r["test_acc"])
        counts.setdefault(key, set()).add(r["run"])
    shown_clean: set[tuple] = set()
    # per run: mean over shifted streams
    shifted: dict[tuple, dict[str, dict[str, list[float]]]] = {}
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], k[4] > 0, KINDS.index(k[3]),
                                             k[4])):
        g = groups[key]
        if key[4] == 0:  # the clean stream is the same for every kind: one line
            if key[:3] in shown_clean:
                continue
            shown_clean.add(key[:3])
        cells = [*key[:3], "clean" if key[4] == 0 else key[3], str(key[4])]
        lines.append("| " + " | ".join([*cells, str(len(counts[key])),
                                        *[_ms(g.get(m, [])) for m in ttas]]) + " |")
    for r in sr:
        if int(r["severity"]) > 0:
            k = (r["dataset"], r["model"], str(r["method"]).split("+")[0])
            per_run = shifted.setdefault(k, {}).setdefault(r["tta"], {})
            per_run.setdefault(r["run"], []).append(float(r["test_acc"]))
    if shifted:
        lines += ["", "Mean over the shifted streams (severity > 0) of each run, then mean ± "
                  "sample std over seeds:", "",
                  "| data set | model | method | streams | " + " | ".join(ttas) + " |",
                  "|" + "---|" * (4 + len(ttas))]
        for k in sorted(shifted):
            per = shifted[k]
            n = max(len(v) for runs in per.values() for v in runs.values())
            means = {m: [sum(v) / len(v) for v in per.get(m, {}).values()] for m in ttas}
            lines.append("| " + " | ".join([*k, str(n), *[_ms(means[m]) for m in ttas]]) + " |")
    if skipped:
        lines += ["", "Left out:", "", *skipped]
    return lines


ANALYSIS = PostHoc(name="shift", result_file="shift.json", columns=tuple(SHIFT_COLUMNS),
                   run=_run, want=_want, rows=shift_rows, section=shift_section)


__all__ = ["ANALYSIS", "DEFAULT_TTA", "KINDS", "KNOWN_TTA", "SHIFT_COLUMNS",
           "parse_kinds", "parse_severities", "parse_tta",
           "shift_bench", "shift_method", "shift_rows", "shift_run", "shift_section"]
