"""``dsbp table``: the paper's comparison table in one command.

Rows are the paper's four data sets (CIFAR-10, Fashion-MNIST, MedMNIST, Tiny ImageNet); columns
are SGD, SAM, LoRA, MAML, DSBP at the paper's settings, DSBP at the recommended configuration
(README, "Recommended configuration") and the paper's claim::

    dsbp table --variant cpu --out runs/table_cpu      # SmallCNN, subsets: ~1 h on 2 CPU cores
    dsbp table --variant gpu --out runs/table_gpu      # ResNet-18, full data sets (--estimate)
    dsbp report runs/table_cpu                         # remake tables and plots from the files

Three protocols feed the columns, each into its own sub-folder of ``out``:

- ``supervised/`` (a ``dsbp bench`` folder): SGD, SAM, DSBP (paper settings) and DSBP
  (recommended) trained from scratch on the data set.
- ``transfer/`` (a ``dsbp bench`` folder): a network is pretrained with SGD on a **source task**
  (the other half of the classes; for MedMNIST, which has two classes, Fashion-MNIST), then
  fine-tuned on the **target task** from that one checkpoint with LoRA (peft), full fine-tuning
  and DSBP (``dsbp.experiments.methods_finetune``). The LoRA column is LoRA's accuracy on
  the target task.
- ``maml/`` (a ``dsbp fewshot`` folder): MAML meta-trained on N-way K-shot episodes of the data
  set's classes and scored on episodes of held-out classes (MedMNIST: the same two classes,
  test-split images). The MAML column is the mean query accuracy over the test episodes.

``out/table.json`` records the variant, the command and the environment; ``out/results.csv``
has one row per run or cell of the three protocols with the core columns of every results.csv
(dataset, model, method, seed, epochs, test_acc, test_loss, wall_s, device) and
``out/report.md`` the table beside the paper's column, every gap stated and every protocol
choice marked [ours]. :func:`finish_table` remakes all of it from the run files alone (no
checkpoints needed), which is what ``dsbp report OUT`` does on a table folder.

Data set names inside a table may carry suffixes (:func:`task_name`): ``cifar10@c5-9`` is
CIFAR-10 restricted to classes 5..9 (relabelled 0..4), ``tiny_imagenet@32px`` is Tiny ImageNet
average-pooled to 32 x 32.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dsbp.experiments import atomic
from dsbp.experiments.config import PAPER_DSBP_KWARGS, RunConfig
from dsbp.experiments.report import PAPER_CLAIMED_ACC, mean_std

SUPERVISED_METHODS = ("sgd", "sam", "dsbp", "dsbp_tuned")
# what run_table can run; "ablation" (k, p; then pruning) is not in the default set
PROTOCOLS = ("supervised", "transfer", "fewshot", "ablation")
FINETUNE_METHODS = ("ft_lora", "ft_sgd", "ft_dsbp", "ft_dsbp_tuned")
CORE_COLUMNS = ("dataset", "model", "method", "seed", "epochs", "test_acc", "test_loss",
                "wall_s", "device")
TABLE_COLUMNS = (*CORE_COLUMNS, "row", "column", "protocol", "task", "n_way", "k_shot",
                 "ci95", "n_episodes", "rank", "interval", "tau", "params", "params_original",
                 "acc_before_finetune", "acc_original", "acc_control", "status", "run")
# Table columns in the paper's order, with the (protocol, method) that fills each.
COLUMNS = (("SGD", "supervised", "sgd"), ("SAM", "supervised", "sam"),
           ("LoRA", "transfer", "ft_lora"), ("MAML", "fewshot", "maml"),
           ("DSBP (paper settings)", "supervised", "dsbp"),
           ("DSBP (recommended)", "supervised", "dsbp_tuned"))
ROW_NAMES = {"cifar10": "CIFAR-10", "fashion_mnist": "Fashion-MNIST",
             "medmnist:breastmnist": "MedMNIST", "tiny_imagenet": "Tiny ImageNet"}


# ------------------------------------------------------------------------------ task names
def task_name(dataset: str, classes: tuple[int, int] | None = None,
              size: int | None = None) -> str:
    """``dataset`` with the table's suffixes: ``@<size>px`` (average-pooled to size x size)
    and ``@c<lo>-<hi>`` (classes lo..hi only, inclusive, relabelled from 0)."""
    name = dataset
    if size is not None:
        name += f"@{size}px"
    if classes is not None:
        name += f"@c{classes[0]}-{classes[1]}"
    return name


def parse_task(name: str) -> tuple[str, tuple[int, int] | None, int | None]:
    """Inverse of :func:`task_name`: ``(dataset, classes or None, size or None)``.

    Raises:
        ValueError: a suffix that is neither ``<N>px`` nor ``c<lo>-<hi>``.
    """
    base, *suffixes = name.split("@")
    classes: tuple[int, int] | None = None
    size: int | None = None
    for s in suffixes:
        try:
            if s.endswith("px"):
                size = int(s[:-2])
            elif s.startswith("c") and "-" in s:
                lo, hi = s[1:].split("-", 1)
                classes = (int(lo), int(hi))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"task {name!r}: suffix {s!r} is neither <N>px nor c<lo>-<hi>"
                             ) from None
    return base, classes, size


def _pool(x: torch.Tensor, size: int) -> torch.Tensor:
    f = x.shape[-1] // size
    if f < 1 or x.shape[-1] != f * size:
        raise ValueError(f"cannot average-pool {x.shape[-1]}-pixel images to {size} pixels")
    return x if f == 1 else F.avg_pool2d(x.float(), f).round().to(torch.uint8)


def derive_task(ds: Any, name: str) -> Any:
    """The ``ImageDataset`` a task name describes, from the loaded base data set ``ds``.

    Pooling keeps the base data set's mean and std (pooling preserves the mean; the std it
    changes slightly) [ours]; a class range keeps them too, so source and target tasks of one
    data set are normalised alike.
    """
    from dsbp.data.dataset import ImageDataset

    _, classes, size = parse_task(name)
    x_tr, y_tr, x_te, y_te = ds.x_train, ds.y_train, ds.x_test, ds.y_test
    names = list(ds.classes)
    if size is not None:
        x_tr, x_te = _pool(x_tr, size), _pool(x_te, size)
    if classes is not None:
        lo, hi = classes
        if not 0 <= lo <= hi < len(names):
            raise ValueError(f"task {name!r}: classes {lo}-{hi} outside 0-{len(names) - 1}")
        keep_tr, keep_te = (y_tr >= lo) & (y_tr <= hi), (y_te >= lo) & (y_te <= hi)
        x_tr, y_tr = x_tr[keep_tr], y_tr[keep_tr] - lo
        x_te, y_te = x_te[keep_te], y_te[keep_te] - lo
        names = names[lo:hi + 1]
    return ImageDataset(name=name, x_train=x_tr.contiguous(), y_train=y_tr.contiguous(),
                        x_test=x_te.contiguous(), y_test=y_te.contiguous(), classes=names,
                        mean=tuple(ds.mean), std=tuple(ds.std),
                        source=f"{ds.source} [{name}]")


class TaskLoader:
    """``loader(cfg) -> ImageDataset`` for table task names; each base data set loads once."""

    def __init__(self, data_root: str | None = None) -> None:
        self.data_root = data_root
        self._base: dict[tuple[str, str | None], Any] = {}

    def base(self, dataset: str, root: str | None) -> Any:
        from dsbp.data import load_dataset

        key = (dataset, root or self.data_root)
        if key not in self._base:
            self._base[key] = load_dataset(dataset, root=key[1])
        return self._base[key]

    def task(self, name: str, root: str | None = None) -> Any:
        """The data set of task ``name``."""
        base, _, _ = parse_task(name)
        return derive_task(self.base(base, root), name)

    def __call__(self, cfg: RunConfig) -> Any:
        return self.task(cfg.dataset, cfg.data_root)


# ------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class RowPlan:
    """One row (data set) of the table: its sizes and its transfer and few-shot protocols.

    Attributes:
        dataset: registry name (``cifar10``, ``fashion_mnist``, ``medmnist:breastmnist``,
            ``tiny_imagenet``).
        epochs: training epochs (supervised, pretraining and fine-tuning alike).
        subset: class-balanced training subset (None: the whole training split).
        eval_subset: class-balanced test subset (None: the whole test split).
        size: average-pool images to size x size (None: native size).
        source: the transfer source task (a task name, see :func:`task_name`).
        target: the transfer target task.
        source_epochs: pretraining epochs (None: ``epochs``).
        source_subset: pretraining subset (None: ``subset``).
        n_way: classes per few-shot episode.
        fewshot_same_classes: episodes of the few-shot test come from the same classes as
            meta-training (test-split images): for data sets with fewer than 2 N classes.
    """

    dataset: str
    epochs: int
    subset: int | None
    eval_subset: int | None
    size: int | None
    source: str
    target: str
    source_epochs: int | None = None
    source_subset: int | None = None
    n_way: int = 5
    fewshot_same_classes: bool = False

    @property
    def task(self) -> str:
        """The supervised task name (the data set, pooled if ``size``)."""
        return task_name(self.dataset, size=self.size)


@dataclass(frozen=True)
class TableSpec:
    """A variant of the table: one base config, one plan per row, seeds, few-shot settings.

    Attributes:
        name: ``cpu`` or ``gpu``.
        rows: the data sets.
        seeds: number of seeds (0..seeds-1).
        base: settings shared by every supervised, pretraining and fine-tuning run.
        paper_dsbp: DSBP's paper settings (k, p, beta, power iterations).
        recommended: the recommended configuration's settings, without ``warmup`` (one epoch
            of steps per row, see :func:`warmup_steps`).
        sam_rho: SAM's rho.
        lora_rank: LoRA's rank r (= k).
        fewshot: ``FewshotConfig`` fields (``n_way``, ``datasets`` and ``seeds`` are set per row).
        k_shot: K of the MAML column.
        threads: torch CPU threads (None: torch's default).
        note: what the variant is, one line.
        ablate_rank, ablate_interval: the paper's k and p ablations: DSBP at the paper's
            settings with k swept at the paper's p, and p swept at the paper's k.
        ablate_seeds: seeds of the ablations (0..n-1).
        prune_taus: energy thresholds of the pruning ablation (``dsbp.experiments.prune``,
            factorise mode, one fine-tuning epoch) on seed 0's SGD and DSBP supervised runs.
    """

    name: str
    rows: tuple[RowPlan, ...]
    seeds: int
    base: RunConfig
    paper_dsbp: Mapping[str, Any] = field(default_factory=lambda: dict(PAPER_DSBP_KWARGS))
    recommended: Mapping[str, Any] = field(default_factory=lambda: {
        "rank": 10, "interval": 20, "sharpness": 0.1, "power_iters": 5, "residual": 0.5})
    sam_rho: float = 0.05
    lora_rank: int = 10
    fewshot: Mapping[str, Any] = field(default_factory=dict)
    k_shot: int = 5
    threads: int | None = None
    note: str = ""
    ablate_rank: tuple[int, ...] = (2, 5, 10, 20)
    ablate_interval: tuple[int, ...] = (10, 100, 1000)
    ablate_seeds: int = 1
    prune_taus: tuple[float, ...] = (0.9, 0.99)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (saved in ``table.json``)."""
        d = dataclasses.asdict(self)
        d["base"] = self.base.to_dict()
        return d


def _cpu_rows() -> tuple[RowPlan, ...]:
    return (
        RowPlan("cifar10", epochs=5, subset=4000, eval_subset=2000, size=None,
                source=task_name("cifar10", (0, 4)), target=task_name("cifar10", (5, 9))),
        RowPlan("fashion_mnist", epochs=5, subset=4000, eval_subset=2000, size=None,
                source=task_name("fashion_mnist", (0, 4)),
                target=task_name("fashion_mnist", (5, 9))),
        # 546 training images: 30 epochs give about as many steps as the other rows' 5.
        RowPlan("medmnist:breastmnist", epochs=30, subset=None, eval_subset=None, size=None,
                source="fashion_mnist", target="medmnist:breastmnist", source_epochs=5,
                source_subset=4000, n_way=2, fewshot_same_classes=True),
        RowPlan("tiny_imagenet", epochs=5, subset=None, eval_subset=None, size=32,
                source=task_name("tiny_imagenet", (0, 99), 32),
                target=task_name("tiny_imagenet", (100, 199), 32)),
    )


def _gpu_rows() -> tuple[RowPlan, ...]:
    return (
        RowPlan("cifar10", epochs=30, subset=None, eval_subset=None, size=None,
                source=task_name("cifar10", (0, 4)), target=task_name("cifar10", (5, 9))),
        RowPlan("fashion_mnist", epochs=30, subset=None, eval_subset=None, size=None,
                source=task_name("fashion_mnist", (0, 4)),
                target=task_name("fashion_mnist", (5, 9))),
        RowPlan("medmnist:breastmnist", epochs=100, subset=None, eval_subset=None, size=None,
                source="fashion_mnist", target="medmnist:breastmnist", source_epochs=30,
                n_way=2, fewshot_same_classes=True),
        RowPlan("tiny_imagenet", epochs=30, subset=None, eval_subset=None, size=None,
                source=task_name("tiny_imagenet", (0, 99)),
                target=task_name("tiny_imagenet", (100, 199))),
    )


VARIANTS: dict[str, TableSpec] = {
    "cpu": TableSpec(
        name="cpu", rows=_cpu_rows(), seeds=3,
        # [ours] SmallCNN width 16, 1 thread, subsets: the whole table (3 seeds) in about an
        # hour on 2 shared CPU cores. lr 0.01 is the paper's eta, used by every method.
        base=RunConfig(model="cnn", model_kwargs={"width": 16}, batch_size=128, lr=0.01,
                       momentum=0.9, weight_decay=5e-4, schedule="cosine", warmup_frac=0.05,
                       augment=False, log_every=10, checkpoint_every=0, device="cpu"),
        fewshot={"width": 32, "meta_iters": 100, "meta_batch": 4, "inner_steps": 3,
                 "test_inner_steps": 5, "inner_lr": 0.1, "outer_lr": 1e-3, "n_query": 10,
                 "test_episodes": 200},
        threads=1, ablate_seeds=3,
        note="CPU scale [ours]: SmallCNN (width 16), class-balanced subsets (4000 training "
        "images; Tiny ImageNet subset pooled to 32 px), 5 epochs (BreastMNIST 30): not the "
        "paper's setting",
    ),
    "gpu": TableSpec(
        name="gpu", rows=_gpu_rows(), seeds=3,
        # The `paper` preset's settings (config.py): ResNet-18, eta = 0.01, 30 epochs [ours],
        # batch 128, cosine, 5% warm-up, crop + flip.
        base=RunConfig(model="resnet18", batch_size=128, lr=0.01, momentum=0.9,
                       weight_decay=5e-4, schedule="cosine", warmup_frac=0.05, augment=True,
                       amp="bf16", log_every=50, checkpoint_every=500, device="auto"),
        fewshot={"width": 64, "meta_iters": 2000, "meta_batch": 4, "inner_steps": 5,
                 "test_inner_steps": 10, "inner_lr": 0.01, "outer_lr": 1e-3, "n_query": 15,
                 "test_episodes": 600},
        note="GPU: ResNet-18, full data sets (Tiny ImageNet: the full set when present, else "
        "the shared 6000-image subset), 30 epochs, the paper preset's settings",
    ),
}


def get_variant(name: str) -> TableSpec:
    """The variant called ``name``; ``ValueError`` lists the known ones otherwise."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown table variant {name!r}; known: {sorted(VARIANTS)}") from None


def train_size(loader: TaskLoader, task: str, subset: int | None) -> int:
    """Training examples of ``task`` after ``subset``."""
    n = int(loader.task(task).y_train.shape[0])
    return n if subset is None else min(n, subset)


def warmup_steps(n_train: int, batch_size: int) -> int:
    """The recommended configuration's warm-up: one epoch of optimizer steps (README: "scale
    it to about one epoch of your run"; 100 steps on the GPU runs it was chosen on)."""
    return max(1, math.ceil(n_train / batch_size))


def _row_cfg(spec: TableSpec, row: RowPlan, task: str, method: str, seed: int, *,
             epochs: int | None = None, subset: int | None | str = "row",
             eval_subset: int | None | str = "row", **method_kwargs: Any) -> RunConfig:
    kw = {**dict(spec.base.method_kwargs), **method_kwargs}
    return spec.base.replace(
        dataset=task, method=method, seed=seed, epochs=epochs or row.epochs,
        subset=row.subset if subset == "row" else subset,
        eval_subset=row.eval_subset if eval_subset == "row" else eval_subset,
        method_kwargs=kw)


def supervised_runs(spec: TableSpec, loader: TaskLoader,
                    datasets: Sequence[str] | None = None) -> list[Any]:
    """The ``supervised/`` grid: every row x SGD, SAM, DSBP (paper), DSBP (recommended) x seed."""
    from dsbp.experiments.sweep import GridRun

    runs = []
    for row in _rows(spec, datasets):
        warm = warmup_steps(train_size(loader, row.task, row.subset), spec.base.batch_size)
        per_method = {"sgd": {}, "sam": {"rho": spec.sam_rho}, "dsbp": dict(spec.paper_dsbp),
                      "dsbp_tuned": {**spec.recommended, "warmup": warm}}
        for method in SUPERVISED_METHODS:
            for seed in range(spec.seeds):
                runs.append(GridRun(_row_cfg(spec, row, row.task, method, seed,
                                             **per_method[method]), ()))
    return runs


def transfer_runs(spec: TableSpec, loader: TaskLoader, out: Path,
                  datasets: Sequence[str] | None = None) -> list[Any]:
    """The ``transfer/`` grid: per row and seed, the pretraining run on the source task, then
    the four fine-tuning runs on the target task from its final checkpoint."""
    from dsbp.experiments.sweep import GridRun

    runs = []
    for row in _rows(spec, datasets):
        src_subset = row.source_subset if row.source_subset is not None else row.subset
        src_epochs = row.source_epochs or row.epochs
        warm = warmup_steps(train_size(loader, row.target, row.subset), spec.base.batch_size)
        ft_kwargs = {"ft_lora": {"rank": spec.lora_rank}, "ft_sgd": {},
                     "ft_dsbp": dict(spec.paper_dsbp),
                     "ft_dsbp_tuned": {**spec.recommended, "warmup": warm}}
        # the target test split holds about half the row's test images
        ev = None if row.eval_subset is None else row.eval_subset // 2
        for seed in range(spec.seeds):
            pre = GridRun(_row_cfg(spec, row, row.source, "sgd", seed, epochs=src_epochs,
                                   subset=src_subset, eval_subset=ev), ())
            runs.append(pre)
            init = str(out / "transfer" / "runs" / pre.name / "checkpoint.pt")
            for method in FINETUNE_METHODS:
                runs.append(GridRun(_row_cfg(spec, row, row.target, method, seed,
                                             eval_subset=ev, init=init, **ft_kwargs[method]),
                                    ()))
    return runs


def _rows(spec: TableSpec, datasets: Sequence[str] | None) -> list[RowPlan]:
    if not datasets:
        return list(spec.rows)
    known = {r.dataset: r for r in spec.rows}
    bad = [d for d in datasets if d not in known]
    if bad:
        raise ValueError(f"table rows are {sorted(known)}; unknown: {bad}")
    return [known[d] for d in datasets]


def ablation_runs(spec: TableSpec, loader: TaskLoader,
                  datasets: Sequence[str] | None = None) -> list[Any]:
    """The ``ablation/`` grid: DSBP at the paper's settings with k swept at the paper's p and
    p swept at the paper's k (the paper's k and p ablations), per row and ablation seed."""
    from dsbp.experiments.sweep import GridRun

    k0, p0 = int(spec.paper_dsbp["rank"]), int(spec.paper_dsbp["interval"])
    # (k0, p0) itself is the supervised DSBP (paper settings) run of the same seed
    points = [(k, p0) for k in spec.ablate_rank if k != k0] + [
        (k0, p) for p in spec.ablate_interval if p != p0]
    runs = []
    for row in _rows(spec, datasets):
        for k, p in points:
            for seed in range(spec.ablate_seeds):
                cfg = _row_cfg(spec, row, row.task, "dsbp", seed,
                               **{**spec.paper_dsbp, "rank": k, "interval": p})
                runs.append(GridRun(cfg, ("rank", "interval")))
    return runs


def prune_supervised(spec: TableSpec, loader: TaskLoader, out: Path, rows: Sequence[RowPlan],
                     *, log: Callable[[str], None]) -> None:
    """The pruning ablation: factorise seed 0's SGD, DSBP and recommended-DSBP supervised
    models at ``spec.prune_taus`` and fine-tune one epoch (``prune.json`` in each run)."""
    from dsbp.experiments.prune import prune_run
    from dsbp.experiments.run import load_config

    for row in rows:
        for method in ("sgd", "dsbp", "dsbp_tuned"):
            found = [r for r in supervised_runs(spec, loader, [row.dataset])
                     if r.cfg.method == method and r.cfg.seed == 0]
            rdir = out / "supervised" / "runs" / found[0].name
            if (rdir / "prune.json").exists():
                continue
            if not (rdir / "checkpoint.pt").exists():
                log(f"pruning: {rdir.name} has no checkpoint (run the supervised protocol first)")
                continue
            prune_run(rdir, spec.prune_taus, "factorise", 1,
                      dataset=loader(load_config(rdir)), log=log)


# --------------------------------------------------------------------------------- few-shot
def fewshot_split(ds: Any, row: RowPlan, seed: int) -> Any:
    """Meta-train / meta-test data of a row: held-out classes (``fewshot.split_classes``), or
    for a row with ``fewshot_same_classes`` every class in both, meta-training on the training
    split and testing on the test split. [ours]"""
    from dsbp.experiments.fewshot import SplitData, split_classes

    if not row.fewshot_same_classes:
        return split_classes(ds, seed)
    cls = list(range(len(ds.classes)))
    return SplitData(ds.x_train, ds.y_train, cls, ds.x_test, ds.y_test, cls,
                     torch.tensor(ds.mean, dtype=torch.float32),
                     torch.tensor(ds.std, dtype=torch.float32))


def run_fewshot(spec: TableSpec, loader: TaskLoader, out: Path, rows: Sequence[RowPlan], *,
                resume: bool, log: Callable[[str], None], command: str | None) -> None:
    """The ``maml/`` folder: one MAML cell per row and seed (``dsbp fewshot``'s layout)."""
    from dsbp.experiments.fewshot import FewshotConfig, cell_name, finish_fewshot, run_cell
    from dsbp.experiments.hostinfo import compute_info
    from dsbp.experiments.run import environment

    fdir = out / "maml"
    (fdir / "runs").mkdir(parents=True, exist_ok=True)
    seeds = tuple(range(spec.seeds))
    device = str(spec.base.device if spec.base.device != "auto" else
                 ("cuda" if torch.cuda.is_available() else "cpu"))
    common = FewshotConfig(datasets=tuple(r.dataset for r in rows), methods=("maml",),
                           shots=(spec.k_shot,), seeds=seeds, device=device, **spec.fewshot)
    atomic.write_json(fdir / "config.json", {
        "command": command, **dataclasses.asdict(common),
        "n_way_per_dataset": {r.dataset: r.n_way for r in rows},
        "same_classes": [r.dataset for r in rows if r.fewshot_same_classes]})
    atomic.write_json(fdir / "env.json", {**environment(torch.device(device)), **compute_info()})
    for seed in seeds:  # seed-major, as the training grids
        for row in rows:
            cfg = dataclasses.replace(common, datasets=(row.dataset,), n_way=row.n_way)
            ds = loader.base(row.dataset, None)
            settings = cfg.cell_settings()
            name = cell_name(row.dataset, row.n_way, spec.k_shot, "maml", seed)
            path = fdir / "runs" / f"{name}.json"
            if resume and path.exists() and json.loads(path.read_text()).get(
                    "settings") == settings:
                continue
            data = fewshot_split(ds, row, seed)
            res = run_cell(cfg, data, "maml", spec.k_shot, seed)
            atomic.write_json(path, {
                "cell": name, "dataset": row.dataset, "method": "maml", "n_way": row.n_way,
                "k_shot": spec.k_shot, "seed": seed, "status": "ok",
                "train_classes": data.train_classes, "test_classes": data.test_classes,
                "settings": settings, **res})
            log(f"{name}: acc {100 * res['test_acc']:.2f}% ± {100 * res['ci95']:.2f} "
                f"(95% CI, {res['n_episodes']} episodes), train {res['train_s']:.1f} s")
    finish_fewshot(fdir)


# ------------------------------------------------------------------------------- the driver
def run_table(
    spec: TableSpec,
    out: str | Path,
    *,
    resume: bool = False,
    datasets: Sequence[str] | None = None,
    protocols: Sequence[str] = ("supervised", "transfer", "fewshot"),
    progress: bool = True,
    log: Callable[[str], None] = print,
    command: str | None = None,
    data_root: str | None = None,
) -> dict[str, Path]:
    """Run the table ``spec`` into ``out`` and write its results.csv, report.md and plot.

    Args:
        spec: the variant (see :data:`VARIANTS`).
        out: output folder.
        resume: continue an interrupted table (finished runs and cells are kept).
        datasets: a subset of the rows (default all).
        protocols: which of ``supervised``, ``transfer``, ``fewshot`` to run.
        progress: tqdm bars per run.
        log: one line per finished run.
        command: the command line, recorded in ``table.json``.
        data_root: folder with the data files (default: the data search).

    Raises:
        FileExistsError: ``out`` holds a table and ``resume`` is False.
    """
    from dsbp.experiments.build import resolve_device
    from dsbp.experiments.hostinfo import compute_info
    from dsbp.experiments.run import environment
    from dsbp.experiments.sweep import run_grid

    out = Path(out)
    if not resume and (out / "table.json").exists():
        raise FileExistsError(f"{out} already holds a table; pass --resume or choose another "
                              "--out")
    bad = sorted(set(protocols) - set(PROTOCOLS))
    if bad:
        raise ValueError(f"unknown protocol(s) {bad}; choose from {', '.join(PROTOCOLS)}")
    if data_root is not None:
        spec = dataclasses.replace(spec, base=spec.base.replace(data_root=data_root))
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    out.mkdir(parents=True, exist_ok=True)
    loader = TaskLoader(data_root)
    rows = _rows(spec, datasets)
    env = {**environment(resolve_device(spec.base.device)), **compute_info()}
    sources = {d: str(loader.base(d, None).source)
               for d in sorted({parse_task(t)[0] for r in rows for t in (r.task, r.source)})}
    info = {"command": command, "variant": spec.name, "spec": spec.to_dict(),
            "datasets": [r.dataset for r in rows], "protocols": list(protocols), "env": env,
            "sources": sources}
    if not (resume and (out / "table.json").exists()):
        atomic.write_json(out / "table.json", info)
    else:  # keep the first record; add settings this version knows and it lacks
        first = json.loads((out / "table.json").read_text())
        first["spec"] = {**spec.to_dict(), **first.get("spec", {})}
        atomic.write_json(out / "table.json", first)
    t0 = time.perf_counter()
    for proto in ("supervised", "transfer", "ablation"):
        if proto not in protocols:
            continue
        sub = out / proto
        runs = (supervised_runs(spec, loader, datasets) if proto == "supervised"
                else transfer_runs(spec, loader, out, datasets) if proto == "transfer"
                else ablation_runs(spec, loader, datasets))
        meta = {"command": command, "preset": f"table_{spec.name}",
                "label": f"{spec.note}; {proto} protocol of the comparison table",
                "env": env, "seeds": list(range(spec.seeds)), "runs": [r.name for r in runs]}
        sub.mkdir(parents=True, exist_ok=True)
        if not (resume and (sub / "bench.json").exists()):
            atomic.write_json(sub / "bench.json", meta)
        # seed-major: every row gets its first seed before any row gets its second, so an
        # interrupted table has all rows (a stable sort keeps pretraining before fine-tuning)
        runs = sorted(runs, key=lambda r: r.cfg.seed)
        log(f"dsbp table: {proto}: {len(runs)} runs -> {sub}")
        run_grid(runs, sub, resume=resume, progress=progress, log=log, loader=loader)
    if "ablation" in protocols:
        prune_supervised(spec, loader, out, rows, log=log)
    if "fewshot" in protocols:
        log(f"dsbp table: fewshot: {len(rows) * spec.seeds} MAML cells -> {out / 'maml'}")
        run_fewshot(spec, loader, out, rows, resume=resume, log=log, command=command)
    info = json.loads((out / "table.json").read_text())
    info.setdefault("wall_s", {})[time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())] = (
        time.perf_counter() - t0)
    atomic.write_json(out / "table.json", info)
    return finish_table(out)


