"""Small factories: data loaders, model, training method (optimizer) and LR schedule for a run.

Training methods live in a registry, :data:`METHODS`, so that other parts of the project
(extensions, new baselines) can add theirs without touching the harness::

    from dsbp.experiments.build import Method, register_method

    @register_method("my_method", settings=("rank",))
    def _my_method(model, cfg, ctx):
        opt = MyOptimizer(model.parameters(), lr=cfg.lr, rank=cfg.method_kwargs.get("rank", 4))
        return Method(model=model, optimizer=opt)

Modules named ``dsbp.experiments.methods_*`` are imported on the first lookup
(:func:`discover_methods`), so a new method only needs such a module with its factory.

A factory gets the freshly built model, the :class:`~dsbp.experiments.config.RunConfig` and a
:class:`BuildContext` (loss function, training loader, device) and returns a :class:`Method`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dsbp.experiments.config import RunConfig


# --------------------------------------------------------------------------------- device
def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when available else ``cpu``; other names are checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available here")
    return dev


# ----------------------------------------------------------------------------------- data
@dataclass
class RunData:
    """The loaders of one run and the facts about the data set the model needs.

    Attributes:
        train: training :class:`~dsbp.data.loader.DeviceLoader` (shuffled, seeded by the run seed).
        test: evaluation loader (fixed order, no augmentation).
        in_channels, image_size, num_classes: the data set's shape (C, H = W, classes).
        n_train, n_test: examples per epoch in each loader.
        source: where the data came from (the data set's ``source`` string).
        val: validation loader (fixed order, no augmentation) over the examples held out
            from the training split by ``RunConfig.val_split``, or None.
        n_val: examples in ``val`` (0 without one).
    """

    train: Any
    test: Any
    in_channels: int
    image_size: int
    num_classes: int
    n_train: int
    n_test: int
    source: str
    val: Any = None
    n_val: int = 0


# Seed of the validation hold-out: one fixed split for every run seed, so that choices made
# on it compare runs on the same images (like ``eval_subset``'s seed 0). [ours]
VAL_SEED = 12345


def load_data(cfg: RunConfig, device: torch.device, dataset: Any | None = None) -> RunData:
    """Load ``cfg.dataset`` (or use the already loaded ``dataset``) and build both loaders.

    ``cfg.subset`` / ``cfg.eval_subset`` take class-balanced subsets (seeded by ``cfg.seed`` /
    0 respectively, so every method and seed is evaluated on the same test images).
    """
    from dsbp.data import load_dataset
    from dsbp.data.loader import DeviceLoader
    from dsbp.data.subset import balanced_subset

    ds = dataset if dataset is not None else load_dataset(cfg.dataset, root=cfg.data_root)
    x_tr, y_tr, x_te, y_te = ds.x_train, ds.y_train, ds.x_test, ds.y_test
    x_va = y_va = None
    if cfg.val_split is not None:
        from dsbp.data.subset import balanced_indices

        # Held out first, from the whole training split; the training subset is then drawn
        # from what is left, so the two are disjoint.
        held = torch.zeros(len(y_tr), dtype=torch.bool)
        held[balanced_indices(y_tr, cfg.val_split, seed=VAL_SEED)] = True
        x_va, y_va, x_tr, y_tr = x_tr[held], y_tr[held], x_tr[~held], y_tr[~held]
    if cfg.subset is not None:
        x_tr, y_tr = balanced_subset(x_tr, y_tr, cfg.subset, seed=cfg.seed)
    if cfg.eval_subset is not None:
        x_te, y_te = balanced_subset(x_te, y_te, cfg.eval_subset, seed=0)
    # On a GPU, images go channels-last (NHWC), the layout cuDNN's tensor-core convolutions
    # want; the model is converted to match in run.py. [ours] Same numbers up to summation order.
    common: dict[str, Any] = {"device": device, "mean": ds.mean, "std": ds.std,
              "channels_last": device.type == "cuda" and x_tr.dim() == 4}
    train = DeviceLoader(x_tr, y_tr, cfg.batch_size, shuffle=True, augment=cfg.augment,
                         seed=cfg.seed, **common)
    # Evaluation batch size does not change results; larger batches are faster.
    test = DeviceLoader(x_te, y_te, max(cfg.batch_size, 500), shuffle=False, augment=False,
                        seed=0, **common)
    val = None if x_va is None or y_va is None else DeviceLoader(
        x_va, y_va, max(cfg.batch_size, 500), shuffle=False, augment=False, seed=0, **common)
    return RunData(train=train, test=test, in_channels=int(x_tr.shape[1]),
                   image_size=int(x_tr.shape[-1]), num_classes=len(ds.classes),
                   n_train=int(x_tr.shape[0]), n_test=int(x_te.shape[0]), source=str(ds.source),
                   val=val, n_val=0 if y_va is None else int(y_va.shape[0]))


# ---------------------------------------------------------------------------------- model
def build_model_for(cfg: RunConfig, data: RunData) -> nn.Module:
    """The model named by ``cfg.model`` shaped for ``data``, initialised from ``cfg.seed``."""
    from dsbp.models.registry import build_model

    torch.manual_seed(cfg.seed)
    return build_model(cfg.model, in_channels=data.in_channels, num_classes=data.num_classes,
                       image_size=data.image_size, **dict(cfg.model_kwargs))


# -------------------------------------------------------------------------------- methods
@dataclass
class BuildContext:
    """What a method factory may need besides the model and config.

    Attributes:
        loss_fn: ``loss_fn(logits, y) -> scalar`` (cross-entropy with the run's smoothing).
        train: the training loader.
        device: the run's device.
        num_classes: number of classes of the data set.
    """

    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    train: Any
    device: torch.device
    num_classes: int


@dataclass
class Method:
    """A training method as the loop sees it.

    Attributes:
        model: the module to train and evaluate (a method may wrap the original, e.g. LoRA).
        optimizer: the ``torch.optim.Optimizer`` the LR schedule drives and checkpoints save.
        closure_step: ``True`` if the optimizer needs ``step(closure)`` (SAM: it runs the
            forward/backward passes itself and returns the first pass's loss); ``False`` for
            the plain ``loss.backward(); optimizer.step()``.
        wants_batch: the plain step is ``optimizer.step(batch=(x, y))`` (Dom-/Bulk-SGD take
            their Hessian on the current batch).
        extra_state: objects besides the optimizer with ``state_dict``/``load_state_dict``
            that a checkpoint must hold, by name.
        cleanup: called once when the run ends (e.g. removes hooks).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    closure_step: bool = False
    wants_batch: bool = False
    extra_state: Mapping[str, Any] = field(default_factory=dict)
    cleanup: Callable[[], None] | None = None

    def state_dict(self) -> dict[str, Any]:
        """Optimizer state plus every ``extra_state`` entry's state (tensors only)."""
        out = {"optimizer": self.optimizer.state_dict()}
        out.update({k: v.state_dict() for k, v in self.extra_state.items()})
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        self.optimizer.load_state_dict(state["optimizer"])
        for k, v in self.extra_state.items():
            v.load_state_dict(state[k])

    def close(self) -> None:
        """Run ``cleanup`` once (idempotent)."""
        if self.cleanup is not None:
            self.cleanup()
            self.cleanup = None


MethodFactory = Callable[[nn.Module, RunConfig, BuildContext], Method]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its factory, the ``method_kwargs`` keys it reads (so that
    ``--ablate key=...`` only multiplies the methods it affects) and a one-line description."""

    name: str
    factory: MethodFactory
    settings: frozenset[str]
    description: str


METHODS: dict[str, MethodSpec] = {}


def register_method(
    name: str, *, settings: Iterable[str] = (), description: str = "", replace: bool = False
) -> Callable[[MethodFactory], MethodFactory]:
    """Decorator adding a method factory to :data:`METHODS` under ``name``.

    Args:
        name: the name used in ``RunConfig.method`` and ``dsbp bench --methods``.
        settings: ``method_kwargs`` keys the method reads (e.g. ``("rank", "interval")``).
        description: one line for ``dsbp bench --help`` and reports.
        replace: allow re-registering an existing name (otherwise ``ValueError``).
    """

    def deco(fn: MethodFactory) -> MethodFactory:
        if name in METHODS and not replace:
            raise ValueError(f"method {name!r} is already registered")
        METHODS[name] = MethodSpec(name, fn, frozenset(settings), description or fn.__doc__ or "")
        return fn

    return deco


_discovered = False


def discover_methods() -> dict[str, MethodSpec]:
    """Import every ``dsbp.experiments.methods_*`` module once, so that the methods they
    register are known, and return :data:`METHODS`.

    This is how methods from other parts of the project join the harness: extensions cannot
    import ``dsbp.experiments`` (layering), so their harness entries live in a module such as
    ``dsbp/experiments/methods_inference.py`` that imports the extension and calls
    :func:`register_method`. An import error there is raised, not hidden.
    """
    global _discovered
    if not _discovered:
        import importlib
        import pkgutil

        import dsbp.experiments as pkg

        _discovered = True
        for info in pkgutil.iter_modules(pkg.__path__):
            if info.name.startswith("methods_"):
                importlib.import_module(f"{pkg.__name__}.{info.name}")
    return METHODS


def get_method(name: str) -> MethodSpec:
    """The registered method ``name``; ``ValueError`` lists the known ones otherwise."""
    discover_methods()
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered: {sorted(METHODS)}") from None


def build_method(model: nn.Module, cfg: RunConfig, ctx: BuildContext) -> Method:
    """Build the training method ``cfg.method`` for ``model``."""
    return get_method(cfg.method).factory(model, cfg, ctx)


def _sgd_kwargs(cfg: RunConfig) -> dict[str, Any]:
    return {"lr": cfg.lr, "momentum": cfg.momentum, "nesterov": cfg.nesterov and cfg.momentum > 0,
            "weight_decay": cfg.weight_decay}


def _kw(cfg: RunConfig, key: str, default: Any) -> Any:
    return cfg.method_kwargs.get(key, default)


@register_method("sgd", description="SGD with momentum (torch.optim.SGD)")
def _sgd(model: nn.Module, cfg: RunConfig, ctx: BuildContext) -> Method:
    return Method(model, torch.optim.SGD(model.parameters(), **_sgd_kwargs(cfg)))


@register_method("adamw", settings=("betas",), description="AdamW (torch.optim.AdamW)")
def _adamw(model: nn.Module, cfg: RunConfig, ctx: BuildContext) -> Method:
    betas = tuple(_kw(cfg, "betas", (0.9, 0.999)))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=betas,
                            weight_decay=cfg.weight_decay)
    return Method(model, opt)


@register_method("sam", settings=("rho", "adaptive"),
                 description="SAM (two passes) around SGD; rho default 0.05")
def _sam(model: nn.Module, cfg: RunConfig, ctx: BuildContext) -> Method:
    from dsbp.baselines.sam import SAM

    opt = SAM(model.parameters(), torch.optim.SGD, rho=_kw(cfg, "rho", 0.05),
              adaptive=bool(_kw(cfg, "adaptive", False)), model=model, **_sgd_kwargs(cfg))
    return Method(model, opt, closure_step=True)


_DSBP_SETTINGS = ("rank", "interval", "power_iters", "sharpness", "max_rows")
# SpectralProjector switches of issue 7 (keyword-only there, so they go in projector_kwargs).
_DSBP_SWITCHES = ("residual", "rescale", "max_rescale", "warmup", "energy", "skip_first_last")


def _dsbp_method(model: nn.Module, cfg: RunConfig, side: str,
                 defaults: Mapping[str, Any] | None = None) -> Method:
    from dsbp import DSBP

    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        # `dsbp bench --nproc N`: bases of the global batch, bit-identical on every rank
        from dsbp.optim.distributed import DistributedDSBP as DSBP  # noqa: N814

    given = {**(defaults or {}), **cfg.method_kwargs}
    kw = {k: given[k] for k in _DSBP_SETTINGS if k in given}
    switches = {k: given[k] for k in _DSBP_SWITCHES if k in given}
    opt = DSBP(model, torch.optim.SGD, side=side,
               projector_kwargs={"seed": cfg.seed, **switches}, **kw, **_sgd_kwargs(cfg))
    return Method(model, opt, cleanup=opt.projector.remove)


@register_method("dsbp", settings=(*_DSBP_SETTINGS, *_DSBP_SWITCHES),
                 description="DSBP, output side (the paper's shapes), SGD base")
def _dsbp(model: nn.Module, cfg: RunConfig, ctx: BuildContext) -> Method:
    return _dsbp_method(model, cfg, side="output")


@register_method("dsbp_input", settings=(*_DSBP_SETTINGS, *_DSBP_SWITCHES),
                 description="DSBP, input side (K-FAC 'A' covariance) [ours], SGD base")
def _dsbp_input(model: nn.Module, cfg: RunConfig, ctx: BuildContext) -> Method:
    return _dsbp_method(model, cfg, side="input")


# The measured switch of the "does DSBP earn its claims?" study (docs/findings.md,
# results/dsbp_claims_cpu/report.md): DSBP plus a damped step in the complement of the
# subspace, G~ = P G + alpha (G - P G), alpha = 0.5. [ours] Chosen on the validation
# split of CPU subsets (3 seeds, two data sets). On the GPU (ResNet-18,
# results/dsbp_claims_gpu/report.md) the best on validation adds interval=20 and warmup=100
# (README "Recommended configuration"); those depend on the run length, so they are not
# defaults here: pass them with --set. method_kwargs override any of it (and set k, p, beta
# as for ``dsbp``).
DSBP_TUNED = {"residual": 0.5}


@register_method("dsbp_tuned", settings=(*_DSBP_SETTINGS, *_DSBP_SWITCHES),
                 description="DSBP, output side, with the claims study's measured switch "
                 "(residual alpha = 0.5)")
def _dsbp_tuned(model: nn.Module, cfg: RunConfig, ctx: BuildContext) -> Method:
    return _dsbp_method(model, cfg, side="output", defaults=DSBP_TUNED)


@register_method("lora", settings=("rank", "alpha"),
                 description="LoRA (peft) at rank k on every Linear/Conv layer but the "
                 "classifier, which trains in full; SGD on the trainable parameters")
def _lora(model: nn.Module, cfg: RunConfig, ctx: BuildContext) -> Method:
    from dsbp.baselines.lora import apply_lora

    # [ours] in a from-scratch bench the classifier (the last Linear) trains in full: with it
    # frozen at its random init the comparison would measure nothing useful.
    head = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1:]
    kw = {"alpha": cfg.method_kwargs["alpha"]} if "alpha" in cfg.method_kwargs else {}
    wrapped, _ = apply_lora(model, rank=int(_kw(cfg, "rank", 10)), modules_to_save=head, **kw)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    return Method(wrapped, torch.optim.SGD(params, **_sgd_kwargs(cfg)))


def _subspace_method(model: nn.Module, cfg: RunConfig, ctx: BuildContext, mode: str) -> Method:
    from dsbp.baselines.subspace_sgd import SubspaceSGD

    # k ~ number of classes (METHOD.md §5) unless given; the Hessian basis is recomputed on
    # the current training batch every `interval` steps.
    extra = {key: cfg.method_kwargs[key] for key in ("a", "b", "lanczos_iters")
             if key in cfg.method_kwargs}
    opt = SubspaceSGD(model, ctx.loss_fn, mode=mode, k=int(_kw(cfg, "k", ctx.num_classes)),
                      interval=int(_kw(cfg, "interval", 10)), seed=cfg.seed, **extra,
                      **_sgd_kwargs(cfg))
    return Method(model, opt, wants_batch=True)


_SUBSPACE_SETTINGS = ("k", "interval", "lanczos_iters")


@register_method("dom_sgd", settings=_SUBSPACE_SETTINGS,
                 description="Dom-SGD: steps inside the top-k Hessian eigenspace")
def _dom_sgd(model: nn.Module, cfg: RunConfig, ctx: BuildContext) -> Method:
    return _subspace_method(model, cfg, ctx, "dom")


@register_method("bulk_sgd", settings=_SUBSPACE_SETTINGS,
                 description="Bulk-SGD: steps in the complement of the top-k Hessian eigenspace")
def _bulk_sgd(model: nn.Module, cfg: RunConfig, ctx: BuildContext) -> Method:
    return _subspace_method(model, cfg, ctx, "bulk")


@register_method("interp_sgd", settings=(*_SUBSPACE_SETTINGS, "a", "b"),
                 description="g <- a P_dom g + b (I - P_dom) g (METHOD.md §5); (1, 1) is SGD")
def _interp_sgd(model: nn.Module, cfg: RunConfig, ctx: BuildContext) -> Method:
    return _subspace_method(model, cfg, ctx, "interp")


# ------------------------------------------------------------------------------- schedule
class LRFactor:
    """Multiplier of the peak learning rate at optimizer step ``t`` (0-based), for LambdaLR.

    Linear warm-up over ``warmup`` steps to 1 (``(t + 1) / warmup``, so the first step does
    not waste a zero learning rate), then ``shape`` over the remaining steps:
    ``constant`` (1), ``cosine`` (``0.5 (1 + cos(pi u))``), ``linear`` and ``onecycle``
    (``1 - u``), with ``u`` in [0, 1) the fraction of post-warm-up steps done.
    A class rather than a lambda so that LambdaLR's state dict stores it.

    Args:
        total: total optimizer steps of the run (epochs x batches per epoch), >= 1.
        warmup: warm-up steps, in [0, total).
        shape: one of ``constant``, ``cosine``, ``linear``, ``onecycle``.
    """

    def __init__(self, total: int, warmup: int, shape: str) -> None:
        if total < 1 or not 0 <= warmup < total:
            raise ValueError(f"need total >= 1 and 0 <= warmup < total, got {total}, {warmup}")
        if shape not in ("constant", "cosine", "linear", "onecycle"):
            raise ValueError(f"unknown schedule shape {shape!r}")
        self.total, self.warmup, self.shape = total, warmup, shape

    def __call__(self, t: int) -> float:
        if t < self.warmup:
            return (t + 1) / self.warmup
        u = (t - self.warmup) / (self.total - self.warmup)
        if self.shape == "constant":
            return 1.0
        if self.shape == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * u))
        return 1.0 - u


def build_schedule(
    optimizer: torch.optim.Optimizer, cfg: RunConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LambdaLR for ``cfg.schedule`` with ``cfg.warmup_frac`` warm-up."""
    total = cfg.epochs * steps_per_epoch
    factor = LRFactor(total, int(cfg.warmup_frac * total), cfg.schedule)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_loss(cfg: RunConfig) -> nn.CrossEntropyLoss:
    """Cross-entropy with the run's label smoothing (mean over the batch)."""
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
