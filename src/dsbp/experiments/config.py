"""Typed, frozen run configurations and the named presets of ``dsbp bench``.

A :class:`RunConfig` is everything that decides one training run: data, model, method, seed,
optimiser and schedule, method-specific settings, device and diagnostics. It round-trips
through JSON (``to_dict`` / ``from_dict``), so the ``config.json`` of a run directory is
enough to re-run it.

A :class:`Preset` is a grid: data sets x methods x seeds around one base config. Three exist:

- ``smoke``: the whole pipeline in well under two minutes on a CPU (bundled Fashion-MNIST,
  SmallCNN, one short epoch).
- ``demo``: SGD against DSBP on the bundled Fashion-MNIST subset, a few epochs (~90 s on 2 cores).
- ``paper``: the paper's settings as far as ``METHOD.md`` knows them (ResNet-18, k = 10,
  p = 100, eta = 0.01, beta = 0.1, 5 power iterations). The epochs, batch size, momentum,
  weight decay, schedule and augmentation are **[ours]**: the paper does not state them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SCHEDULES = ("constant", "cosine", "linear", "onecycle")
AMP_MODES = ("none", "bf16", "fp16")


def _canonical_kwargs(kw: Mapping[str, Any] | None) -> dict[str, Any]:
    """Return a plain, key-sorted dict so equal configs compare and serialise equally."""
    return {str(k): kw[k] for k in sorted(kw)} if kw else {}


@dataclass(frozen=True)
class RunConfig:
    """One training run.

    Args:
        dataset: data set name for ``dsbp.data.load_dataset`` (``bundled``, ``fashion_mnist``,
            ``cifar10``, ``medmnist:<flag>``, ``tiny_imagenet``).
        model: model name for ``dsbp.models.registry.build_model`` (``cnn``, ``mlp``,
            ``resnet18``, ``vit``).
        method: training method name from the registry in ``dsbp.experiments.build``
            (``sgd``, ``adamw``, ``sam``, ``dsbp``, ``dsbp_input``, ``lora``, ``dom_sgd``,
            ``bulk_sgd``, or one registered later).
        seed: seed of the model initialisation, data order and augmentation.
        epochs: passes over the (possibly sub-sampled) training split.
        batch_size: examples per step.
        lr: peak learning rate (the paper's eta for DSBP).
        momentum: SGD momentum (also used by SAM's and DSBP's SGD base); ignored by AdamW.
        nesterov: Nesterov momentum for SGD-based methods.
        weight_decay: decoupled for AdamW, L2 for SGD (torch semantics).
        schedule: per-step learning-rate shape after warm-up: ``constant``, ``cosine``
            (to 0), ``linear`` (to 0) or ``onecycle`` (linear up over the warm-up, linear
            down to 0; [ours] simplified one-cycle).
        warmup_frac: fraction of all steps spent in linear warm-up from 0 to ``lr``.
        label_smoothing: cross-entropy label smoothing in [0, 1).
        subset: train on a class-balanced subset of this many training examples (None: all).
        eval_subset: evaluate on a class-balanced subset of this many test examples
            (None: the whole test split).
        val_split: hold out a class-balanced validation split of this many examples from the
            training split (seeded by ``VAL_SEED``, the same for every run seed), disjoint from
            the training examples; evaluated at every epoch end as ``val_loss`` / ``val_acc``.
            Settings are chosen on it, never on the test split. None: no validation split.
        augment: random crop (pad 4) and horizontal flip on the device.
        model_kwargs: extra keyword arguments for the model factory (e.g. ``width``).
        method_kwargs: method settings, e.g. DSBP's ``rank`` (k), ``interval`` (p),
            ``power_iters``, ``sharpness`` (beta), ``side``; SAM's ``rho``; LoRA's ``rank``.
        device: ``cpu``, ``cuda``, ``cuda:1``, or ``auto`` (cuda when available).
        amp: autocast mode for forward passes: ``none``, ``bf16`` or ``fp16`` (fp16 uses a
            gradient scaler and only plain-step methods).
        track: diagnostics recorded at every evaluation, names from
            ``dsbp.experiments.track.TRACKERS`` (e.g. ``alignment``, ``hessian``, ``spectrum``).
        log_every: batches per train-metric record in ``metrics.jsonl`` (windows restart at
            each epoch; the last of an epoch may be shorter).
        checkpoint_every: steps between checkpoints (also one at every epoch end); 0: epoch
            ends only.
        data_root: folder holding the data files (None: the data module's default search).
        sharding: how a multi-process run splits the model: ``ddp`` (replicated weights,
            averaged gradients) or ``fsdp2`` (``fully_shard``: weights, gradients and optimizer
            state sharded by rows; docs/distributed.md). Ignored in one process.
    """

    dataset: str = "bundled"
    model: str = "cnn"
    method: str = "sgd"
    seed: int = 0
    epochs: int = 1
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_frac: float = 0.0
    label_smoothing: float = 0.0
    subset: int | None = None
    eval_subset: int | None = None
    val_split: int | None = None
    augment: bool = False
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    method_kwargs: Mapping[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    amp: str = "none"
    track: tuple[str, ...] = ()
    log_every: int = 10
    checkpoint_every: int = 50
    data_root: str | None = None
    sharding: str = "ddp"

    def __post_init__(self) -> None:
        # Frozen: normalise through object.__setattr__ so JSON round trips compare equal.
        object.__setattr__(self, "model_kwargs", _canonical_kwargs(self.model_kwargs))
        object.__setattr__(self, "method_kwargs", _canonical_kwargs(self.method_kwargs))
        track = self.track
        if isinstance(track, str):  # "hessian,spectrum", not the letters of one name
            track = tuple(t.strip() for t in track.split(",") if t.strip())
        object.__setattr__(self, "track", tuple(track))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        for name in ("dataset", "model", "method", "device"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"RunConfig.{name} must be a non-empty string")
        positive_ints = ("epochs", "batch_size", "log_every")
        for name in positive_ints:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"RunConfig.{name} must be an integer >= 1, got {v!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"RunConfig.seed must be an integer >= 0, got {self.seed!r}")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise ValueError(
                f"RunConfig.checkpoint_every must be an integer >= 0, got {self.checkpoint_every!r}"
            )
        for name in ("lr", "momentum", "weight_decay", "warmup_frac", "label_smoothing"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"RunConfig.{name} must be a number, got {v!r}")
        for name in ("nesterov", "augment"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"RunConfig.{name} must be true or false, got "
                                 f"{getattr(self, name)!r}")
        if self.data_root is not None and (not isinstance(self.data_root, str)
                                           or not self.data_root):
            raise ValueError(f"RunConfig.data_root must be None or a folder, got "
                             f"{self.data_root!r}")
        if not self.lr > 0:
            raise ValueError(f"RunConfig.lr must be > 0, got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"RunConfig.momentum must be in [0, 1), got {self.momentum!r}")
        if self.weight_decay < 0:
            raise ValueError(f"RunConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"RunConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}"
            )
        if not 0 <= self.warmup_frac < 1:
            raise ValueError(f"RunConfig.warmup_frac must be in [0, 1), got {self.warmup_frac!r}")
        if self.schedule == "onecycle" and self.warmup_frac == 0:
            raise ValueError("RunConfig.schedule='onecycle' needs warmup_frac > 0")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(
                f"RunConfig.label_smoothing must be in [0, 1), got {self.label_smoothing!r}"
            )
        for name in ("subset", "eval_subset", "val_split"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"RunConfig.{name} must be None or an integer >= 1, got {v!r}")
        if self.sharding not in ("ddp", "fsdp2"):
            raise ValueError(f"RunConfig.sharding must be 'ddp' or 'fsdp2', got "
                             f"{self.sharding!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"RunConfig.amp must be one of {AMP_MODES}, got {self.amp!r}")
        if not all(isinstance(t, str) and t for t in self.track):
            raise ValueError(f"RunConfig.track must be a tuple of names, got {self.track!r}")

    # --- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["track"] = list(self.track)
        d["model_kwargs"] = dict(self.model_kwargs)
        d["method_kwargs"] = dict(self.method_kwargs)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` (a typo is not ignored)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a RunConfig must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown RunConfig field(s): {unknown}; known: {sorted(known)}")
        kw = dict(d)
        if isinstance(kw.get("track"), list):
            kw["track"] = tuple(kw["track"])
        return cls(**kw)

    def to_json(self) -> str:
        """Indented, key-sorted JSON of :meth:`to_dict` (the content of ``config.json``)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with the config fields in ``changes`` replaced (validated again); method
        settings go through :func:`with_setting`."""
        return dataclasses.replace(self, **changes)

    def run_name(self, ablated: tuple[str, ...] = ()) -> str:
        """Directory name of this run: ``dataset-model-method[-key=value...]-s<seed>``.

        ``ablated`` lists the setting names to spell out (those swept by ``--ablate``).
        """
        parts = [self.dataset.replace(":", "_"), self.model, self.method]
        parts += [f"{k}={setting_value(self, k)}" for k in ablated]
        parts.append(f"s{self.seed}")
        return "-".join(str(p).replace("/", "_") for p in parts)


CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(RunConfig))


def setting_value(cfg: RunConfig, key: str) -> Any:
    """Value of ``key`` in ``cfg``: a top-level field, or else a ``method_kwargs`` entry."""
    if key in CONFIG_FIELDS:
        return getattr(cfg, key)
    return cfg.method_kwargs.get(key)


def with_setting(cfg: RunConfig, key: str, value: Any) -> RunConfig:
    """A copy of ``cfg`` with ``key`` set: a top-level field if one has that name, else a
    ``method_kwargs`` entry (e.g. ``rank``, ``interval``, ``rho``)."""
    if key in CONFIG_FIELDS:
        return dataclasses.replace(cfg, **{key: value})
    return dataclasses.replace(cfg, method_kwargs={**cfg.method_kwargs, key: value})


@dataclass(frozen=True)
class Preset:
    """A grid: ``datasets`` x ``methods`` x ``seeds`` around ``base``.

    Args:
        name: preset name.
        datasets: data set names.
        methods: method names.
        seeds: number of seeds (seeds 0 .. seeds-1).
        base: config shared by every run; its dataset/method/seed fields are overwritten.
        method_overrides: per method, settings that differ from ``base`` (e.g. AdamW's lr).
        note: one line on what the preset is for and which values are ours.
        threads: torch CPU threads the CLI sets for this preset unless ``--threads`` is
            given (None: torch's default). [ours] 1 for the tiny CPU presets: their ops are
            too small to gain from a thread pool, and on a shared CPU waiting for a second
            thread slows them many times over.
    """

    name: str
    datasets: tuple[str, ...]
    methods: tuple[str, ...]
    seeds: int
    base: RunConfig
    method_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    note: str = ""
    threads: int | None = None

    def configs(self) -> list[RunConfig]:
        """Every run of the grid, dataset-major, then method, then seed."""
        out = []
        for ds in self.datasets:
            for m in self.methods:
                cfg = dataclasses.replace(self.base, dataset=ds, method=m)
                for k, v in self.method_overrides.get(m, {}).items():
                    cfg = with_setting(cfg, k, v)
                out += [dataclasses.replace(cfg, seed=s) for s in range(self.seeds)]
        return out


# DSBP settings from METHOD.md §1: k = 10, p = 100, eta = 0.01, beta = 0.1, 5 power iterations.
PAPER_DSBP_KWARGS = {"rank": 10, "interval": 100, "sharpness": 0.1, "power_iters": 5}

PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        name="smoke",
        datasets=("bundled",),
        methods=("sgd", "adamw", "sam", "dsbp", "dsbp_input"),
        seeds=1,
        # [ours] sized so that the whole grid takes well under two minutes on a 2-core CPU:
        # 1000 balanced training images, the bundled 1000-image test split, one epoch.
        base=RunConfig(
            dataset="bundled", model="cnn", epochs=1, batch_size=64, lr=0.05, subset=1000,
            schedule="cosine", warmup_frac=0.0, log_every=4, checkpoint_every=8,
            model_kwargs={"width": 16},
            method_kwargs={"rank": 4, "interval": 5, "power_iters": 3, "sharpness": 0.1},
        ),
        method_overrides={"adamw": {"lr": 2e-3, "weight_decay": 5e-2}, "sam": {"rho": 0.05}},
        note="[ours] pipeline check only; numbers are not meaningful",
        threads=1,
    ),
    "demo": Preset(
        name="demo",
        datasets=("bundled",),
        methods=("sgd", "dsbp"),
        seeds=1,
        # [ours] bundled Fashion-MNIST (6000 train / 1000 test), SmallCNN, 3 epochs:
        # about a minute on two CPU cores. DSBP keeps the paper's k and beta, with p = 20
        # so that its 141 steps see several refreshes.
        base=RunConfig(
            dataset="bundled", model="cnn", epochs=3, batch_size=128, lr=0.05,
            schedule="cosine", warmup_frac=0.05, log_every=10, checkpoint_every=50,
            method_kwargs={"rank": 10, "interval": 20, "power_iters": 5, "sharpness": 0.1},
        ),
        note="[ours] a quick look at SGD against DSBP; not the paper's setting",
        threads=1,
    ),
    "paper": Preset(
        name="paper",
        datasets=("cifar10", "fashion_mnist", "medmnist:breastmnist", "tiny_imagenet"),
        methods=("sgd", "sam", "dsbp", "lora"),
        seeds=3,
        # From METHOD.md: ResNet-18, eta = lr = 0.01, k = 10, p = 100, beta = 0.1, 5 power
        # iterations. [ours] (the paper does not state them): 30 epochs (the length of the one
        # measured run in METHOD.md §1), batch 128, momentum 0.9, weight decay 5e-4, cosine
        # schedule with 5% warm-up, crop+flip augmentation, SAM rho = 0.05 (SAM paper default),
        # LoRA rank = k = 10 (equal rank, issue 3).
        base=RunConfig(
            model="resnet18", epochs=30, batch_size=128, lr=0.01, momentum=0.9,
            weight_decay=5e-4, schedule="cosine", warmup_frac=0.05, augment=True,
            log_every=50, checkpoint_every=500, device="auto",
            method_kwargs=PAPER_DSBP_KWARGS,
        ),
        method_overrides={"sam": {"rho": 0.05}},
        note="paper values: ResNet-18, k=10, p=100, eta=0.01, beta=0.1, 5 power iterations; "
        "[ours]: epochs 30, batch 128, momentum 0.9, wd 5e-4, cosine, 5% warm-up, augmentation",
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ``ValueError`` lists the known ones otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None
