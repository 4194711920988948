"""Finding the weights DSBP can project, and removable forward hooks that hold their owner weakly.

:func:`scan` walks a model once and sorts every parameter into *projectable* (each use of it is
handled by a weight adapter) or *skipped*, with the reason. A parameter used by several modules
(weight tying, a module called twice) keeps one entry with all its uses, so its basis comes from
the rows of every use pooled.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from dsbp.layers.adapters import (
    WeightAdapter,
    adapter_for,
    is_supported,
    parametrized_reason,
    resolve,
)


@dataclass(frozen=True, eq=False)
class WeightUse:
    """One place a weight is used: ``module`` runs it through ``adapter`` as ``attr``."""

    module: nn.Module
    module_name: str
    adapter: WeightAdapter
    attr: str


@dataclass(eq=False)
class FoundWeight:
    """A parameter and every use of it (``reason`` says why it is skipped, None if not)."""

    name: str
    param: nn.Parameter
    uses: list[WeightUse] = field(default_factory=list)
    reason: str | None = None


def state_name(param_name: str) -> str:
    """The name DSBP gives a weight: its parameter name less a trailing ``.weight``
    (``fc1.weight`` -> ``fc1``; a root layer's ``weight`` -> ``""``; ``attn.in_proj_weight``
    stays), so a weight's name is its module's name wherever the module has one weight."""
    if param_name == "weight":
        return ""
    return param_name[: -len(".weight")] if param_name.endswith(".weight") else param_name


def scan(model: nn.Module, side: str) -> list[FoundWeight]:
    """Every parameter of ``model``, in model order, with its adapter uses or skip reason."""
    param_names = {id(p): n for n, p in model.named_parameters()}
    found: dict[int, FoundWeight] = {}
    unhandled: dict[int, list[str]] = {}
    handled: set[tuple[int, str]] = set()
    claimed: set[int] = set()

    def entry(p: nn.Parameter) -> FoundWeight:
        if id(p) not in found:
            found[id(p)] = FoundWeight(state_name(param_names.get(id(p), "?")), p)
        return found[id(p)]

    modules = list(model.named_modules())
    for mname, m in modules:
        if id(m) in claimed:
            continue
        adapter = adapter_for(m)
        if adapter is None:
            continue
        claimed.update(id(c) for c in adapter.children(m))
        for attr in adapter.weights(m):
            owner, leaf = resolve(m, attr)
            if parametrized_reason(m, attr) is not None:
                continue
            p = getattr(owner, leaf)
            if p is None:
                continue
            handled.add((id(owner), leaf))
            e = entry(p)
            e.uses.append(WeightUse(m, mname, adapter, attr))
            reason = adapter.skip_reason(m, attr, side)
            if reason is not None and e.reason is None:
                e.reason = reason
    for mname, m in modules:
        for leaf, p in m._parameters.items():
            if p is None or (id(m), leaf) in handled:
                continue
            entry(p)
            unhandled.setdefault(id(p), []).append(_why_unhandled(m, mname, leaf, p.dim()))
    for pid, e in found.items():
        why = unhandled.get(pid)
        if why and e.uses:
            users = ", ".join(f"{u.module_name} ({type(u.module).__name__})" for u in e.uses)
            e.reason = f"tied: used by {users} and as {why[0]}; left unprojected"
        elif why:
            e.reason = why[0]
    order = {id(p): i for i, (_, p) in enumerate(model.named_parameters())}
    return sorted(found.values(), key=lambda e: order.get(id(e.param), len(order)))


def _why_unhandled(m: nn.Module, mname: str, leaf: str, ndim: int) -> str:
    where = f"{mname + '.' if mname else ''}{leaf} of {type(m).__name__}"
    if isinstance(m, parametrize.ParametrizationList):
        return f"{where}: original of a parametrized weight, not projected"
    adapter = adapter_for(m)
    if adapter is None:
        return f"{where}, which no weight adapter handles"
    for attr in adapter.weights(m):
        reason = parametrized_reason(m, attr)
        if reason is not None:
            return f"{where}: {reason}"
    if ndim >= 2:
        return f"{where}: not one of the weights its adapter projects"
    return f"{where}: not a weight matrix (bias, norm or scale)"


def select_layers(model: nn.Module, names: Iterable[str] | None) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs of plain Linear / Conv2d layers, or exactly ``names`` (for the
    extensions that read ``module.weight`` directly).

    Raises:
        ValueError: a name that does not exist or names an unsupported module, or a model with
            no supported layer at all.
    """
    modules = dict(model.named_modules())
    supported = [(n, m) for n, m in modules.items() if is_supported(m)]
    if names is None:
        if not supported:
            raise ValueError(f"{type(model).__name__} has no nn.Linear or nn.Conv2d layer")
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


class WeakHook:
    """A forward hook that calls ``owner.method(...)`` while ``owner`` lives, and nothing after.

    The hook holds its owner weakly, so an optimizer that is deleted leaves no reference behind
    on the model (``register_weak_hooks`` also removes the hooks when the owner is collected).
    """

    def __init__(self, owner: Any, method: str, key: Any) -> None:
        self.ref = weakref.ref(owner)
        self.method, self.key = method, key

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        owner = self.ref()
        if owner is not None:
            getattr(owner, self.method)(self.key, module, args, kwargs, output)


def register_weak_hooks(owner: Any, method: str, modules: Iterable[tuple[Any, nn.Module]]
                        ) -> list[RemovableHandle]:
    """One :class:`WeakHook` (with the call's keyword arguments) per ``(key, module)``; the
    handles are removed when ``owner`` is garbage-collected."""
    handles = [m.register_forward_hook(WeakHook(owner, method, key), with_kwargs=True)
               for key, m in modules]
    weakref.finalize(owner, remove_handles, list(handles))
    return handles


def remove_handles(handles: Iterable[RemovableHandle]) -> None:
    for h in handles:
        h.remove()


def register_forward_hooks(layers: Iterable[nn.Module], hook: Callable) -> list[RemovableHandle]:
    """``module.register_forward_hook(hook)`` on each layer; keep the handles to remove them."""
    return [m.register_forward_hook(hook) for m in layers]
