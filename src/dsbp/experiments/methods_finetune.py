"""Fine-tuning methods of the harness: load a pretrained checkpoint, then train as a base method.

The paper compares DSBP with LoRA, a fine-tuning method. A LoRA column means something only
when LoRA adapts a network that was *pretrained* on another task, so the comparison table
(``dsbp.experiments.table``) pretrains a network on a stated source task with the harness and
fine-tunes it on the target task with each of these methods, all from the same checkpoint:

- ``ft_lora``: LoRA (peft) at rank ``rank`` on every Linear/Conv2d but the classifier, which is
  new and trains in full (the ``lora`` method's factory);
- ``ft_sgd``: full fine-tuning, SGD on every parameter;
- ``ft_dsbp``: DSBP fine-tuning at the settings in ``method_kwargs`` (the ``dsbp`` factory);
- ``ft_dsbp_tuned``: the same with the ``dsbp_tuned`` defaults (``residual=0.5``).

Each reads ``method_kwargs["init"]``: the path of the pretraining run's ``checkpoint.pt`` (a
harness checkpoint; its ``"model"`` entry is loaded). Every parameter and buffer of the model is
loaded from it except the classifier (the model's last ``nn.Linear``), which keeps the fresh
initialisation of the run's seed: the target task has its own classes. [ours]
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from dsbp.experiments.build import (
    BuildContext,
    Method,
    MethodFactory,
    get_method,
    register_method,
)
from dsbp.experiments.config import RunConfig

# fine-tuning method -> the harness method it trains with after loading the checkpoint
FINETUNE_BASES = {"ft_lora": "lora", "ft_sgd": "sgd", "ft_dsbp": "dsbp",
                  "ft_dsbp_tuned": "dsbp_tuned"}


def classifier_name(model: nn.Module) -> str:
    """Name of the model's last ``nn.Linear`` (its classifier).

    Raises:
        ValueError: the model has no ``nn.Linear``.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError("fine-tuning needs a model whose classifier is an nn.Linear")
    return names[-1]


def load_pretrained(model: nn.Module, path: str | Path) -> list[str]:
    """Load every entry of ``model``'s state dict but the classifier's from the harness
    checkpoint at ``path`` (in place).

    Returns:
        The state-dict keys left at their fresh values (the classifier's).

    Raises:
        FileNotFoundError: no checkpoint at ``path`` (the pretraining run did not finish).
        ValueError: the checkpoint has no ``model`` entry, lacks a key of the model, or has a
            different shape for one (``CorruptFileError``, a ValueError, when it is unreadable).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"pretrained checkpoint {path} not found: run the pretraining "
                                "run first (dsbp table does it in order)")
    from dsbp.experiments.run import load_checkpoint

    ckpt = load_checkpoint(path, next(model.parameters()).device)
    if "model" not in ckpt:
        raise ValueError(f"{path} is not a harness checkpoint (no 'model' entry)")
    saved = ckpt["model"]
    head = classifier_name(model) + "."
    own = model.state_dict()
    fresh = [k for k in own if k.startswith(head)]
    missing = [k for k in own if k not in fresh and k not in saved]
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} entries of the model, e.g. {missing[:3]}: "
                         "was it pretrained with the same model and width?")
    bad = [k for k in own if k not in fresh and tuple(saved[k].shape) != tuple(own[k].shape)]
    if bad:
        raise ValueError(f"{path}: shapes differ from the model's for {bad[:3]}")
    model.load_state_dict({k: (own[k] if k in fresh else saved[k]) for k in own})
    return fresh


def _factory(base: str) -> MethodFactory:
    def make(model: nn.Module, cfg: RunConfig, ctx: BuildContext) -> Method:
        init = cfg.method_kwargs.get("init")
        if not init:
            raise ValueError(f"method {cfg.method!r} needs method_kwargs['init']: the path of "
                             "the pretraining run's checkpoint.pt")
        load_pretrained(model, str(init))
        return get_method(base).factory(model, cfg, ctx)

    return make


for _name, _base in FINETUNE_BASES.items():
    _spec = get_method(_base)
    register_method(
        _name, settings=(*_spec.settings, "init"),
        description=f"fine-tune from method_kwargs['init'] (new classifier), then {_base}: "
        f"{_spec.description}")(_factory(_base))
