"""The paper's "pruning" ablation on finished runs (METHOD.md §2.2, issue 5 item 2).

:func:`prune_run` takes a finished run directory, rebuilds its model from ``config.json``,
loads the final weights from ``checkpoint.pt`` and, for each energy threshold ``tau_E``,
applies :mod:`dsbp.extensions.architecture` (factorise every layer into two thinner ones, or
prune units by spectral leverage), fine-tunes with plain SGD and evaluates on the run's own
test split. It writes ``prune.json`` and ``prune.csv`` into the run directory.

It is a post-hoc analysis (:data:`ANALYSIS`, a :class:`~dsbp.experiments.posthoc.PostHoc`):
``dsbp bench --prune 0.9,0.95,0.99`` (or ``--ablate prune=0.9,0.95,0.99``) runs it on every
finished run of a sweep (:func:`prune_bench`); the sweep's ``finish`` puts its rows into
``results.csv`` (method ``"<method>+factorise@<tau>"``, with ``params`` and ``flops`` columns)
and a "Pruning ablation" table into ``report.md``. ``dsbp prune RUN_DIR --taus ...`` is the
standalone form (command line: ``dsbp.cli.posthoc``).

Protocol [ours] (the paper gives none):

- spectra: the uncentred output covariance of each Linear / Conv2d on the first
  ``calib_batches`` batches of the run's training loader (epoch 0 order), model in eval mode;
- fine-tuning: SGD at a tenth of the run's peak ``lr`` (or ``finetune_lr``), constant
  (measured: at the full peak lr the fine-tune alone cost 6-8 points on the Fashion-MNIST
  subset of results/prune_ablation_cpu, since the runs ended a cosine schedule near 0),
  with the run's ``momentum`` and ``weight_decay``, for
  ``finetune_epochs`` passes of the run's training loader, continuing its epoch numbering
  (epochs ``cfg.epochs, cfg.epochs + 1, ...``: fresh shuffles, same seed), RNGs re-seeded
  with the run seed before each fine-tune so every tau sees the same batches;
- a control row ``"<method>+finetune"``: the unpruned model fine-tuned the same way, so the
  effect of the extra fine-tuning is separated from the effect of the factorisation;
- latency: median of ``latency_repeats`` forward passes on the CPU of a fixed batch of
  ``latency_batch`` test images, eval / inference mode, the process's torch thread count;
- FLOPs: :func:`dsbp.extensions.architecture.count_flops` (2 x MACs of Linear / Conv2d for
  one sample).
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

MODES = ("factorise", "prune")

# Columns the ablation adds to results.csv (after the usual ones and the ablated settings).
PRUNE_COLUMNS = ["tau", "params", "flops", "latency_ms", "acc_before_ft", "loss_before_ft"]

_CSV_FIELDS = ["kind", "tau", "params", "flops", "latency_ms", "acc_before", "loss_before",
               "acc_after", "loss_after", "finetune_s", "layers_changed", "ranks"]


def parse_taus(text: str | Sequence[float]) -> list[float]:
    """``"0.9,0.99"`` (or a sequence) -> ``[0.9, 0.99]``, each checked to lie in (0, 1].

    Raises:
        ValueError: an empty list, a non-number, or a value outside (0, 1].
    """
    items = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    taus = []
    for t in items:
        if t == "":
            continue
        try:
            v = float(t)
        except ValueError:
            raise ValueError(f"energy threshold {t!r} is not a number") from None
        if not 0.0 < v <= 1.0:
            raise ValueError(f"energy threshold tau must be in (0, 1], got {v}")
        taus.append(v)
    if not taus:
        raise ValueError(f"expected a comma-separated list of thresholds, got {text!r}")
    return taus


def prune_run(
    run_dir: str | Path,
    taus: Sequence[float],
    mode: str = "factorise",
    finetune_epochs: int = 1,
    *,
    calib_batches: int = 8,
    max_rows: int = 8192,
    min_saving: float | None = 0.0,
    finetune_lr: float | None = None,
    latency_batch: int = 64,
    latency_repeats: int = 20,
    device: str | None = None,
    dataset: Any | None = None,
    write: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Factorise (or prune) a finished run's final model at each ``tau_E``, fine-tune, measure.

    Args:
        run_dir: a run directory with ``config.json``, ``result.json`` (status ok) and
            ``checkpoint.pt``.
        taus: energy thresholds tau_E in (0, 1] (METHOD.md §2.2).
        mode: ``"factorise"`` (``W ~ E_r (E_r^T W)``, two thinner layers) or ``"prune"``
            (keep the r_l highest-leverage units of each producer layer).
        finetune_epochs: SGD epochs after the change (0: none; then ``acc_after`` equals
            ``acc_before``).
        calib_batches: training batches the output spectra are computed on.
        max_rows: activation rows per layer and batch in the spectra.
        min_saving: factorise a layer only if it cuts its FLOPs by more than this fraction;
            ``None`` factorises every layer (at tau = 1 then reproducing the outputs).
        finetune_lr: constant SGD learning rate of the fine-tune (None: a tenth of the
            run's peak ``lr``, chosen by measurement, see the module docstring).
        latency_batch: images per timed forward pass.
        latency_repeats: timed passes (the median is reported).
        device: where spectra and fine-tuning run (default: the run's device; latency is
            always measured on the CPU).
        dataset: the already loaded ``ImageDataset`` of the run (else loaded).
        write: write ``prune.json`` and ``prune.csv`` into ``run_dir``.
        log: one line per threshold.

    Returns:
        The content of ``prune.json``: ``run``, ``method``, settings, ``original`` (params,
        flops, latency_s, acc/loss as trained and after the control fine-tune) and ``taus``
        (one dict per threshold: tau, params, flops, latency_s, acc_before, loss_before,
        acc_after, loss_after, finetune_s, layers). A run that cannot be ablated (not ok,
        a wrapped method, a model the chain pruning does not describe) gives
        ``{"skipped": reason, ...}`` (also written).

    Raises:
        ValueError: bad ``mode``, ``taus`` or ``finetune_epochs``; ``run_dir`` not a run.
    """
    from dsbp.experiments.build import resolve_device
    from dsbp.experiments.run import load_config, seed_everything
    from dsbp.extensions import architecture as arch

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if finetune_epochs < 0:
        raise ValueError(f"finetune_epochs must be >= 0, got {finetune_epochs}")
    taus = parse_taus(taus)
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise ValueError(f"{run_dir} is not a run directory (no config.json)")
    cfg = load_config(run_dir)
    settings = {"mode": mode, "finetune_epochs": finetune_epochs, "calib_batches": calib_batches,
                "max_rows": max_rows, "min_saving": min_saving, "finetune_lr": finetune_lr,
                "latency_batch": latency_batch,
                "latency_repeats": latency_repeats, "taus": taus}
    head = {"run": run_dir.name, "method": cfg.method, "dataset": cfg.dataset,
            "model": cfg.model, "seed": cfg.seed, **settings}

    def skipped(reason: str) -> dict[str, Any]:
        return skipped_result(run_dir, "prune.json", head, reason, write=write, log=log,
                              what="prune")

    dev = resolve_device(device or cfg.device)
    try:
        res, _, data, model = load_finished(run_dir, cfg, dev, dataset)
    except SkipRun as why:
        return skipped(str(why))
    model.eval()
    input_shape = (data.in_channels, data.image_size, data.image_size)

    calib = []
    for i, (x, _) in enumerate(data.train.iter_epoch(0)):
        if i >= calib_batches:
            break
        calib.append(x)
    spectra = arch.output_spectra(model, calib, max_rows=max_rows, seed=cfg.seed)
    x_lat = torch.cat([x for x, _ in data.test.iter_epoch(0)])[:latency_batch].cpu()

    def flops_of(m: torch.nn.Module) -> int:
        return int(sum(v["flops"] for v in arch.count_flops(m, input_shape).values()))

    def latency_of(m: torch.nn.Module) -> float:
        import copy

        return arch.measure_latency(copy.deepcopy(m).cpu(), x_lat, repeats=latency_repeats)

    def tune(m: torch.nn.Module) -> tuple[torch.nn.Module, float]:
        seed_everything(cfg.seed)
        t0 = time.perf_counter()
        arch.fine_tune(m, lambda e: data.train.iter_epoch(cfg.epochs + e), epochs=finetune_epochs,
                       lr=0.1 * cfg.lr if finetune_lr is None else finetune_lr,
                       momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        return m, time.perf_counter() - t0

    import copy

    # The first optimizer a process builds pays torch's lazy imports (seconds): not tuning.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    loss0, acc0 = evaluate(model, data.test)
    control, ft_s = tune(copy.deepcopy(model))
    loss_c, acc_c = evaluate(control, data.test)
    original = {"params": arch.count_params(model), "flops": flops_of(model),
                "latency_s": latency_of(model), "acc": acc0, "loss": loss0,
                "acc_logged": res.test_acc, "acc_finetuned": acc_c, "loss_finetuned": loss_c,
                "finetune_s": ft_s}
    rows = []
    for tau in taus:
        try:
            if mode == "factorise":
                new, info = arch.factorize(model, spectra, tau, input_shape,
                                           min_saving=min_saving)
                changed = sum(1 for v in info.values() if v["factorised"])
            else:
                new, info = arch.prune(model, spectra, tau, check_input=calib[0])
                changed = sum(1 for v in info.values() if v["rank"] < v["d_out"])
        except ValueError as err:
            return skipped(f"{mode} failed at tau={tau}: {err}")
        new = new.to(dev)
        row: dict[str, Any] = {"tau": tau, "params": arch.count_params(new), "flops": flops_of(new),
               "latency_s": latency_of(new), "layers_changed": changed,
               "layers": {k: {kk: vv for kk, vv in v.items() if kk != "kept"}
                          for k, v in info.items()}}
        row["loss_before"], row["acc_before"] = evaluate(new, data.test)
        new, row["finetune_s"] = tune(new)
        row["loss_after"], row["acc_after"] = evaluate(new, data.test)
        rows.append(row)
        log(f"prune {run_dir.name}: {mode}@{tau:g}: params {row['params']}/{original['params']}"
            f" flops {row['flops']}/{original['flops']} acc {100 * acc0:.2f}% -> "
            f"{100 * row['acc_before']:.2f}% -> ft {100 * row['acc_after']:.2f}% "
            f"(control ft {100 * acc_c:.2f}%)")
    out = {**head, "device": str(dev), "original": original, "results": rows}
    if write:
        atomic.write_json(run_dir / "prune.json", out)
        atomic.write_text(run_dir / "prune.csv", _prune_csv(out))
    return out


def _prune_csv(p: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    o = p["original"]
    w.writerow({"kind": "original", "tau": "", "params": o["params"], "flops": o["flops"],
                "latency_ms": 1e3 * o["latency_s"], "acc_before": o["acc"],
                "loss_before": o["loss"], "acc_after": o["acc_finetuned"],
                "loss_after": o["loss_finetuned"], "finetune_s": o["finetune_s"],
                "layers_changed": 0})
    for r in p["results"]:
        # ranks: "layer:r/d_out" per layer, the tau_E rank of each layer's output spectrum
        ranks = " ".join(f"{k}:{v['rank']}/{v['d_out']}" for k, v in r["layers"].items())
        w.writerow({"kind": p["mode"], "latency_ms": 1e3 * r["latency_s"], "ranks": ranks,
                    **{k: r[k] for k in _CSV_FIELDS if k in r}})
    return buf.getvalue()


# ------------------------------------------------------------------------- sweep integration
def _want(taus: Sequence[float] | str, mode: str = "factorise", finetune_epochs: int = 1,
          **kwargs: Any) -> dict[str, Any]:
    """The settings a kept ``prune.json`` must match (resume)."""
    return {"mode": mode, "finetune_epochs": finetune_epochs, "taus": parse_taus(taus),
            "finetune_lr": kwargs.get("finetune_lr")}


def _run(run_dir: str | Path, *, taus: Sequence[float], mode: str = "factorise",
         finetune_epochs: int = 1, **kwargs: Any) -> dict[str, Any]:
    return prune_run(run_dir, taus, mode, finetune_epochs, **kwargs)


def prune_bench(
    out: str | Path,
    taus: Sequence[float],
    mode: str = "factorise",
    finetune_epochs: int = 1,
    *,
    resume: bool = True,
    log: Callable[[str], None] = print,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """:func:`prune_run` on every run directory of a ``dsbp bench`` output folder
    (``ANALYSIS.apply``).

    Args:
        out: the sweep's output folder (``out/runs/<name>``).
        taus, mode, finetune_epochs: as for :func:`prune_run`.
        resume: keep a run's ``prune.json`` made with the same settings instead of redoing it.
        log: progress lines.
        **kwargs: passed on to :func:`prune_run`.

    Returns:
        The ``prune.json`` contents, in run-name order.
    """
    return ANALYSIS.apply(out, resume=resume, log=log, taus=parse_taus(taus), mode=mode,
                          finetune_epochs=finetune_epochs, **kwargs)


def _fmt_tau(tau: float) -> str:
    return f"{tau:g}"


def prune_rows(p: dict[str, Any], row: dict[str, Any]
               ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``results.csv`` rows of one run's ``prune.json`` ``p`` (its training row: ``row``).

    The training row gets its model's ``params`` / ``flops`` / ``latency_ms``; each tau adds a
    row with method ``"<method>+<mode>@<tau>"``, ``test_acc`` / ``test_loss`` after
    fine-tuning, ``acc_before_ft`` / ``loss_before_ft``, ``latency_ms`` and ``wall_s`` =
    fine-tuning seconds; the control adds ``"<method>+finetune"``.

    Returns:
        ``(columns added to the training row, added rows)``.
    """
    o = p["original"]
    ann = {"params": o["params"], "flops": o["flops"], "latency_ms": 1e3 * o["latency_s"]}
    base = {k: v for k, v in {**row, **ann}.items()
            if k not in ("method", "test_acc", "test_loss", "wall_s", "message")}
    added = [{**base, "method": f"{p['method']}+finetune", "tau": "",
              "test_acc": o["acc_finetuned"], "test_loss": o["loss_finetuned"],
              "acc_before_ft": o["acc"], "loss_before_ft": o["loss"],
              "wall_s": o["finetune_s"], "message": ""}]
    for t in p["results"]:
        added.append({**base, "method": f"{p['method']}+{p['mode']}@{_fmt_tau(t['tau'])}",
                      "tau": t["tau"], "params": t["params"], "flops": t["flops"],
                      "latency_ms": 1e3 * t["latency_s"], "test_acc": t["acc_after"],
                      "test_loss": t["loss_after"], "acc_before_ft": t["acc_before"],
                      "loss_before_ft": t["loss_before"], "wall_s": t["finetune_s"],
                      "message": f"finetune_epochs={p['finetune_epochs']}"})
    return ann, added


def prune_section(out: str | Path, rows: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown lines of the "Pruning ablation" section (empty without any prune.json)."""
    runs_dir = Path(out) / "runs"
    pr = [r for r in rows if r.get("flops") not in (None, "") and r.get("status") == "ok"]
    settings, any_settings = None, None  # a skipped run's prune.json has the settings too
    skipped = []
    for rdir in sorted(p for p in runs_dir.iterdir() if (p / "prune.json").exists()):
        try:
            p = atomic.read_json(rdir / "prune.json")
        except atomic.CorruptFileError as err:
            skipped.append(f"- `{rdir.name}`: {err}")
            continue
        any_settings = any_settings or p
        if "skipped" in p:
            skipped.append(f"- `{rdir.name}`: {p['skipped']}")
        elif settings is None:
            settings = p
    if not skipped and not any(r.get("acc_before_ft") not in (None, "") for r in pr):
        return []
    s = settings or any_settings or {}
    lines = [
        "", "## Pruning ablation (spectral architecture optimisation, METHOD.md §2.2)", "",
        f"Each finished run's final model, {s.get('mode', '?')}d at energy threshold tau_E "
        f"(per-layer rank = fewest output eigen-directions holding tau_E of the energy, from "
        f"{s.get('calib_batches', '?')} training batches), then fine-tuned with SGD at "
        + ("a tenth of the run's peak lr" if s.get("finetune_lr") is None
           else f"constant lr {s.get('finetune_lr')}")
        + f" for {s.get('finetune_epochs', '?')} epoch(s) and evaluated on the same test "
        "split. `+finetune` is the control: the unchanged model fine-tuned the same way. "
        "FLOPs: 2 x MACs of Linear/Conv2d per sample (analytic). Latency: median CPU forward "
        f"time of a {s.get('latency_batch', '?')}-image batch (noisy on a shared CPU). "
        "Mean ± sample std over seeds. Protocol [ours]: see `dsbp.experiments.prune`.",
        "",
    ]
    header = ["data set", "model", "method", "runs", "params", "MFLOPs / sample",
              "CPU latency (ms)", "test acc before ft (%)", "test acc after ft (%)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in pr:
        groups.setdefault((r["dataset"], r["model"], r["method"]), []).append(r)

    def order(k: tuple) -> tuple:
        m = k[2]
        base, _, tau = m.partition("@")
        return (k[0], k[1], base.split("+")[0], 0 if "+" not in m else 1 if not tau else 2,
                -float(tau) if tau else 0.0)

    for key in sorted(groups, key=order):
        g = groups[key]
        before = [r.get("acc_before_ft") if "+" in key[2] else r["test_acc"] for r in g]
        after = [r["test_acc"] for r in g] if "+" in key[2] else []
        lines.append("| " + " | ".join([
            key[0], key[1], key[2], str(len(g)),
            mean_std_text([r["params"] for r in g], 1.0, 0),
            mean_std_text([r["flops"] for r in g], 1e-6, 3),
            mean_std_text([r["latency_ms"] for r in g], 1.0, 3),
            mean_std_text(before, 100.0),
            mean_std_text(after, 100.0) if after else "(as trained)"]) + " |")
    if skipped:
        lines += ["", "Runs left out of the ablation:", "", *skipped]
    return lines


ANALYSIS = PostHoc(name="prune", result_file="prune.json", columns=tuple(PRUNE_COLUMNS),
                   run=_run, want=_want, rows=prune_rows, section=prune_section)


__all__ = ["ANALYSIS", "MODES", "PRUNE_COLUMNS",
           "parse_taus", "prune_bench", "prune_rows", "prune_run", "prune_section"]