# ---------------------------------------------------------------------------------- tables
def is_table(out: str | Path) -> bool:
    """True if ``out`` is a ``dsbp table`` folder (holds ``table.json``)."""
    return (Path(out) / "table.json").exists()


def collect_table_rows(out: str | Path) -> list[dict[str, Any]]:
    """One row (:data:`TABLE_COLUMNS`) per run of ``supervised/`` and ``transfer/`` and per
    cell of ``maml/``, read from the run files (configs, results, cell JSONs) only."""
    from dsbp.experiments.sweep import collect_rows

    out = Path(out)
    by_method = {m: col for col, _, m in COLUMNS}
    info = json.loads((out / "table.json").read_text()) if is_table(out) else {}
    # task name -> the row it belongs to (a pretraining source may be another data set)
    row_of: dict[tuple[str, str], str] = {}
    for plan in info.get("spec", {}).get("rows", []):
        size = plan.get("size")
        row_of[("supervised", task_name(plan["dataset"], size=size))] = plan["dataset"]
        row_of[("source", plan["source"])] = plan["dataset"]
        row_of[("target", plan["target"])] = plan["dataset"]
    rows: list[dict[str, Any]] = []
    for proto in ("supervised", "transfer", "ablation"):
        if not (out / proto / "runs").is_dir():
            continue
        found, _ = collect_rows(out / proto)
        for r in found:
            if proto == "ablation":
                cfg = json.loads((out / proto / "runs" / r["run"] / "config.json").read_text())
                kw = cfg["method_kwargs"]
                rows.append({**{k: r[k] for k in CORE_COLUMNS},
                             "dataset": parse_task(r["dataset"])[0],
                             "row": row_of.get(("supervised", r["dataset"]), r["dataset"]),
                             "column": f"DSBP k={kw['rank']} p={kw['interval']}",
                             "protocol": "ablation", "task": r["dataset"], "rank": kw["rank"],
                             "interval": kw["interval"], "status": r["status"],
                             "run": r["run"]})
                continue
            base, _, _ = parse_task(r["dataset"])
            pretrain = proto == "transfer" and r["method"] == "sgd"
            role = "supervised" if proto == "supervised" else "source" if pretrain else "target"
            label = ("pretraining (source task)" if pretrain else
                     {"ft_sgd": "full fine-tuning", "ft_dsbp": "DSBP fine-tuning (paper)",
                      "ft_dsbp_tuned": "DSBP fine-tuning (recommended)"}.get(
                         r["method"], by_method.get(r["method"], r["method"])))
            rows.append({**{k: r[k] for k in CORE_COLUMNS}, "dataset": base,
                         "row": row_of.get((role, r["dataset"]), base), "column": label,
                         "protocol": proto, "task": r["dataset"], "status": r["status"],
                         "run": r["run"]})
    rows += _prune_rows(out, row_of)
    fdir = out / "maml" / "runs"
    env = {}
    if (out / "maml" / "env.json").exists():
        env = json.loads((out / "maml" / "env.json").read_text())
    for p in sorted(fdir.glob("*.json")) if fdir.is_dir() else []:
        c = json.loads(p.read_text())
        rows.append({
            "dataset": c["dataset"], "row": c["dataset"],
            "model": "conv4",
            "method": c["method"], "seed": c["seed"], "epochs": "",
            "test_acc": c["test_acc"], "test_loss": c.get("test_loss", ""),
            "wall_s": c["train_s"], "device": env.get("device_name", ""), "column": "MAML",
            "protocol": "fewshot", "task": c["dataset"], "n_way": c["n_way"],
            "k_shot": c["k_shot"], "ci95": c["ci95"], "n_episodes": c["n_episodes"],
            "status": c.get("status", "ok"), "run": c["cell"]})
    return rows


