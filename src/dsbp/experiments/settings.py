"""Typed parsing of the settings given on the command line (``--set KEY=VALUE``,
``--ablate KEY=V1,V2``): every key must exist, every value must have its key's type and range.

A key is a :class:`~dsbp.experiments.config.RunConfig` field (``lr``, ``epochs``, ``augment``,
``track``...) or a method setting (``rank``, ``rho``, ``residual``...) read by at least one
method of the grid (``MethodSpec.settings``). The grid's own axes (``dataset``, ``method``,
``seed``) have their own flags and are refused here. Values are parsed strictly:

- integers and numbers: ``int`` / ``float`` syntax (``lr=abc`` is an error, not a string);
- booleans: ``true/false``, ``yes/no``, ``1/0`` (any case); anything else is an error
  (``nesterov=no`` turns Nesterov momentum *off*);
- ``none`` / ``null`` where the key admits None;
- ``track``: comma-separated tracker names, each checked against the tracker registry.

A method setting with no entry in :data:`SETTING_TYPES` (e.g. one a plugin registers) is parsed
as JSON (numbers, ``true`` / ``false``, ``null``), else kept as a string; booleans are strict.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from dsbp.experiments.config import AMP_MODES, CONFIG_FIELDS, SCHEDULES

# The grid's axes: given by their own flags, never by --set / --ablate.
GRID_AXES = {"dataset": "--datasets", "method": "--methods", "seed": "--seeds / --first-seed"}

_TRUE = ("true", "yes", "1")
_FALSE = ("false", "no", "0")


def parse_bool(text: str | bool, key: str = "value") -> bool:
    """``true/yes/1`` -> True, ``false/no/0`` -> False (any case); else ``ValueError``."""
    if isinstance(text, bool):
        return text
    t = str(text).strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise ValueError(f"{key} must be a boolean (true/false, yes/no, 1/0), got {text!r}")


@dataclass(frozen=True)
class SettingType:
    """How one setting's text is parsed and checked.

    Attributes:
        kind: ``int``, ``float``, ``bool``, ``str``, ``choice``, ``names`` (comma list) or
            ``json`` (a JSON object / list).
        low, high: inclusive bounds of a number (None: unbounded).
        low_open: the lower bound is exclusive (``> low``).
        optional: ``none`` / ``null`` gives None.
        choices: allowed strings of a ``choice``.
        what: how the range reads in an error (e.g. ``"in [0, 1]"``).
    """

    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    optional: bool = False
    choices: tuple[str, ...] = ()
    what: str = ""

    def parse(self, key: str, text: Any) -> Any:
        """The value of ``text`` (a string from the command line, or an already typed value)."""
        if self.optional and (text is None or str(text).strip().lower() in ("none", "null")):
            return None
        if self.kind == "bool":
            return parse_bool(text, key)
        if self.kind in ("int", "float"):
            return self._number(key, text)
        if self.kind == "choice":
            if str(text) not in self.choices:
                raise ValueError(f"{key} must be one of {', '.join(self.choices)}, got {text!r}")
            return str(text)
        if self.kind == "names":
            items = list(text) if isinstance(text, (list, tuple)) else \
                [t.strip() for t in str(text).split(",") if t.strip()]
            return tuple(items)
        if self.kind == "json":
            if not isinstance(text, str):
                return text
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                raise ValueError(f"{key} must be JSON (e.g. {{\"width\": 16}}), got {text!r}"
                                 ) from None
        if not str(text):
            raise ValueError(f"{key} must not be empty")
        return str(text)

    def _number(self, key: str, text: Any) -> int | float:
        noun = "an integer" if self.kind == "int" else "a number"
        if isinstance(text, bool):
            raise ValueError(f"{key} must be {noun}, got {text!r}")
        try:
            v: int | float = int(text) if self.kind == "int" else float(text)
        except (TypeError, ValueError):
            raise ValueError(f"{key} must be {noun}{' ' + self.what if self.what else ''}, "
                             f"got {text!r}") from None
        if self.kind == "int" and isinstance(text, float) and text != v:
            raise ValueError(f"{key} must be an integer, got {text!r}")
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{key} must be a finite number, got {text!r}")
        too_low = self.low is not None and (v <= self.low if self.low_open else v < self.low)
        too_high = self.high is not None and v > self.high
        if too_low or too_high:
            raise ValueError(f"{key} must be {noun} {self.what}, got {text!r}")
        return v


def _int(low: int | None = 1, optional: bool = False) -> SettingType:
    return SettingType("int", low=low, optional=optional,
                       what=f">= {low}" if low is not None else "")


def _float(low: float | None = None, high: float | None = None, low_open: bool = False,
           optional: bool = False) -> SettingType:
    lo = "" if low is None else (f"> {low:g}" if low_open else f">= {low:g}")
    if low is not None and high is not None:
        what = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
    else:
        what = lo or (f"<= {high:g}" if high is not None else "")
    return SettingType("float", low=low, high=high, low_open=low_open, optional=optional,
                       what=what)


# RunConfig fields (RunConfig.validate checks them again, after every change).
CONFIG_TYPES: dict[str, SettingType] = {
    "model": SettingType("str"), "device": SettingType("str"),
    "epochs": _int(1), "batch_size": _int(1), "log_every": _int(1),
    "checkpoint_every": _int(0),
    "lr": _float(0.0, low_open=True), "momentum": _float(0.0, 1.0),
    "weight_decay": _float(0.0), "warmup_frac": _float(0.0, 1.0),
    "label_smoothing": _float(0.0, 1.0),
    "nesterov": SettingType("bool"), "augment": SettingType("bool"),
    "subset": _int(1, optional=True), "eval_subset": _int(1, optional=True),
    "val_split": _int(1, optional=True),
    "schedule": SettingType("choice", choices=SCHEDULES),
    "amp": SettingType("choice", choices=AMP_MODES),
    "data_root": SettingType("str", optional=True),
    "track": SettingType("names"),
    "model_kwargs": SettingType("json"), "method_kwargs": SettingType("json"),
}

# Method settings of the registered methods (dsbp.experiments.build and methods_*.py).
SETTING_TYPES: dict[str, SettingType] = {
    # DSBP and its variants (dsbp.optim.SpectralProjector)
    "rank": _int(1), "interval": _int(1), "power_iters": _int(1), "sharpness": _float(0.0),
    "max_rows": _int(1), "residual": _float(0.0, 1.0), "rescale": SettingType("bool"),
    "max_rescale": _float(0.0, low_open=True), "warmup": _int(0),
    "energy": _float(0.0, 1.0, low_open=True, optional=True),
    "skip_first_last": SettingType("bool"),
    # SAM
    "rho": _float(0.0), "adaptive": SettingType("bool"),
    # AdamW
    "betas": SettingType("json"),
    # LoRA
    "alpha": _float(0.0, low_open=True),
    # Dom / Bulk / interpolated SGD
    "k": _int(1), "lanczos_iters": _int(1), "a": _float(), "b": _float(),
    # adaptive / Lie DSBP
    "p_min": _int(1), "p_max": _int(1), "tau": _float(0.0, 1.0, low_open=True),
    "grow": _float(1.0, low_open=True), "probe_every": _int(1), "probe_iters": _int(1),
    "ema_dense_max": _int(1), "lie_step": _float(0.0), "track_every": _int(1),
    # transfer
    "side": SettingType("choice", choices=("output", "input")), "mu": _float(0.0),
}


def register_setting(name: str, kind: SettingType) -> None:
    """Declare the type of a method setting a plugin reads (so ``--set`` checks it)."""
    SETTING_TYPES[name] = kind


def _loose(key: str, text: Any) -> Any:
    """A setting of unknown type: JSON scalars, strict booleans, else the string."""
    if not isinstance(text, str):
        return text
    t = text.strip()
    if t.lower() in _TRUE[:2] or t.lower() in _FALSE[:2]:
        return parse_bool(t, key)
    try:
        return json.loads(t)
    except json.JSONDecodeError:
        return t


def check_key(key: str, flag: str, methods: Sequence[str]) -> None:
    """``ValueError`` unless ``key`` is a config field or a setting of one of ``methods``;
    the grid axes are refused with the flag that sets them; a typo gets a suggestion."""
    from dsbp.experiments.build import METHODS, get_method

    if key in GRID_AXES:
        raise ValueError(f"{flag} {key}=...: {key} is an axis of the grid; use "
                         f"{GRID_AXES[key]} instead")
    if key in CONFIG_FIELDS:
        return
    specs = [get_method(m) for m in methods]
    if any(key in s.settings for s in specs):
        return
    readers = sorted(m for m, s in METHODS.items() if key in s.settings)
    if readers:
        raise ValueError(f"{flag} {key}=...: no method of this grid ({', '.join(methods)}) "
                         f"reads {key!r}; methods that read it: {', '.join(readers)}")
    known = sorted((set(CONFIG_FIELDS) - set(GRID_AXES))
                   | {k for s in specs for k in s.settings})
    close = difflib.get_close_matches(key, known, n=3)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise ValueError(f"{flag} {key}=...: unknown setting {key!r}{hint} (config fields and "
                     f"the settings of {', '.join(methods)}: {', '.join(known)})")


def parse_setting(key: str, text: Any, flag: str = "--set") -> Any:
    """The typed value of ``key`` from its command-line text (see the module docstring)."""
    kind = CONFIG_TYPES.get(key) or SETTING_TYPES.get(key)
    try:
        value = kind.parse(key, text) if kind is not None else _loose(key, text)
    except ValueError as err:
        raise ValueError(f"{flag} {key}={text}: {err}") from None
    if key == "track":
        check_trackers(value, flag)
    return value


def check_trackers(names: Iterable[str], flag: str = "--track") -> None:
    """``ValueError`` listing the unknown tracker names (as words) and the known ones."""
    from dsbp.experiments.track import TRACKERS

    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(f"{flag}: unknown tracker(s) {', '.join(unknown)}; known: "
                         f"{', '.join(sorted(TRACKERS))}")


def split_assignment(item: str, flag: str) -> tuple[str, str]:
    """``"KEY=VALUE"`` -> ``("KEY", "VALUE")``; ``ValueError`` without ``=`` or a key."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"{flag} expects KEY=VALUE, got {item!r}")
    return key.strip(), value.strip()


