"""Selecting the layers DSBP acts on, and removable forward hooks on them."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn
from torch.utils.hooks import RemovableHandle

from dsbp.layers.adapters import is_supported


def select_layers(model: nn.Module, names: Iterable[str] | None) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs DSBP acts on: every Linear / Conv2d, or exactly ``names``.

    Raises:
        ValueError: a name that does not exist, names an unsupported module, or a model with
            no supported layer at all.
    """
    modules = dict(model.named_modules())
    supported = [(n, m) for n, m in modules.items() if is_supported(m)]
    if names is None:
        if not supported:
            raise ValueError(
                f"{type(model).__name__} has no nn.Linear or nn.Conv2d layer: DSBP has nothing to "
                "project"
            )
        return supported
    names = list(names)
    if not names:
        raise ValueError("layers=[] selects no layer; pass None to use every Linear/Conv2d")
    out = []
    for n in names:
        if n not in modules:
            hint = ", ".join(s for s, _ in supported[:8])
            raise ValueError(f"layers names {n!r}, which is not a module of the model; "
                             f"supported layers include: {hint}")
        if not is_supported(modules[n]):
            raise ValueError(f"layers names {n!r}, a {type(modules[n]).__name__}; "
                             "only nn.Linear and nn.Conv2d are supported")
        out.append((n, modules[n]))
    return out


def register_forward_hooks(
    layers: Iterable[nn.Module], hook: Callable
) -> list[RemovableHandle]:
    """``module.register_forward_hook(hook)`` on each layer; keep the handles to remove them."""
    return [m.register_forward_hook(hook) for m in layers]
