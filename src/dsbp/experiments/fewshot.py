"""``dsbp fewshot``: spectral meta-learning against MAML on N-way K-shot episodes (METHOD.md §2.3).

Episodic meta-training does not fit the ``dsbp bench`` loop (batches of one data set, test
accuracy on its test split), so few-shot runs have their own command (``dsbp.cli.fewshot``)
and output folder::

    dsbp fewshot --datasets fashion_mnist,cifar10 --shots 1,5 --seeds 3 --out runs/fewshot

Layout of ``out``::

    config.json         the settings (FewshotConfig) and the command
    env.json            where and with what it ran (as a bench run's env.json)
    runs/<cell>.json    one (data set, N-way, K-shot, method, seed) cell: the class split, the
                        per-episode test accuracies, timings
    results.csv         one row per cell (test_acc = mean query accuracy over test episodes)
    report.md           MAML beside spectral MAML: mean and 95% CI over test episodes

Methods: ``maml`` (:class:`dsbp.baselines.maml.MAML`) and ``spectral_maml``
(:class:`dsbp.extensions.meta.SpectralMAML`: the inner gradient projected on the top-k
eigenvectors of each layer's activation covariance on the support set, no gradient through the
eigensolver). For each data set, shot count and seed both are meta-trained from the same
initialisation on the same training episodes and scored on the same test episodes.

Protocol [ours] (as ``scripts/ext_meta.py``, which produced ``results/extensions/meta``):

- classes split at random (seed) into disjoint meta-train / meta-test classes
  (``dsbp.data.episodes.class_split``): 50/50 for data sets of at most 10 classes, 70/30 above
  (the 200-class Tiny ImageNet subset); meta-train episodes come from the train split,
  meta-test episodes from the test split (above 10 classes: the train and test images of the
  meta-test classes, too few test images per class otherwise); images of 64 pixels or more
  on a side in a data set of more than 10 classes are average-pooled 2x2 (64x64 -> 32x32) for
  CPU time;
- the MAML paper's conv-4 (``width`` channels, BatchNorm on per-task batch statistics, in
  training and at test), first-order meta-gradients, Adam in the outer loop;
- meta-train episode ``i * meta_batch + j`` of a seed is task ``j`` of meta-iteration ``i``;
  test episodes come from a sampler seeded ``10000 + seed``;
- 95% CI: ``1.96 * std / sqrt(n_episodes)`` over the test episodes of one cell (several seeds:
  over the pooled episodes; the spread over seeds is reported beside it).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dsbp.experiments import atomic

METHODS = ("maml", "spectral_maml")

# The core columns of every results.csv first (epochs: empty, episodic training counts
# meta_iters; wall_s: meta-training seconds; device: env.json's device_name), then few-shot's.
RESULT_COLUMNS = ("dataset", "model", "method", "seed", "epochs", "test_acc", "test_loss",
                  "wall_s", "device", "n_way", "k_shot", "ci95", "n_episodes", "train_s",
                  "test_s", "meta_iters", "rank", "status", "cell")
MODEL = "conv4"  # the model column of results.csv: conv4() below


@dataclass(frozen=True)
class FewshotConfig:
    """Settings of a ``dsbp fewshot`` sweep (defaults: the CPU-sized ones of
    ``scripts/ext_meta.py``).

    Attributes:
        datasets: data set names of ``dsbp.data.load_dataset``.
        methods: ``maml`` and / or ``spectral_maml``.
        n_way: N, classes per episode.
        shots: K values, support images per class.
        seeds: seeds (class split, initialisation, episodes).
        n_query: query images per class.
        width: conv-4 channels.
        meta_iters: outer (meta) iterations.
        meta_batch: tasks per meta-iteration.
        inner_steps: inner steps m in meta-training.
        test_inner_steps: inner steps at test.
        inner_lr: inner step size alpha.
        outer_lr: Adam learning rate of the outer loop (beta).
        test_episodes: test episodes per cell.
        rank: k of spectral MAML (per layer; k >= width is plain MAML).
        side: ``output`` or ``input`` (the activations the bases come from).
        device: ``cpu``, ``cuda``...
        data_root: folder with the data files (default: the data search).
    """

    datasets: tuple[str, ...] = ("bundled",)
    methods: tuple[str, ...] = METHODS
    n_way: int = 5
    shots: tuple[int, ...] = (1, 5)
    seeds: tuple[int, ...] = (0,)
    n_query: int = 10
    width: int = 32
    meta_iters: int = 100
    meta_batch: int = 4
    inner_steps: int = 3
    test_inner_steps: int = 5
    inner_lr: float = 0.1
    outer_lr: float = 1e-3
    test_episodes: int = 200
    rank: int = 10
    side: str = "output"
    device: str = "cpu"
    data_root: str | None = None

    def __post_init__(self) -> None:
        for name in ("datasets", "methods", "shots", "seeds"):
            v = getattr(self, name)
            object.__setattr__(self, name, tuple(v))
            if not v:
                raise ValueError(f"fewshot: {name} must not be empty")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"fewshot: unknown method(s) {bad}; expected some of {METHODS}")
        for name in ("n_way", "n_query", "width", "meta_batch", "test_episodes", "rank"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"fewshot: {name} must be a positive integer, got {v!r}")
        for name in ("meta_iters", "inner_steps", "test_inner_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"fewshot: {name} must be an integer >= 0, got {v!r}")
        if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.shots):
            raise ValueError(f"fewshot: shots must be positive integers, got {self.shots}")
        if self.side not in ("output", "input"):
            raise ValueError(f"fewshot: side must be 'output' or 'input', got {self.side!r}")
        if not self.inner_lr >= 0 or not self.outer_lr >= 0:
            raise ValueError("fewshot: inner_lr and outer_lr must be >= 0")

    def cell_settings(self) -> dict[str, Any]:
        """The settings a cell's result depends on besides its own keys (used for resume)."""
        skip = {"datasets", "methods", "shots", "seeds", "device"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


def conv4(in_channels: int, n_way: int, width: int, image_size: int) -> nn.Module:
    """The MAML paper's conv-4: 4 x [conv3x3 -> BN -> ReLU -> maxpool 2], then a Linear head.

    Input (B, in_channels, image_size, image_size); output logits (B, n_way).
    """
    layers: list[nn.Module] = []
    c, s = in_channels, image_size
    for _ in range(4):
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                   nn.MaxPool2d(2)]
        c, s = width, s // 2
    if s < 1:
        raise ValueError(f"conv-4 needs images of at least 16 pixels, got {image_size}")
    layers += [nn.Flatten(), nn.Linear(width * s * s, n_way)]
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class SplitData:
    """Meta-train / meta-test images (uint8 (N, C, H, W)), labels and disjoint class lists."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    train_classes: list[int]
    x_test: torch.Tensor
    y_test: torch.Tensor
    test_classes: list[int]
    mean: torch.Tensor
    std: torch.Tensor


def split_classes(ds: Any, seed: int) -> SplitData:
    """Disjoint meta-train / meta-test classes of an ``ImageDataset`` (see the module docstring).

    Raises:
        ValueError: a data set with fewer than 2 classes.
    """
    from dsbp.data.episodes import class_split

    x_tr, y_tr, x_te, y_te = ds.x_train, ds.y_train, ds.x_test, ds.y_test
    n_cls = len(ds.classes)
    if n_cls < 2:
        raise ValueError(f"{ds.name}: few-shot episodes need at least 2 classes, got {n_cls}")
    if n_cls > 10:  # e.g. the Tiny ImageNet subset: 70/30 split, 64x64 -> 32x32 [ours: CPU]
        if x_tr.shape[-1] >= 64:
            def pool(x: torch.Tensor) -> torch.Tensor:
                return F.avg_pool2d(x.float(), 2).round().to(torch.uint8)

            x_tr, x_te = pool(x_tr), pool(x_te)
        train_cls, test_cls = class_split(n_cls, (0.7, 0.3), seed=seed)
        # the meta-test classes use all their images: disjoint classes, so no leak
        x_te, y_te = torch.cat([x_tr, x_te]), torch.cat([y_tr, y_te])
    else:
        train_cls, test_cls = class_split(n_cls, (0.5, 0.5), seed=seed)
    return SplitData(x_tr, y_tr, list(train_cls), x_te, y_te, list(test_cls),
                     torch.tensor(ds.mean, dtype=torch.float32),
                     torch.tensor(ds.std, dtype=torch.float32))


def _task(ep: Any, mean: torch.Tensor, std: torch.Tensor, dev: torch.device) -> tuple:
    def norm(x: torch.Tensor) -> torch.Tensor:
        return ((x.float() / 255.0 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)).to(dev)

    return norm(ep.support_x), ep.support_y.to(dev), norm(ep.query_x), ep.query_y.to(dev)


def run_cell(cfg: FewshotConfig, data: SplitData, method: str, k_shot: int, seed: int,
             ) -> dict[str, Any]:
    """Meta-train one method on one (data set split, K, seed) and score it on test episodes.

    Returns:
        ``{"test_acc", "ci95", "episode_accs", "n_episodes", "train_s", "test_s",
        "meta_loss_first", "meta_loss_last"}``: mean query accuracy (fraction) over the test
        episodes after ``test_inner_steps`` inner steps on each episode's support set.
    """
    from dsbp.baselines.maml import MAML
    from dsbp.data.episodes import EpisodeSampler
    from dsbp.extensions.meta import SpectralMAML

    if method not in METHODS:
        raise ValueError(f"unknown few-shot method {method!r}; expected one of {METHODS}")
    dev = torch.device(cfg.device)
    torch.manual_seed(seed)  # the same initialisation for both methods
    model = conv4(int(data.x_train.shape[1]), cfg.n_way, cfg.width,
                  int(data.x_train.shape[-1])).to(dev)
    common: dict[str, Any] = {"inner_lr": cfg.inner_lr, "inner_steps": cfg.inner_steps,
                              "first_order": True}
    learner = (MAML(model, **common) if method == "maml" else
               SpectralMAML(model, rank=cfg.rank, side=cfg.side, seed=seed, **common))
    train_eps = EpisodeSampler(data.x_train, data.y_train, data.train_classes, cfg.n_way,
                               k_shot, cfg.n_query, seed=seed)
    test_eps = EpisodeSampler(data.x_test, data.y_test, data.test_classes, cfg.n_way, k_shot,
                              cfg.n_query, seed=10_000 + seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.outer_lr)
    model.train()  # BatchNorm on per-task batch statistics, in training and at test
    losses = []
    t0 = time.perf_counter()
    for it in range(cfg.meta_iters):
        tasks = [_task(e, data.mean, data.std, dev)
                 for e in train_eps.episodes(cfg.meta_batch, start=it * cfg.meta_batch)]
        opt.zero_grad()
        loss = learner.meta_loss(tasks)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    train_s = time.perf_counter() - t0
    learner.inner_steps = cfg.test_inner_steps
    t0 = time.perf_counter()
    scored = [learner.evaluate([_task(ep, data.mean, data.std, dev)])
              for ep in test_eps.episodes(cfg.test_episodes)]
    accs = [a for _, a in scored]
    test_s = time.perf_counter() - t0
    mean, ci = mean_ci95(accs)
    return {"test_acc": mean, "ci95": ci, "episode_accs": accs, "n_episodes": len(accs),
            "test_loss": statistics.fmean(loss for loss, _ in scored) if scored else None,
            "train_s": train_s, "test_s": test_s,
            "meta_loss_first": losses[0] if losses else None,
            "meta_loss_last": losses[-1] if losses else None}


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and 95% CI half-width ``1.96 * s / sqrt(n)`` (sample std; NaN for n < 2)."""
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, math.nan
    m = statistics.fmean(vals)
    if len(vals) < 2:
        return m, math.nan
    return m, 1.96 * statistics.stdev(vals) / math.sqrt(len(vals))