def _prune_rows(out: Path, row_of: Mapping[tuple[str, str], str]) -> list[dict[str, Any]]:
    """One row per (supervised run, tau) of the pruning ablation (``prune.json`` files)."""
    rows: list[dict[str, Any]] = []
    sdir = out / "supervised" / "runs"
    for path in sorted(sdir.glob("*/prune.json")) if sdir.is_dir() else []:
        p = json.loads(path.read_text())
        if "skipped" in p:
            continue
        cfg = json.loads((path.parent / "config.json").read_text())
        env = json.loads((path.parent / "env.json").read_text())
        for t in p["results"]:
            rows.append({
                "dataset": parse_task(cfg["dataset"])[0],
                "row": row_of.get(("supervised", cfg["dataset"]), cfg["dataset"]),
                "model": cfg["model"], "method": f"{cfg['method']}+factorise@{t['tau']:g}",
                "seed": cfg["seed"], "epochs": p["finetune_epochs"],
                "test_acc": t["acc_after"], "test_loss": t["loss_after"],
                "wall_s": t["finetune_s"], "device": env.get("device_name", ""),
                "column": f"pruning ({cfg['method']})", "protocol": "pruning",
                "task": cfg["dataset"], "tau": t["tau"], "params": t["params"],
                "params_original": p["original"]["params"],
                "acc_before_finetune": t["acc_before"], "acc_original": p["original"]["acc"],
                "acc_control": p["original"]["acc_finetuned"], "status": "ok",
                "run": path.parent.name})
    return rows