def parse_assignments(items: Iterable[str], methods: Sequence[str],
                      flag: str = "--set") -> dict[str, Any]:
    """``["lr=0.1", "rank=4"]`` -> ``{"lr": 0.1, "rank": 4}``, each key checked against the
    grid's methods and each value typed; a key given again overrides the earlier value (a
    script's base settings, then one configuration's)."""
    out: dict[str, Any] = {}
    for item in items:
        key, text = split_assignment(item, flag)
        check_key(key, flag, methods)
        out[key] = parse_setting(key, text, flag)
    return out


def parse_ablations(specs: Iterable[str], methods: Sequence[str]) -> dict[str, list[Any]]:
    """``["rank=2,5"]`` -> ``{"rank": [2, 5]}`` (keys and values checked as for ``--set``)."""
    out: dict[str, list[Any]] = {}
    for spec in specs:
        key, text = split_assignment(spec, "--ablate")
        check_key(key, "--ablate", methods)
        if key in out:
            raise ValueError(f"--ablate {key} given twice")
        if key == "track":
            raise ValueError("--ablate track=...: trackers are not an ablation; use --track")
        vals = [parse_setting(key, v.strip(), "--ablate") for v in text.split(",") if v.strip()]
        if not vals:
            raise ValueError(f"--ablate expects KEY=V1,V2,..., got {spec!r}")
        out[key] = vals
    return out


__all__ = ["CONFIG_TYPES", "GRID_AXES", "SETTING_TYPES", "SettingType", "check_key",
           "check_trackers", "parse_ablations", "parse_assignments", "parse_bool",
           "parse_setting", "register_setting", "split_assignment"]