def cell_name(dataset: str, n_way: int, k_shot: int, method: str, seed: int) -> str:
    """``"<dataset>-<N>w<K>s-<method>-s<seed>"`` (``:`` of medmnist names becomes ``_``)."""
    return f"{dataset.replace(':', '_')}-{n_way}w{k_shot}s-{method}-s{seed}"


def fewshot(
    cfg: FewshotConfig,
    out: str | Path,
    *,
    command: str | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
    loader: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Run every (data set, K, seed, method) cell of ``cfg`` into ``out``; write the tables.

    Args:
        cfg: the settings.
        out: output folder (created).
        command: the command line, recorded in ``config.json``.
        resume: keep cells whose ``runs/<cell>.json`` has the same settings; without it an
            output folder that already holds cells is an error.
        log: one line per cell.
        loader: ``loader(name) -> ImageDataset`` (default ``dsbp.data.load_dataset`` with
            ``cfg.data_root``).

    Returns:
        ``{"cells": [cell dicts], "csv": path, "report": path}``.

    Raises:
        FileExistsError: ``out/runs`` holds cells and ``resume`` is False, or another process
            holds ``out/.lock`` (nothing is written).
        ValueError: ``resume`` and some kept cells were made with other settings (every such
            cell and its differing settings are named; nothing is written).
    """
    out = Path(out)
    _fewshot_preflight(cfg, out / "runs", resume)  # a refusal leaves no trace
    with atomic.FolderLock(out, "dsbp fewshot"):
        return _fewshot_locked(cfg, out, command=command, resume=resume, log=log,
                               loader=loader)


def _fewshot_preflight(cfg: FewshotConfig, runs: Path, resume: bool) -> dict[str, str]:
    """Refuse before writing (see :func:`fewshot`); ``{cell: why}`` of unreadable cells, which
    are named and left as they are."""
    if not resume and runs.exists() and any(runs.iterdir()):
        raise FileExistsError(f"{runs} already holds cells; pass --resume or choose another "
                              "--out")
    settings = cfg.cell_settings()
    refused: dict[str, str] = {}
    differ = []
    for name in cfg.datasets:
        for seed in cfg.seeds:
            for k in cfg.shots:
                for method in cfg.methods:
                    cname = cell_name(name, cfg.n_way, k, method, seed)
                    path = runs / f"{cname}.json"
                    if not path.exists():
                        continue
                    try:
                        prev = atomic.read_json(path)
                    except atomic.CorruptFileError as err:
                        refused[cname] = str(err)
                        continue
                    old = prev.get("settings") or {} if isinstance(prev, dict) else {}
                    keys = sorted(k2 for k2 in set(old) | set(settings)
                                  if old.get(k2) != settings.get(k2))
                    if keys:
                        differ.append(f"  {cname}: " + "; ".join(
                            f"{k2}: saved {old.get(k2)!r}, requested {settings.get(k2)!r}"
                            for k2 in keys))
    if differ:
        raise ValueError(f"cannot resume {runs.parent}: {len(differ)} cell(s) were made with "
                         "other settings (nothing was written):\n" + "\n".join(differ))
    return refused


def _fewshot_locked(cfg: FewshotConfig, out: Path, *, command: str | None, resume: bool,
                    log: Callable[[str], None], loader: Callable[[str], Any] | None
                    ) -> dict[str, Any]:
    from dsbp.experiments.run import environment

    runs = out / "runs"
    refused = _fewshot_preflight(cfg, runs, resume)
    runs.mkdir(parents=True, exist_ok=True)
    if resume:
        atomic.remove_orphans(out)
        atomic.remove_orphans(runs)
    if loader is None:
        from dsbp.data import load_dataset

        def loader(name: str) -> Any:
            return load_dataset(name, root=cfg.data_root)

    if not (resume and (out / "config.json").exists()):  # a resume keeps the first record
        atomic.write_json(out / "config.json", {"command": command, **dataclasses.asdict(cfg)})
        atomic.write_json(out / "env.json", environment(torch.device(cfg.device)))
    settings = cfg.cell_settings()
    cells = []
    for name in cfg.datasets:
        ds = loader(name)
        for seed in cfg.seeds:
            data = split_classes(ds, seed)
            for k in cfg.shots:
                for method in cfg.methods:
                    cname = cell_name(name, cfg.n_way, k, method, seed)
                    path = runs / f"{cname}.json"
                    if cname in refused:  # unreadable: named, left as it is
                        log(f"{cname}: not run, left as it is: {refused[cname]}")
                        continue
                    if resume and path.exists():  # same settings (checked above)
                        cells.append(atomic.read_json(path))
                        continue
                    res = run_cell(cfg, data, method, k, seed)
                    cell = {"cell": cname, "dataset": name, "method": method,
                            "n_way": cfg.n_way, "k_shot": k, "seed": seed, "status": "ok",
                            "train_classes": data.train_classes,
                            "test_classes": data.test_classes, "settings": settings, **res}
                    atomic.write_json(path, cell)
                    cells.append(cell)
                    log(f"{cname}: acc {100 * res['test_acc']:.2f}% ± "
                        f"{100 * res['ci95']:.2f} (95% CI, {res['n_episodes']} episodes), "
                        f"train {res['train_s']:.1f} s")
    made = finish_fewshot(out)
    return {"cells": cells, **made}


def _read_cells(out: Path, problems: list[str] | None = None) -> list[dict[str, Any]]:
    """The readable cells of ``out/runs``; unreadable ones are named in ``problems``."""
    cells = []
    for p in sorted((out / "runs").glob("*.json")):
        try:
            cells.append(atomic.read_json(p))
        except atomic.CorruptFileError as err:
            if problems is not None:
                problems.append(str(err))
    return cells


def finish_fewshot(out: str | Path) -> dict[str, Path]:
    """(Re)make ``results.csv`` and ``report.md`` of ``out`` from ``out/runs/*.json``."""
    out = Path(out)
    problems: list[str] = []
    cells = _read_cells(out, problems)
    env = json.loads((out / "env.json").read_text()) if (out / "env.json").exists() else {}
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(RESULT_COLUMNS), extrasaction="ignore",
                       lineterminator="\n")
    w.writeheader()
    for c in cells:
        w.writerow({**c, "model": MODEL, "epochs": "", "wall_s": c.get("train_s"),
                    "device": env.get("device_name", ""), "meta_iters": c["settings"]["meta_iters"],
                    "rank": c["settings"]["rank"] if c["method"] == "spectral_maml" else ""})
    atomic.write_text(out / "results.csv", buf.getvalue())
    lines = report_lines(out, cells)
    if problems:
        lines += ["", "Unreadable, left out:", "", *[f"- {p}" for p in problems]]
    atomic.write_text(out / "report.md", "\n".join(lines) + "\n")
    return {"csv": out / "results.csv", "report": out / "report.md"}


def report_lines(out: Path, cells: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown of ``report.md``: one line per (data set, N, K), MAML beside spectral MAML."""
    cfg = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
    env = json.loads((out / "env.json").read_text()) if (out / "env.json").exists() else {}
    lines = ["# Few-shot: spectral MAML vs MAML (METHOD.md §2.3)", ""]
    if cfg.get("command"):
        lines += [f"Command: `{cfg['command']}`", ""]
    lines += [
        f"Environment: {env.get('device_name', '?')}, torch {env.get('torch', '?')}, "
        f"{env.get('torch_threads', '?')} thread(s), commit {env.get('commit', '?')}"
        f"{' (dirty)' if env.get('dirty') else ''}, {env.get('time_utc', '?')}.", "",
        f"conv-4 (width {cfg.get('width', '?')}), first-order MAML, Adam outer lr "
        f"{cfg.get('outer_lr', '?')}, {cfg.get('meta_iters', '?')} meta-iterations x "
        f"{cfg.get('meta_batch', '?')} tasks, inner lr {cfg.get('inner_lr', '?')}, "
        f"{cfg.get('inner_steps', '?')} inner steps in training and "
        f"{cfg.get('test_inner_steps', '?')} at test, {cfg.get('n_query', '?')} query images "
        f"per class; spectral MAML: rank {cfg.get('rank', '?')}, {cfg.get('side', '?')} side, "
        "bases from each task's support set. Test episodes come from classes held out of "
        "meta-training. Accuracy: mean query accuracy (%) over the test episodes, ± the 95% "
        "CI half-width 1.96 s / sqrt(n) over the pooled episodes of all seeds; 'seed std' is "
        "the sample std of the per-seed means. Protocol [ours]: see `dsbp.experiments.fewshot`.",
        "",
    ]
    header = ["data set", "N-way K-shot", "seeds", "test episodes", "MAML acc (%)",
              "spectral MAML acc (%)", "seed std (MAML / spectral)",
              "meta-train s (MAML / spectral)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    groups: dict[tuple, dict[str, list[dict[str, Any]]]] = {}
    for c in cells:
        groups.setdefault((c["dataset"], c["n_way"], c["k_shot"]), {}).setdefault(
            c["method"], []).append(c)

    def acc(g: list[dict[str, Any]] | None) -> str:
        if not g:
            return "n/a"
        m, ci = mean_ci95([a for c in g for a in c["episode_accs"]])
        return f"{100 * m:.2f}" + (f" ± {100 * ci:.2f}" if not math.isnan(ci) else "")

    def spread(g: list[dict[str, Any]] | None) -> str:
        if not g or len(g) < 2:
            return "n/a"
        return f"{100 * statistics.stdev([c['test_acc'] for c in g]):.2f}"

    def secs(g: list[dict[str, Any]] | None) -> str:
        return "n/a" if not g else f"{statistics.fmean([c['train_s'] for c in g]):.1f}"

    for key in sorted(groups):
        g = groups[key]
        m, s = g.get("maml"), g.get("spectral_maml")
        any_g = m or s or []
        lines.append("| " + " | ".join([
            key[0], f"{key[1]}-way {key[2]}-shot", str(len({c['seed'] for c in any_g})),
            str(sum(c["n_episodes"] for c in any_g)),
            acc(m), acc(s), f"{spread(m)} / {spread(s)}", f"{secs(m)} / {secs(s)}"]) + " |")
    return lines


__all__ = ["METHODS", "MODEL", "RESULT_COLUMNS", "FewshotConfig", "cell_name", "conv4",
           "fewshot", "finish_fewshot", "mean_ci95", "run_cell", "split_classes"]