def _cell(vals: Sequence[float]) -> str:
    if not vals:
        return "n/a"
    m, s = mean_std([100 * v for v in vals])
    return f"{m:.2f}" + (f" ± {s:.2f}" if not math.isnan(s) else " (n=1)")


def _values(rows: Sequence[Mapping[str, Any]], dataset: str, protocol: str,
            method: str) -> list[float]:
    return [float(r["test_acc"]) for r in rows if r["row"] == dataset
            and r["protocol"] == protocol and r["method"] == method and r["status"] == "ok"
            and not (protocol == "transfer" and method == "sgd")]


def _gap(vals: Sequence[float], claim: float | None) -> str:
    if not vals or claim is None:
        return "n/a"
    return f"{100 * statistics.fmean(vals) - claim:+.2f}"


def _sub_row_name(dataset: str) -> str:
    """The paper's row name for one of our data set names (itself if the paper has none)."""
    from dsbp.experiments.report import paper_dataset

    return ROW_NAMES.get(dataset) or paper_dataset(parse_task(dataset)[0]) or dataset


def report_lines(out: Path, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown of the table folder's ``report.md``."""
    info = json.loads((out / "table.json").read_text())
    spec = info.get("spec", {})
    env = info.get("env", {})
    datasets = [d for d in info.get("datasets", []) if any(r["row"] == d for r in rows)]
    seeds = sorted({int(r["seed"]) for r in rows})
    commit = str(env.get("commit") or "unknown") + (" (dirty)" if env.get("dirty") else "")
    base = spec.get("base", {})
    lines = [
        f"# The paper's comparison table: {info.get('variant', '?')} variant",
        "",
        f"- **Setting:** {spec.get('note', '')}.",
        f"- **Command:** `{info.get('command') or 'unknown'}`; remake this report from the "
        "committed files with `dsbp report <this folder>`.",
        f"- **Commit:** `{commit}`; seeds {', '.join(map(str, seeds)) or 'none'}.",
        f"- **Device:** {env.get('device_name', '?')}; torch {env.get('torch', '?')}"
        + (f", {env['cpu_vector']}" if env.get("cpu_vector") else "")
        + (f", BLAS {env['blas']}" if env.get("blas") else "")
        + f"; host `{env.get('host', '?')}`.",
        "",
        "## The table",
        "",
        "Test accuracy (%), mean ± sample std over seeds. The paper's numbers are **quoted from "
        "the paper** (METHOD.md §4; no code was published with it) and were not measured here. "
        "The LoRA and MAML columns come from their own protocols (below): their tasks differ "
        "from the other columns', so compare them with the paper's only with those "
        "protocols in mind.",
        "",
    ]
    head = ["data set"] + [c for c, _, _ in COLUMNS] + ["paper: DSBP", "paper: SAM / LoRA / "
                                                        "MAML (quoted)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d in datasets:
        prow = PAPER_CLAIMED_ACC.get(_sub_row_name(d), {})
        cells = [_sub_row_name(d)] + [_cell(_values(rows, d, p, m)) for _, p, m in COLUMNS]
        cells.append(f"{prow['DSBP']:.1f}" if "DSBP" in prow else "not in the repo")
        cells.append(" / ".join(f"{prow[k]:.1f}" if k in prow else "-"
                                for k in ("SAM", "LoRA", "MAML")))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Every gap to the paper", "",
              "Measured mean minus the paper's claim, in points; `n/a` where the paper's "
              "number is not in the repository (`METHOD.md` §4 lists only the ones shown).", ""]
    gh = ["data set", "DSBP (paper settings) - 'DSBP'", "DSBP (recommended) - 'DSBP'",
          "SAM - 'SAM'", "LoRA - 'LoRA'", "MAML - 'MAML'"]
    lines += ["| " + " | ".join(gh) + " |", "|" + "---|" * len(gh)]
    for d in datasets:
        prow = PAPER_CLAIMED_ACC.get(_sub_row_name(d), {})
        lines.append("| " + " | ".join([
            _sub_row_name(d),
            _gap(_values(rows, d, "supervised", "dsbp"), prow.get("DSBP")),
            _gap(_values(rows, d, "supervised", "dsbp_tuned"), prow.get("DSBP")),
            _gap(_values(rows, d, "supervised", "sam"), prow.get("SAM")),
            _gap(_values(rows, d, "transfer", "ft_lora"), prow.get("LoRA")),
            _gap(_values(rows, d, "fewshot", "maml"), prow.get("MAML"))]) + " |")
    # transfer detail
    lines += ["", "## Transfer: LoRA beside full and DSBP fine-tuning from the same checkpoint",
              "", "Accuracy on the target task's test images (%, mean ± std over seeds). "
              "Every fine-tuning run of a seed starts from that seed's pretrained checkpoint.",
              ""]
    th = ["data set", "source task", "target task", "pretrained (source test acc)", "LoRA",
          "full fine-tuning", "DSBP fine-tuning (paper)", "DSBP fine-tuning (recommended)"]
    lines += ["| " + " | ".join(th) + " |", "|" + "---|" * len(th)]
    for d in datasets:
        tr = [r for r in rows if r["row"] == d and r["protocol"] == "transfer"]
        if not tr:
            continue
        src = sorted({r["task"] for r in tr if r["method"] == "sgd"})
        pre = [float(r["test_acc"]) for r in tr if r["method"] == "sgd" and r["status"] == "ok"]
        tgt = sorted({r["task"] for r in tr if r["method"] != "sgd"})
        lines.append("| " + " | ".join([
            _sub_row_name(d), ", ".join(f"`{t}`" for t in src) or "?",
            ", ".join(f"`{t}`" for t in tgt) or "?", _cell(pre)]
            + [_cell(_values(rows, d, "transfer", m)) for m in FINETUNE_METHODS]) + " |")
    # few-shot detail
    fs = [r for r in rows if r["protocol"] == "fewshot"]
    if fs:
        lines += ["", "## MAML: episodes of each data set's classes", "",
                  "Mean query accuracy (%) over the test episodes of each seed, then mean ± std "
                  "over seeds; the last column is the 95% CI half-width over one seed's "
                  "episodes, averaged over seeds.", ""]
        fh = ["data set", "N-way K-shot", "test episodes per seed", "MAML acc (%)",
              "mean 95% CI (per seed)"]
        lines += ["| " + " | ".join(fh) + " |", "|" + "---|" * len(fh)]
        for d in datasets:
            g = [r for r in fs if r["row"] == d and r["status"] == "ok"]
            if g:
                lines.append("| " + " | ".join([
                    _sub_row_name(d), f"{g[0]['n_way']}-way {g[0]['k_shot']}-shot",
                    str(g[0]["n_episodes"]), _cell([float(r["test_acc"]) for r in g]),
                    f"{100 * statistics.fmean(float(r['ci95']) for r in g):.2f}"]) + " |")
    lines += ablation_lines(rows, datasets)
    lines += ["", "## Protocol", ""] + protocol_lines(info, rows)
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        lines += ["", "## Runs that did not finish", ""]
        lines += [f"- `{r['run']}` ({r['protocol']}): {r['status']}" for r in failed]
    lines += ["", "## Files", "",
              "- `results.csv`: one row per run / cell, core columns first "
              f"({', '.join(CORE_COLUMNS)}).",
              "- `supervised/`, `transfer/`: `dsbp bench` folders (each run's `config.json`, "
              "`env.json`, `metrics.jsonl`, `result.json`; checkpoints are not kept).",
              "- `maml/`: a `dsbp fewshot` folder (one JSON per cell with per-episode "
              "accuracies and class splits).",
              "- `ablation/` (when run): a `dsbp bench` folder of the k and p ablations; the "
              "pruning ablation writes `prune.json` into seed 0's `supervised/` runs.",
              "- `table.png`: the table as bars beside the paper's DSBP claim."]
    base_note = (f"model `{base.get('model')}` {json.dumps(base.get('model_kwargs', {}))}, "
                 f"batch {base.get('batch_size')}, lr {base.get('lr')}")
    lines.insert(4, f"- **Training:** {base_note} (see Protocol).")
    return lines


def ablation_lines(rows: Sequence[Mapping[str, Any]], datasets: Sequence[str]) -> list[str]:
    """The k, p and pruning ablation sections (empty when those protocols did not run)."""
    ab = [r for r in rows if r["protocol"] == "ablation" and r["status"] == "ok"]
    lines: list[str] = []
    if ab:
        k0 = statistics.mode(int(r["rank"]) for r in ab)
        p0 = statistics.mode(int(r["interval"]) for r in ab)
        seeds = sorted({int(r["seed"]) for r in ab})
        # the paper's (k, p) point: the supervised DSBP runs of the ablation's seeds
        ab = ab + [{**r, "rank": k0, "interval": p0} for r in rows
                   if r["protocol"] == "supervised" and r["method"] == "dsbp"
                   and r["status"] == "ok" and int(r["seed"]) in seeds]
        ks = sorted({int(r["rank"]) for r in ab})
        ps = sorted({int(r["interval"]) for r in ab})
        lines += ["", "## Ablations of k and p (DSBP at the paper's other settings)", "",
                  f"Test accuracy (%), seeds {', '.join(map(str, seeds))} [ours: "
                  f"{len(seeds)} seed(s), CPU time]; k swept at p = {p0}, p swept at "
                  f"k = {k0}; the k = {k0}, p = {p0} cell is the supervised DSBP (paper "
                  "settings) run of the same seed.", ""]
        head = (["data set"] + [f"k={k} (p={p0})" for k in ks]
                + [f"p={p} (k={k0})" for p in ps if p != p0])
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for d in datasets:
            def acc(k: int, p: int, d: str = d) -> str:
                return _cell([float(r["test_acc"]) for r in ab if r["row"] == d
                              and int(r["rank"]) == k and int(r["interval"]) == p])
            lines.append("| " + " | ".join([_sub_row_name(d)] + [acc(k, p0) for k in ks]
                                           + [acc(k0, p) for p in ps if p != p0]) + " |")
    pr = [r for r in rows if r["protocol"] == "pruning"]
    if pr:
        lines += ["", "## Pruning ablation (factorise at energy threshold tau, then one "
                  "fine-tuning epoch)", "",
                  "Seed 0's supervised models (`dsbp.experiments.prune`, factorise mode: each "
                  "layer becomes two thinner ones keeping the top eigenvectors that hold a "
                  "fraction tau of the output energy; SGD fine-tuning at a tenth of the run's "
                  "lr). Accuracy (%) after fine-tuning (before it in brackets) and the "
                  "parameters kept; 'as trained' is the unfactorised model (after the same "
                  "fine-tuning epoch in brackets: the control).", ""]
        taus = sorted({float(r["tau"]) for r in pr})
        head = ["data set", "trained with", "as trained (control)"] + [f"tau={t:g}"
                                                                       for t in taus]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for d in datasets:
            for m in ("sgd", "dsbp", "dsbp_tuned"):
                g = [r for r in pr if r["row"] == d and r["method"].startswith(m + "+")]
                if not g:
                    continue
                cells = [_sub_row_name(d), m, f"{100 * float(g[0]['acc_original']):.2f} "
                         f"({100 * float(g[0]['acc_control']):.2f})"]
                for t in taus:
                    h = [r for r in g if float(r["tau"]) == t]
                    cells.append("n/a" if not h else
                                 f"{100 * float(h[0]['test_acc']):.2f} "
                                 f"({100 * float(h[0]['acc_before_finetune']):.2f}), "
                                 f"{int(h[0]['params']) / int(h[0]['params_original']):.2f}x "
                                 "params")
                lines.append("| " + " | ".join(cells) + " |")
    return lines


def protocol_lines(info: Mapping[str, Any],
                   rows: Sequence[Mapping[str, Any]] = ()) -> list[str]:
    """The protocol section: what each column is, every choice of ours marked [ours].

    Ablation settings missing from ``table.json`` (a table started before they existed) are
    read from the ablation and pruning rows that ran."""
    spec = dict(info.get("spec", {}))
    ab = [r for r in rows if r["protocol"] == "ablation"]
    if ab:  # the seeds that ran
        spec["ablate_seeds"] = len({int(r["seed"]) for r in ab})
    if ab and "ablate_rank" not in spec:
        k0, p0 = spec.get("paper_dsbp", {}).get("rank"), spec.get("paper_dsbp", {}).get(
            "interval")
        spec["ablate_rank"] = sorted({int(r["rank"]) for r in ab} | {k0} - {None})
        spec["ablate_interval"] = sorted({int(r["interval"]) for r in ab} | {p0} - {None})
    pr = [r for r in rows if r["protocol"] == "pruning"]
    if pr and "prune_taus" not in spec:
        spec["prune_taus"] = sorted({float(r["tau"]) for r in pr})
    base = spec.get("base", {})
    fs = spec.get("fewshot", {})
    rows = spec.get("rows", [])
    out = [
        "Every choice below that the paper does not state is **[ours]**.",
        "",
        f"- **Training, every supervised, pretraining and fine-tuning run** [ours]: model "
        f"`{base.get('model')}` {json.dumps(base.get('model_kwargs', {}))}, SGD momentum "
        f"{base.get('momentum')}, lr {base.get('lr')} (the paper's eta, for every method), "
        f"weight decay {base.get('weight_decay')}, batch {base.get('batch_size')}, "
        f"{base.get('schedule')} schedule with {base.get('warmup_frac')} warm-up, augmentation "
        f"{'on' if base.get('augment') else 'off'}, amp {base.get('amp')}.",
        "- **Rows** [ours: sizes]: " + "; ".join(
            f"{_sub_row_name(r['dataset'])}: {r['epochs']} epochs, training subset "
            f"{r['subset'] or 'all'}, test subset {r['eval_subset'] or 'all'}"
            + (f", pooled to {r['size']} px" if r.get("size") else "") for r in rows) + ".",
        "- **MedMNIST** is BreastMNIST (`medmnist:breastmnist`), the MedMNIST subset "
        "available offline [ours]; the paper does not say which MedMNIST subset it used.",
        "- **Tiny ImageNet** is the full set when present, else the shared 6000 / 2000-image "
        "subset (30 training and 10 validation images per class). Files read by this table: "
        + "; ".join(f"{k}: {v}" for k, v in info.get("sources", {}).items()) + ".",
        f"- **SGD**: plain momentum SGD. **SAM**: rho {spec.get('sam_rho')} (the SAM paper's "
        "default) [ours], two forward/backward passes per step.",
        f"- **DSBP (paper settings)**: {json.dumps(spec.get('paper_dsbp', {}))} (k, beta, p, "
        "power iterations as METHOD.md states them).",
        f"- **DSBP (recommended)**: {json.dumps(spec.get('recommended', {}))} plus `warmup` = "
        "one epoch of steps of that row (README, \"Recommended configuration\"; chosen on a "
        "validation split of GPU runs, not on these rows) [ours].",
        f"- **LoRA** [ours: the whole protocol]: peft LoRA at rank {spec.get('lora_rank')} "
        "(= k), alpha = rank, on every Linear/Conv2d except the classifier. The network is "
        "first **pretrained with SGD on a source task**, then fine-tuned on a **target task**; "
        "the classifier is new (fresh initialisation of the seed) and trains in full. Source "
        "-> target: " + "; ".join(f"{_sub_row_name(r['dataset'])}: `{r['source']}` -> "
                                  f"`{r['target']}`" for r in rows)
        + " (`@c<lo>-<hi>`: those classes only, relabelled from 0; BreastMNIST has only two "
        "classes, so its source is Fashion-MNIST, the other 28 x 28 grayscale set). Full "
        "fine-tuning (SGD on every parameter) and DSBP fine-tuning (paper settings and "
        "recommended) start from the same checkpoint and train for the same epochs at the "
        "same lr. The LoRA column is accuracy on the target task's test images: a 5-way "
        "(Tiny ImageNet: 100-way) task for the rows split by class, not the 10-way / "
        "200-way task of the other columns. The paper's LoRA number is presumably fine-tuning "
        "a network pretrained elsewhere (it does not say); it is not comparable with ours.",
        f"- **MAML** [ours: the whole protocol]: first-order MAML (`dsbp.baselines.maml`), the "
        f"MAML paper's conv-4 (width {fs.get('width')}), {fs.get('meta_iters')} "
        f"meta-iterations x {fs.get('meta_batch')} tasks, inner lr {fs.get('inner_lr')}, "
        f"{fs.get('inner_steps')} inner steps in training and {fs.get('test_inner_steps')} "
        f"at test, Adam outer lr {fs.get('outer_lr')}, {fs.get('n_query')} query images per "
        f"class, {fs.get('test_episodes')} test episodes per seed, K = {spec.get('k_shot')}. "
        "N-way: " + "; ".join(f"{_sub_row_name(r['dataset'])}: {r['n_way']}-way, "
                              + ("same two classes in meta-training and test (train-split vs "
                                 "test-split images)" if r.get("fewshot_same_classes") else
                                 "held-out classes (`dsbp.experiments.fewshot`: 50/50 class "
                                 "split for 10 classes; 70/30 above, with 64 px images "
                                 "pooled to 32 px)") for r in rows)
        + ". **Metric:** mean query accuracy over the test episodes. **How this differs from "
        "the paper:** the paper gives MAML a single number (94.8, CIFAR-10 only) and does not "
        "say how MAML, a few-shot method, produced a 10-way test accuracy; our number is "
        "N-way K-shot episode accuracy on held-out classes, a different task.",
        f"- **Ablations** (protocol `ablation`, not in the default set): DSBP at the paper's "
        f"settings with k in {spec.get('ablate_rank')} at the paper's p and p in "
        f"{spec.get('ablate_interval')} at the paper's k, "
        f"seeds 0..{spec.get('ablate_seeds', 1) - 1}"
        " [ours: seeds, for CPU time]; pruning: factorise mode of `dsbp.experiments.prune` "
        f"at tau in {spec.get('prune_taus')} on seed 0's SGD, DSBP and recommended-DSBP "
        "models, one fine-tuning epoch [ours: the paper names a pruning ablation without a "
        "protocol].",
        "- **Wall time** (`wall_s` in results.csv): training seconds without evaluation "
        "(MAML: meta-training seconds), on a shared machine: compare only within one run.",
    ]
    return out


def write_table_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Atomically write ``rows`` with :data:`TABLE_COLUMNS`."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(TABLE_COLUMNS), extrasaction="ignore",
                       lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in TABLE_COLUMNS})
    atomic.write_text(path, buf.getvalue())


