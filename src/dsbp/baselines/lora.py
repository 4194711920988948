"""LoRA (Hu et al. 2022, arXiv 2106.09685) through HuggingFace ``peft``, the fine-tuning baseline.

Each targeted layer's weight ``W0`` (d_out x d_in; a conv weight viewed as C_out x C_in*kh*kw) is
frozen and the layer computes ``W0 x + (alpha / r) B A x`` with ``A`` (r x d_in, random) and ``B``
(d_out x r, zeros), so the adapted model equals the base model at initialisation and has
``r * (d_in + d_out)`` trainable parameters per adapted layer. For a conv, peft's ``A`` is a
conv with the layer's kernel (r x C_in x kh x kw) and ``B`` a 1x1 conv (C_out x r x 1 x 1): the
same count with ``d_in = C_in*kh*kw``.

To compare with DSBP's spectral adapter at equal cost, adapt the same layers at the same rank:
:func:`lora_target_names` lists the Linear/Conv2d layers DSBP hooks by default.

``peft`` is an optional extra (``pip install "dsbp[lora]"``); it is imported only when
:func:`apply_lora` is called, so importing this module never needs it.

LoRA is a fine-tuning method: it adapts a *pretrained* network. The harness method ``lora``
applies it to a freshly initialised network (only the adapters and the classifier train),
which no LoRA user would run; the comparison table (``dsbp table``) uses ``ft_lora``
(``dsbp.experiments.methods_finetune``) instead, which first loads a checkpoint the harness
pretrained on a stated source task, beside full and DSBP fine-tuning from that checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["apply_lora", "lora_target_names", "lora_param_count"]

_ADAPTABLE = (nn.Linear, nn.Conv2d)


def lora_target_names(model: nn.Module, exclude: Sequence[str] = ()) -> list[str]:
    """Full names of the model's ``nn.Linear`` and ``nn.Conv2d`` modules, in model order.

    Args:
        model: the network.
        exclude: module names to leave out, with everything inside them (e.g. the classifier
            ``"fc"`` or ``"head"``, trained in full through ``modules_to_save``).

    Returns:
        List of module names, usable as ``target_modules`` of :func:`apply_lora`.

    Raises:
        ValueError: if an ``exclude`` name is not a module of ``model``.
    """
    all_names = {n for n, _ in model.named_modules()}
    missing = set(exclude) - all_names
    if missing:
        raise ValueError(f"exclude names are not modules of the model: {sorted(missing)}")

    def excluded(name: str) -> bool:
        return any(name == e or name.startswith(e + ".") for e in exclude)

    return [n for n, m in model.named_modules() if isinstance(m, _ADAPTABLE) and not excluded(n)]


def lora_param_count(model: nn.Module, rank: int, target_modules: Sequence[str]) -> int:
    """Closed-form number of LoRA parameters: ``sum_l r * (d_in_l + d_out_l)``.

    Args:
        model: the *base* network (before :func:`apply_lora`).
        rank: LoRA rank r.
        target_modules: full names of the adapted Linear/Conv2d modules.
    """
    modules = dict(model.named_modules())
    total = 0
    for name in target_modules:
        m = modules.get(name)
        if not isinstance(m, _ADAPTABLE):
            raise ValueError(f"{name!r} is not a Linear/Conv2d module of the model")
        d_out = m.weight.shape[0]
        d_in = m.weight[0].numel()  # in_features, or C_in * kh * kw (groups=1)
        total += rank * (d_in + d_out)
    return total


def apply_lora(
    model: nn.Module,
    rank: int,
    target_modules: Sequence[str] | None = None,
    alpha: float | None = None,
    *,
    dropout: float = 0.0,
    modules_to_save: Sequence[str] | None = None,
) -> tuple[nn.Module, int]:
    """Wrap ``model`` with LoRA adapters through ``peft.get_peft_model``.

    ``peft`` injects the adapters into ``model`` in place and freezes every other parameter
    (biases included); keep a ``copy.deepcopy`` first if the base model is needed unchanged.

    Args:
        model: the (pretrained) network.
        rank: LoRA rank r (paper symbol r; compare with DSBP's k). Must be >= 1.
        target_modules: full names of the Linear/Conv2d modules to adapt. Default: all of them
            (:func:`lora_target_names`), i.e. the layers DSBP projects by default, minus
            ``modules_to_save``.
        alpha: LoRA scaling numerator; the update is ``(alpha / r) B A``. Default ``rank``
            (scale 1) [ours: peft's default is 8 whatever the rank].
        dropout: dropout on the adapter input. Default 0.
        modules_to_save: modules trained in full alongside the adapters (e.g. a new classifier
            head ``["fc"]``). Default none.

    Returns:
        ``(peft_model, n_trainable)``: the ``peft.PeftModel`` (call it like ``model``) and its
        number of trainable parameters (``r * (d_in + d_out)`` per adapted layer, plus the
        parameters of ``modules_to_save``).

    Raises:
        ImportError: if ``peft`` is not installed (with the install command).
        ValueError: on ``rank < 1``, an empty target list or a target that is not a
            Linear/Conv2d module.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "LoRA needs the optional 'peft' package: pip install 'dsbp[lora]' (or pip install peft)"
        ) from err
    if int(rank) != rank or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    save = list(modules_to_save or [])
    if target_modules is None:
        target_modules = lora_target_names(model, exclude=save)
    targets = list(target_modules)
    if not targets:
        raise ValueError("apply_lora: target_modules is empty")
    lora_param_count(model, int(rank), targets)  # validates every name
    config = LoraConfig(
        r=int(rank),
        # peft annotates lora_alpha as int but scales by lora_alpha / r, so a float works
        lora_alpha=float(rank if alpha is None else alpha),  # type: ignore[arg-type]
        lora_dropout=dropout,
        target_modules=targets,
        modules_to_save=save or None,
        bias="none",
    )
    peft_model = get_peft_model(model, config)
    n_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return peft_model, n_trainable