def plot_table(path: Path, rows: Sequence[Mapping[str, Any]],
               datasets: Sequence[str]) -> Path | None:
    """Grouped bars: each column's mean (± std) per data set, and the paper's DSBP claim."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency of the plots
        return None
    if not datasets:
        return None
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / (len(COLUMNS) + 1)
    for j, (col, proto, method) in enumerate(COLUMNS):
        means, stds = [], []
        for d in datasets:
            v = [100 * x for x in _values(rows, d, proto, method)]
            m, s = mean_std(v) if v else (math.nan, math.nan)
            means.append(m)
            stds.append(0.0 if math.isnan(s) else s)
        ax.bar([i + j * width for i in range(len(datasets))], means, width, yerr=stds,
               label=col, capsize=2)
    claims = [PAPER_CLAIMED_ACC.get(_sub_row_name(d), {}).get("DSBP", math.nan)
              for d in datasets]
    ax.bar([i + len(COLUMNS) * width for i in range(len(datasets))], claims, width,
           label="paper's DSBP claim (quoted)", color="none", edgecolor="black", hatch="//")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(datasets))],
                  [_sub_row_name(d) for d in datasets])
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def finish_table(out: str | Path) -> dict[str, Path]:
    """(Re)make the sub-folders' tables, ``results.csv``, ``report.md`` and ``table.png`` of a
    table folder from its run files (configs, metrics, results, cell JSONs) alone."""
    from dsbp.experiments.fewshot import finish_fewshot
    from dsbp.experiments.sweep import finish

    out = Path(out)
    if not is_table(out):
        raise ValueError(f"{out} is not a `dsbp table` folder (no table.json)")
    for proto in ("supervised", "transfer", "ablation"):
        if (out / proto / "runs").is_dir() and any((out / proto / "runs").iterdir()):
            finish(out / proto)
    if (out / "maml" / "runs").is_dir():
        finish_fewshot(out / "maml")
    rows = collect_table_rows(out)
    write_table_csv(out / "results.csv", rows)
    info = json.loads((out / "table.json").read_text())
    datasets = [d for d in info.get("datasets", []) if any(r["row"] == d for r in rows)]
    plot = plot_table(out / "table.png", rows, datasets)
    atomic.write_text(out / "report.md", "\n".join(report_lines(out, rows)) + "\n")
    made = {"csv": out / "results.csv", "report": out / "report.md"}
    if plot is not None:
        made["plot"] = plot
    return made


# ---------------------------------------------------------------------------- GPU estimate
def gpu_estimate(spec: TableSpec, timings: str | Path,
                 loader: TaskLoader | None = None) -> dict[str, Any]:
    """Hours of GPU time the variant needs, from a committed step benchmark.

    ``timings`` is a ``benchmarks/step_overhead.py`` JSON (e.g.
    ``benchmarks/results/step_overhead_resnet18_cuda_bf16.json``): its ``base.full_s`` is an
    SGD step at its batch, ``dsbp.full_s`` a DSBP step without a refresh and
    ``dsbp_refresh.full_s`` one with a refresh. [ours] Assumptions: time per image is constant
    across batch sizes (the benchmark's batch is larger than the table's, so this is a lower
    bound); it grows with the pixel count (64 x 64 Tiny ImageNet: 4x a 32 x 32 image); SAM
    costs two SGD steps, LoRA and fine-tuning one; evaluation and MAML are not counted.
    """
    data = json.loads(Path(timings).read_text())
    arms = data["arms"]
    batch = int(data["args"]["batch"])
    per_img = {k: float(arms[k]["full_s"]["median"]) / batch
               for k in ("base", "dsbp", "dsbp_refresh")}
    loader = loader or TaskLoader()
    lines, total = [], 0.0

    def dsbp_cost(p: int) -> float:
        return per_img["dsbp"] + (per_img["dsbp_refresh"] - per_img["dsbp"]) / p

    # SGD + SAM (two steps) + two SGD-priced runs (pretraining / LoRA / full fine-tuning are
    # one step each) and the two DSBP runs, per protocol
    per_set = (per_img["base"] * 3 + dsbp_cost(int(spec.paper_dsbp["interval"]))
               + dsbp_cost(int(spec.recommended["interval"])))
    for row in spec.rows:
        n = train_size(loader, row.task, row.subset)
        n_src = train_size(loader, row.source, row.source_subset or row.subset)
        n_tgt = train_size(loader, row.target, row.subset)

        def pix(task: str) -> float:
            return float((loader.task(task).x_train.shape[-1] / 32) ** 2)

        sup = n * row.epochs * pix(row.task)
        src = n_src * (row.source_epochs or row.epochs) * pix(row.source)
        tgt = n_tgt * row.epochs * pix(row.target)
        # transfer: pretraining on the source, then LoRA, full and 2 DSBP fine-tunings
        row_s = spec.seeds * (sup * per_set + src * per_img["base"]
                              + tgt * (per_set - per_img["base"]))
        lines.append({"dataset": row.dataset, "train_images": n,
                      "steps_per_run": math.ceil(n / spec.base.batch_size) * row.epochs,
                      "hours": row_s / 3600})
        total += row_s
    return {"timings": str(timings), "device": data.get("env", {}).get("device"), "batch": batch,
            "hours": total / 3600, "rows": lines}


def run_timings(root: str | Path) -> dict[str, Any]:
    """Measured training seconds per image of each method, from finished harness runs.

    Every ``result.json`` under ``root`` with status ``ok`` counts: ``wall_s`` (training time
    without evaluation) divided by the images it trained on (``n_train`` epochs, where the
    training split of CIFAR-10 / Fashion-MNIST is known and ``val_split`` is subtracted).
    Returns ``{"per_image": {method: median s}, "runs": n, "devices": [...], "batch": [...]}``.
    """
    sizes = {"cifar10": 50000, "fashion_mnist": 60000}
    per: dict[str, list[float]] = {}
    devices, batches, n = set(), set(), 0
    for res_path in Path(root).rglob("result.json"):
        cfg_path = res_path.parent / "config.json"
        if not cfg_path.exists():
            continue
        res, cfg = json.loads(res_path.read_text()), json.loads(cfg_path.read_text())
        if res.get("status") != "ok" or cfg.get("dataset") not in sizes:
            continue
        n_img = (cfg.get("subset") or sizes[cfg["dataset"]] - (cfg.get("val_split") or 0))
        if not res.get("epochs_done") or not res.get("wall_s"):
            continue
        per.setdefault(cfg["method"], []).append(res["wall_s"] / (n_img * res["epochs_done"]))
        devices.add(str(res.get("device_name")))
        batches.add(int(cfg.get("batch_size", 0)))
        n += 1
    return {"per_image": {m: statistics.median(v) for m, v in per.items()}, "runs": n,
            "devices": sorted(devices), "batch": sorted(batches)}


def gpu_estimate_from_runs(spec: TableSpec, root: str | Path,
                           loader: TaskLoader | None = None) -> dict[str, Any]:
    """Hours of training the variant needs at the per-image speed of committed runs
    (:func:`run_timings`): SGD's for SGD, pretraining, LoRA and full fine-tuning, SAM's for
    SAM, ``dsbp``'s for DSBP (paper settings) and ``dsbp_tuned``'s for the recommended
    configuration; 64 x 64 images cost 4x (pixels). [ours] The runs' batch size is reported
    beside the result: a smaller batch takes more steps, so more time per image."""
    t = run_timings(root)
    pi = t["per_image"]
    missing = [m for m in ("sgd", "sam", "dsbp", "dsbp_tuned") if m not in pi]
    if missing:
        raise ValueError(f"no finished runs of {missing} under {root}")
    loader = loader or TaskLoader()
    total = 0.0
    rows = []
    for row in spec.rows:
        def imgs(task: str, subset: int | None, epochs: int) -> float:
            x = loader.task(task).x_train
            return train_size(loader, task, subset) * epochs * float((x.shape[-1] / 32) ** 2)

        sup = imgs(row.task, row.subset, row.epochs)
        src = imgs(row.source, row.source_subset or row.subset, row.source_epochs or row.epochs)
        tgt = imgs(row.target, row.subset, row.epochs)
        s = spec.seeds * (sup * (pi["sgd"] + pi["sam"] + pi["dsbp"] + pi["dsbp_tuned"])
                          + src * pi["sgd"]
                          + tgt * (2 * pi["sgd"] + pi["dsbp"] + pi["dsbp_tuned"]))
        rows.append({"dataset": row.dataset, "hours": s / 3600})
        total += s
    return {"root": str(root), "hours": total / 3600, "rows": rows, **t}


__all__ = ["COLUMNS", "CORE_COLUMNS", "RowPlan", "TABLE_COLUMNS", "TableSpec", "TaskLoader",
           "VARIANTS", "collect_table_rows", "derive_task", "finish_table", "get_variant",
           "gpu_estimate", "gpu_estimate_from_runs", "is_table", "parse_task", "run_table",
           "run_timings", "supervised_runs", "task_name", "transfer_runs", "warmup_steps"]
