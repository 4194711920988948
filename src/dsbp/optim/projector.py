"""SpectralProjector: DSBP's gradient projection as a hook-based preconditioner.

It edits each weight's ``.grad`` in place, so it works with any optimizer (the K-FAC pattern):

    proj = SpectralProjector(model, rank=10, interval=100)
    loss.backward(); proj.project_(); opt.step()

What it projects is a *weight*: every parameter that a weight adapter
(:mod:`dsbp.layers.adapters`) can read as a (d_out, d_in) matrix with activation rows: Linear,
Conv1d/2d/3d, MultiheadAttention, transformers' Conv1D, and any layer a user registers. The basis
belongs to the parameter, so a weight shared by several modules has one basis from all their rows.

One step, read top to bottom in :meth:`project_`:

1. capture (forward hooks, :meth:`_capture`): on steps where a weight's refresh is due (or its
   refresh policy asks), at most ``max_rows`` activation rows per use;
2. refresh (:meth:`refresh_`): due weights recompute their top eigenvectors from those rows with
   a warm-started block power iteration (METHOD.md §1; :meth:`_solve` is the one eigensolver);
3. project: every weight's gradient becomes the DSBP direction through the single update
   function :func:`dsbp.core.projection.dsbp_update_`, per weight (``path="loop"``), on stacks of
   same-shaped weights (``"stacked"``) or replayed as one CUDA graph (``"graph"``).

Three small objects change the behaviour without subclassing: a covariance estimator (what the
eigenvectors are of: the batch's ``A^T A`` by default, an EMA in the adaptive extension), a
refresh policy (when a weight refreshes and what rows between refreshes do: drift probes, Lie
tracking), and a communicator (:mod:`dsbp.optim.comm`: sums, broadcasts and weight shards across
processes).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dsbp.core.covariance import covariance, gram_matvec, subsample_rows, trace_of_covariance
from dsbp.core.eigen import Matvec, block_power_iteration, top_eigh
from dsbp.core.projection import SIDES, dsbp_update_
from dsbp.layers import adapters
from dsbp.layers.hooks import (
    FoundWeight,
    WeightUse,
    register_weak_hooks,
    remove_handles,
    scan,
    state_name,
)
from dsbp.layers.lowrank import LowRankBackward, low_rank_backward
from dsbp.layers.state import ParamState
from dsbp.optim.comm import Communicator, is_dtensor
from dsbp.optim.graphed import ProjectionGraph, basis_tags, same_tags

OVERRIDABLE = ("rank", "interval", "sharpness")
PATHS = ("auto", "loop", "stacked", "graph")
LARGE_SKIP_SHARE = 0.1  # warn at construction when skipped weights hold this share of parameters


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _sharpness(value: Any) -> float:
    value = float(value)
    if not value >= 0.0 or value == float("inf"):
        raise ValueError(f"sharpness (beta) must be a finite number >= 0, got {value!r}")
    return value


# ---------------------------------------------------------------------- composable pieces
@dataclass
class Operator:
    """The symmetric PSD operator a refresh takes eigenvectors of: ``matvec`` (V -> C V, also
    on stacks), ``dense`` (the explicit matrix, for an exact solve at small d) and its trace."""

    matvec: Matvec
    dense: Callable[[], torch.Tensor]
    trace: torch.Tensor


class CovarianceEstimator:
    """What a refresh's eigenvectors are of. This one: the captured batch's ``C = A^T A``.

    Subclasses (the EMA of :mod:`dsbp.extensions.inference`) override :meth:`operator`;
    ``batchable = False`` keeps the per-weight refresh for them.
    """

    batchable = True

    def operator(self, proj: SpectralProjector, st: ParamState, A: torch.Tensor) -> Operator:
        return Operator(gram_matvec(A), lambda: covariance(A), trace_of_covariance(A))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Mapping) -> None:
        pass


class RefreshPolicy:
    """When a weight refreshes, and what rows captured between refreshes are for.

    This one: a refresh every ``interval`` steps, nothing between. The adaptive extension probes
    drift between refreshes (and refreshes early); the Lie extension tracks the basis.
    """

    refresh_without_grad = False  # refresh weights that got no gradient this step (frozen)

    def wants_rows(self, proj: SpectralProjector, st: ParamState) -> bool:
        """Whether the forward hooks capture ``st``'s rows on this step."""
        return st.due(proj.step)

    def between_refreshes(self, proj: SpectralProjector, st: ParamState,
                          A: torch.Tensor) -> bool:
        """Rows ``A`` captured on a step when ``st`` has a basis and no refresh is due. Return
        True to refresh now from them."""
        return False

    def after_refresh(self, proj: SpectralProjector, st: ParamState,
                      old_block: torch.Tensor | None, early: bool) -> None:
        """Called after every completed refresh (``early``: requested by
        :meth:`between_refreshes`)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Mapping) -> None:
        pass


# ---------------------------------------------------------------------- the projector
class SpectralProjector:
    """Projects each weight's gradient onto the top-k eigenvectors of its activation covariance.

    Args:
        model: the network; every weight a weight adapter handles is a candidate.
        rank: k, eigenvectors kept per weight (the paper: 10). Clipped to the width d.
        interval: p, steps between eigen-refreshes (the paper: 100).
        power_iters: block power iterations per refresh, warm-started (the paper: 5).
        side: ``"output"`` (the paper's shapes: covariance of the layer's outputs, ``E E^T G``)
            or ``"input"`` (covariance of its inputs / im2col patches, ``G E E^T``).
        sharpness: beta, the weight of the sharpness term
            ``beta * (lambda_1 / trace C) * e1 e1^T W`` [ours: normalised eigenvalue]; 0: none.
        max_rows: at most this many activation rows per weight enter a refresh (subsampled
            without replacement by a private, seeded RNG).
        layers: names of the weights (``"fc1"``, ``"attn.in_proj_weight"``) or modules to
            project; ``None``: every weight an adapter handles.
        params: the parameters this projector may touch (an optimizer's); ``None``: all.
        oversample: extra block columns beyond k, never used in the projection. [ours]
        exact_threshold: a weight's first refresh uses ``eigh`` of the explicit covariance when
            d <= this, else ``cold_iters`` power iterations from a random block. [ours]
        cold_iters: power iterations for a cold start with d > exact_threshold.
        seed: seeds the private RNG used for row subsampling and cold starts.
        eig_dtype: precision of the covariance products and eigensolves (METHOD.md: fp32).
        overrides: per-weight ``{name: {"rank": .., "interval": .., "sharpness": ..}}``.
        residual: alpha in [0, 1], the weight kept on the plain gradient,
            ``G~ = P G + alpha (G - P G)``. [ours]
        rescale: rescale the projected part to the gradient's norm (at most ``max_rescale``
            times). [ours]
        warmup: steps at the start with unprojected gradients (bases refresh on schedule). [ours]
        energy: adaptive rank: keep the smallest r <= rank whose eigenvalues hold this fraction
            of ``trace(C)`` (None: always ``rank``). [ours]
        exclude: weight or module names to leave out (e.g. the stem and the classifier).
        skip_first_last: leave out the first and the last projected weight (in model order).
        path: how a step's projections run, all through the same update function: ``"loop"``
            (one weight at a time: the CPU default and the reference), ``"stacked"`` (same-shaped
            weights in batched products, and batched warm refreshes), ``"graph"`` (stacked, and
            replayed as one CUDA graph: the CUDA default), or ``"auto"``.
        backward: ``"full"`` (autograd's weight gradient, then the projection) or
            ``"lowrank"``: Linear weights get their gradient already projected by the backward
            pass, from the layer's output gradient and input through thin products
            (:mod:`dsbp.layers.lowrank`; the d_out x d_in gradient product is never done), on
            every step except refresh steps (which take the full gradient, so the result equals
            ``"full"`` step for step). Needs the pure projection (``residual=0``, no rescale)
            and the default estimator and policy; other weights use the full backward. [ours]
        estimator, policy, comm: the covariance estimator, refresh policy and communicator
            (module docstring); defaults: batch covariance, fixed interval, one process.

    Raises:
        ValueError / TypeError: bad settings, unknown or unprojectable layer names, a model with
            nothing to project, sharded parameters without a distributed communicator.
    """

    MAX_GRAPH_BUILDS = 8  # a signature that keeps changing: stop capturing, stay on "stacked"

    def __init__(
        self,
        model: nn.Module,
        rank: int = 10,
        interval: int = 100,
        power_iters: int = 5,
        side: str = "output",
        sharpness: float = 0.1,
        max_rows: int = 8192,
        layers: Iterable[str] | None = None,
        *,
        params: Iterable[torch.Tensor] | None = None,
        oversample: int = 8,
        exact_threshold: int = 2048,
        cold_iters: int = 30,
        seed: int = 0,
        eig_dtype: torch.dtype = torch.float32,
        overrides: Mapping[str, Mapping] | None = None,
        residual: float = 0.0,
        rescale: bool = False,
        max_rescale: float = 10.0,
        warmup: int = 0,
        energy: float | None = None,
        exclude: Iterable[str] | None = None,
        skip_first_last: bool = False,
        path: str = "auto",
        backward: str = "full",
        estimator: CovarianceEstimator | None = None,
        policy: RefreshPolicy | None = None,
        comm: Communicator | None = None,
    ) -> None:
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        if backward not in ("full", "lowrank"):
            raise ValueError(f"backward must be 'full' or 'lowrank', got {backward!r}")
        if backward == "lowrank" and (residual or rescale or estimator is not None
                                      or policy is not None):
            raise ValueError("backward='lowrank' computes the pure projection in the backward "
                             "pass: it needs residual=0, rescale=False and the default "
                             "estimator and policy")
        self.rank = _positive_int("rank", rank)
        self.interval = _positive_int("interval", interval)
        self.power_iters = _positive_int("power_iters", power_iters)
        self.cold_iters = _positive_int("cold_iters", cold_iters)
        self.max_rows = _positive_int("max_rows", max_rows)
        if isinstance(oversample, bool) or not isinstance(oversample, int) or oversample < 0:
            raise ValueError(f"oversample must be an integer >= 0, got {oversample!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
        if eig_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"eig_dtype must be torch.float32 or torch.float64, got {eig_dtype}")
        if not 0.0 <= float(residual) <= 1.0:
            raise ValueError(f"residual (alpha) must be in [0, 1], got {residual!r}")
        if not float(max_rescale) >= 1.0:
            raise ValueError(f"max_rescale must be >= 1, got {max_rescale!r}")
        if energy is not None and not 0.0 < float(energy) <= 1.0:
            raise ValueError(f"energy must be in (0, 1] or None, got {energy!r}")
        self.sharpness = _sharpness(sharpness)
        self.side, self.seed, self.model, self.path = side, int(seed), model, path
        self.oversample, self.exact_threshold = oversample, int(exact_threshold)
        self.eig_dtype, self.warmup = eig_dtype, warmup
        self.residual, self.rescale = float(residual), bool(rescale)
        self.max_rescale = float(max_rescale)
        self.energy = None if energy is None else float(energy)
        self.estimator = estimator or CovarianceEstimator()
        self.policy = policy or RefreshPolicy()
        self.comm = comm or Communicator()
        self.step = 0
        self._graph: ProjectionGraph | None = None
        self._graph_builds = 0
        self._warned: set[tuple[str, str]] = set()
        self._stack_cache: dict[tuple, tuple] = {}
        self._nonfinite: tuple[tuple[str, ...], torch.Tensor] | None = None  # unread GPU counts

        found = scan(model, side)
        owned = None if params is None else {id(p) for p in params}
        if owned is not None:
            found = [f for f in found if id(f.param) in owned]
        self.comm.check_params(f.param for f in found)
        self.skipped: dict[str, str] = {}
        self._skipped_dims = {f.name: f.param.dim() for f in found}
        chosen = self._choose(found, layers, exclude, skip_first_last)
        if not chosen:
            raise ValueError(f"{type(model).__name__} has no weight DSBP can project"
                             + (f" (skipped: {self.skipped})" if self.skipped else ""))
        self._states: dict[str, ParamState] = {}
        for i, f in enumerate(chosen):
            self._states[f.name] = ParamState(
                name=f.name, param=f.param, uses=f.uses, index=i, side=side, rank=self.rank,
                interval=self.interval, sharpness=self.sharpness)
        self._by_param = {id(s.param): s for s in self._states.values()}
        self._sharded = any(is_dtensor(s.param) for s in self._states.values())
        for name, ov in (overrides or {}).items():
            self.configure(name, **ov)
        self._warn_large_skips(found)
        self._uses_by_module: dict[int, list[tuple[ParamState, WeightUse]]] = {}
        modules: dict[int, nn.Module] = {}
        for st in self._states.values():
            for use in st.uses:
                self._uses_by_module.setdefault(id(use.module), []).append((st, use))
                modules[id(use.module)] = use.module
        self._handles = register_weak_hooks(self, "_capture", list(modules.items()))
        self._lowrank = [self._attach_lowrank(st) for st in self._states.values()
                         if backward == "lowrank" and len(st.uses) == 1
                         and type(st.module) is nn.Linear and not is_dtensor(st.param)]

    # ------------------------------------------------------------------ which weights
    def _choose(self, found: list[FoundWeight], layers: Iterable[str] | None,
                exclude: Iterable[str] | None, skip_first_last: bool) -> list[FoundWeight]:
        """The weights to project; every other owned weight goes to ``self.skipped``."""
        def names_of(f: FoundWeight) -> set[str]:  # the weight's own name and its modules'
            return {f.name} | {u.module_name for u in f.uses} | {
                state_name(f"{u.module_name}.{u.attr}") for u in f.uses}

        known = set().union(*(names_of(f) for f in found)) if found else set()
        modules = dict(self.model.named_modules())
        for label, names in (("layers", layers), ("exclude", exclude)):
            unknown = sorted(set(names or ()) - known)
            for n in unknown if label == "layers" else ():
                if n in modules:
                    raise ValueError(f"layers names {n!r}, which cannot be projected: "
                                     f"{adapters.why_not(modules[n], self.side)}")
            if unknown:
                hint = ", ".join(f.name for f in found if f.uses and f.reason is None)
                raise ValueError(f"{label} names {unknown}, which are not weights or layers of "
                                 f"the model; projectable weights: {hint[:400]}")
        if layers is not None:
            wanted = set(layers)
            if not wanted:
                raise ValueError("layers=[] selects nothing; pass None to project every weight")
            for f in found:
                if names_of(f) & wanted and f.reason is not None:
                    raise ValueError(f"layers names {f.name!r}, which cannot be projected: "
                                     f"{f.reason}")
        candidates = []
        for f in found:
            if f.reason is not None:
                self.skipped[f.name] = f.reason
            elif layers is not None and not names_of(f) & set(layers):
                self.skipped[f.name] = "not in layers="
            elif names_of(f) & set(exclude or ()):
                self.skipped[f.name] = "excluded (exclude=)"
            else:
                candidates.append(f)
        if skip_first_last and candidates:
            for f in (candidates[0], candidates[-1]):
                self.skipped[f.name] = "first or last weight (skip_first_last=True)"
            candidates = candidates[1:-1]
        return candidates

    def _warn_large_skips(self, found: list[FoundWeight]) -> None:
        chosen = set(self._states)
        deliberate = ("not in layers=", "excluded (exclude=)", "first or last")
        total = sum(f.param.numel() for f in found) or 1
        big = [(f.name, f.param.numel() / total) for f in found if f.name not in chosen
               and f.param.dim() >= 2 and not self.skipped[f.name].startswith(deliberate)
               and f.param.numel() / total >= LARGE_SKIP_SHARE]
        for name, share in big:
            warnings.warn(f"DSBP leaves weight {name!r} ({share:.0%} of the parameters) "
                          f"unprojected: {self.skipped[name]}", UserWarning, stacklevel=4)

    def summary(self) -> str:
        """One line per weight the projector was given: projected (side, rank, interval) or
        skipped with the reason; biases and norm scales (1-D) are counted on one line."""
        lines = []
        for st in self._states.values():
            d_out, d_in = st.shape
            uses = ", ".join(f"{u.module_name or '<root>'}:{type(u.module).__name__}"
                             for u in st.uses)
            lines.append(f"{st.name or '<root>':<36} projected  {st.side} side, rank {st.rank}, "
                         f"interval {st.interval}, sharpness {st.sharpness:g}, "
                         f"{d_out}x{d_in} [{uses}]")
        vectors = 0
        for name, why in self.skipped.items():
            if self._skipped_dims.get(name, 2) < 2:
                vectors += 1
            else:
                lines.append(f"{name or '<root>':<36} skipped    {why}")
        if vectors:
            lines.append(f"{'(biases, norm scales)':<36} skipped    {vectors} tensors with fewer "
                         "than 2 dims: not weight matrices")
        return "\n".join(lines)

    def configure(self, name: str, **settings: Any) -> None:
        """Override ``rank``, ``interval`` and/or ``sharpness`` for one weight (by name).
        A new rank takes effect at that weight's next refresh."""
        st = self._state(name)
        unknown = set(settings) - set(OVERRIDABLE)
        if unknown:
            raise ValueError(f"unknown per-weight setting(s) {sorted(unknown)}; "
                             f"allowed: {OVERRIDABLE}")
        if "rank" in settings:
            st.rank = _positive_int("rank", settings["rank"])
        if "interval" in settings:
            st.interval = _positive_int("interval", settings["interval"])
        if "sharpness" in settings:
            st.sharpness = _sharpness(settings["sharpness"])

    # ------------------------------------------------------------------ read access
    def layer_names(self) -> list[str]:
        """Names of the projected weights, in model order."""
        return list(self._states)

    def states(self) -> list[ParamState]:
        """The :class:`ParamState` of every projected weight, in model order."""
        return list(self._states.values())

    def layer_state(self, key: nn.Module | torch.Tensor | str) -> ParamState:
        """The :class:`ParamState` of one weight: by name, parameter, or a module with one
        projected weight."""
        return self._state(key)

    def state_of(self, param: torch.Tensor) -> ParamState | None:
        """The state of parameter ``param`` (None: not projected)."""
        return self._by_param.get(id(param))

    def basis(self, key: nn.Module | torch.Tensor | str) -> torch.Tensor:
        """The weight's basis ``E`` (d, k): top-k eigenvectors of its activation covariance."""
        st = self._state(key)
        if st.block is None:
            raise RuntimeError(f"weight {st.name!r} has no basis yet: no refresh has run")
        return st.basis

    def eigenvalues(self, key: nn.Module | torch.Tensor | str) -> torch.Tensor:
        """The weight's top-k eigenvalues (k,), descending (of ``C`` on captured rows)."""
        st = self._state(key)
        if st.eigenvalues is None:
            raise RuntimeError(f"weight {st.name!r} has no eigenvalues yet: no refresh has run")
        return st.eigenvalues[: st.k]

    def num_refreshes(self, key: nn.Module | torch.Tensor | str | None = None) -> int:
        """Eigensolves done for one weight, or summed over all."""
        if key is None:
            return sum(s.refreshes for s in self._states.values())
        return self._state(key).refreshes

    def refresh_due(self) -> bool:
        """Whether any weight captures activations on the current step."""
        return any(self.policy.wants_rows(self, s) for s in self._states.values())

    def _state(self, key: nn.Module | torch.Tensor | str) -> ParamState:
        if isinstance(key, str):
            if key in self._states:
                return self._states[key]
            hits = [s for s in self._states.values() if any(u.module_name == key for u in s.uses)]
        elif isinstance(key, torch.Tensor):
            st = self._by_param.get(id(key))
            hits = [] if st is None else [st]
        else:
            hits = [s for s in self._states.values() if any(u.module is key for u in s.uses)]
        if len(hits) == 1:
            return hits[0]
        label = key if isinstance(key, str) else type(key).__name__
        if len(hits) > 1:
            raise KeyError(f"{label!r} has several projected weights "
                           f"{[s.name for s in hits]}: name one")
        raise KeyError(f"{label!r} is not one of the projected weights: {list(self._states)}")

    # ------------------------------------------------------------------ lifecycle
    def remove(self) -> None:
        """Remove every forward hook and free captured rows (the projector stops capturing)."""
        remove_handles(self._handles)
        self._handles = []
        for h in self._lowrank:
            h.remove()
        self._lowrank = []
        for st in self._states.values():
            st.rows, st.captures = [], 0

    def __deepcopy__(self, memo: dict) -> SpectralProjector:
        raise TypeError("a SpectralProjector is bound to its model by forward hooks and cannot "
                        "be copied; build a new one on the copied model and load_state_dict()")

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("a SpectralProjector cannot be pickled (it holds hooks on its model); "
                        "save state_dict() instead")

    def _attach_lowrank(self, st: ParamState) -> LowRankBackward:
        """Give ``st``'s Linear a backward that returns the projected weight gradient, with the
        basis read at each forward (held weakly, like the hooks)."""
        ref = weakref.ref(self)

        def basis() -> torch.Tensor | None:
            proj = ref()
            if proj is None or st.block is None or st.due(proj.step) or proj.step < proj.warmup:
                return None  # no basis, a refresh step (full gradient), or warm-up
            st.in_span_step = proj.step
            return st.basis

        return low_rank_backward(st.module, basis, side=st.side)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ 1. capture
    def _generator(self, st: ParamState, salt: int) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed((self.seed * 1_000_003 + self.step * 7919 + st.index * 104_729 + salt)
                      % (2**62))
        return g

    def _capture(self, key: int, module: nn.Module, args: tuple, kwargs: dict,
                 output: Any) -> None:
        """Forward hook: rows of each weight this module uses, when their policy wants them."""
        if not (module.training and torch.is_grad_enabled()):
            return
        for st, use in self._uses_by_module.get(key, ()):
            if not self.policy.wants_rows(self, st):
                continue
            gen = self._generator(st, 1 + st.captures)
            budget = self.comm.row_budget(self.max_rows)
            A = use.adapter.rows(module, use.attr, args, kwargs, output, st.side, budget, gen)
            if A is None:
                continue
            st.rows.append(A)
            st.captures += 1
            if sum(r.shape[0] for r in st.rows) > 2 * budget:  # gradient accumulation
                st.rows = [subsample_rows(torch.cat(st.rows), budget, gen)]

    # ------------------------------------------------------------------ 2. refresh
    def _warn(self, st: ParamState, key: str, msg: str) -> None:
        """Warn once per weight and condition, until a refresh succeeds again."""
        if (st.name, key) in self._warned:
            return
        self._warned.add((st.name, key))
        warnings.warn(f"DSBP weight {st.name!r}, step {self.step}: {msg}", RuntimeWarning,
                      stacklevel=4)

    def _take_rows(self, st: ParamState) -> torch.Tensor:
        """The captured rows as one (n, d) matrix in ``eig_dtype`` (subsampled to the budget)."""
        rows, st.rows, st.captures = st.rows, [], 0
        if not rows:
            return torch.zeros(0, st.dim, dtype=self.eig_dtype, device=st.param.device)
        A = torch.cat(rows).to(self.eig_dtype)
        return subsample_rows(A, self.comm.row_budget(self.max_rows), self._generator(st, 0))

    def _health(self, items: list[tuple[ParamState, torch.Tensor, torch.Tensor | None]]
                ) -> list[bool]:
        """Whether each refresh may go ahead: one host synchronisation (and one collective)
        for all of them. Per item the counts (no rows, non-finite activations, non-finite
        gradient) and the trace, summed over ranks so that every rank takes the same branch."""
        dev = items[0][1].device
        dt = torch.float32 if dev.type == "mps" else torch.float64
        counts = []
        for _, A, g in items:
            # a NaN or inf anywhere makes a sum non-finite: one reduction per tensor instead of
            # an elementwise isfinite pass (an overflowing sum is refused as well)
            tr = trace_of_covariance(A).to(dt)
            bad_g = (torch.zeros((), device=dev, dtype=dt) if g is None else
                     (~torch.isfinite(self.comm.local(g).sum())).to(device=dev, dtype=dt))
            counts.append(torch.stack([
                torch.tensor(float(A.shape[0] == 0), device=dev, dtype=dt),
                (~torch.isfinite(tr)).to(dt), bad_g, torch.nan_to_num(tr, nan=0.0, posinf=0.0)]))
        table = self.comm.all_reduce_sum(torch.stack(counts)).tolist()
        ok = []
        for (st, _, _), (missing, bad_a, bad_g, tr) in zip(items, table, strict=True):
            if missing > 0:
                self._warn(st, "no-rows", "refresh due but no activations were captured (was "
                           "the forward pass run in train mode with grad enabled?); keeping the "
                           "old basis")
            elif bad_a > 0:
                self._warn(st, "bad-rows", "non-finite activations (or a sum of squares that "
                           "overflows); refresh skipped, old basis kept")
            elif bad_g > 0:
                self._warn(st, "bad-grad", "non-finite gradient; refresh skipped, old basis kept")
            elif not tr > 0:
                self._warn(st, "zero-rows", "all captured activations are zero; refresh "
                           "skipped")
            else:
                ok.append(True)
                continue
            ok.append(False)
        return ok

    def block_width(self, st: ParamState) -> int:
        """Columns of the power-iteration block: k plus the oversampling, at most d."""
        d = st.dim
        return min(d, min(st.rank, d) + self.oversample)

    def is_warm(self, st: ParamState) -> bool:
        return st.block is not None and tuple(st.block.shape) == (st.dim, self.block_width(st))

    def _distributed(self, op: Operator) -> Operator:
        """The global operator: each rank's products summed (``C = sum_r A_r^T A_r``)."""
        comm = self.comm
        return Operator(lambda V: comm.all_reduce_sum(op.matvec(V)),
                        lambda: comm.all_reduce_sum(op.dense()), op.trace)

    def _solve(self, sts: list[ParamState], op: Operator) -> tuple[torch.Tensor, torch.Tensor]:
        """Top eigenpairs: warm-started power iteration from the current blocks (also for a
        stack of same-shaped weights), else an exact ``eigh`` when d is small, else a seeded
        cold start. The one eigensolver of the project."""
        st = sts[0]
        if self.is_warm(st):
            blocks = [s.block for s in sts if s.block is not None]
            V0 = torch.stack(blocks) if len(blocks) > 1 else blocks[0]
            return block_power_iteration(op.matvec, V0.to(self.eig_dtype), self.power_iters)
        b = self.block_width(st)
        if st.dim <= self.exact_threshold:
            return top_eigh(op.dense(), b)
        V0 = torch.randn(st.dim, b, generator=self._generator(st, 0), dtype=self.eig_dtype)
        return block_power_iteration(op.matvec, V0.to(st.param.device), self.cold_iters)

    def _commit(self, st: ParamState, V: torch.Tensor, evals: torch.Tensor,
                trace: torch.Tensor, early: bool = False) -> None:
        """Store a new basis (rank 0's, bit-identical everywhere) and do the bookkeeping."""
        old = st.block
        V, evals = self.comm.broadcast_(V.contiguous()), self.comm.broadcast_(evals.contiguous())
        st.block, st.eigenvalues, st.trace = V, evals, trace
        if self.energy is not None:
            frac = torch.cumsum(evals.clamp(min=0), 0) / trace
            r = int(torch.searchsorted(frac, frac.new_tensor(self.energy - 1e-12)).item()) + 1
            st.k_active = max(1, min(r, st.rank, V.shape[1]))
        st.refreshes += 1
        st.last_refresh = self.step
        self._warned = {w for w in self._warned if w[0] != st.name}
        self.policy.after_refresh(self, st, old, early)

    def set_basis(self, st: ParamState, V: torch.Tensor, evals: torch.Tensor,
                  trace: torch.Tensor) -> None:
        """Replace a weight's basis between refreshes (Lie tracking); not counted as a refresh."""
        st.block, st.eigenvalues, st.trace = V, evals, trace

    def _refresh_one(self, st: ParamState, A: torch.Tensor, early: bool = False) -> None:
        with torch.autocast(device_type=A.device.type, enabled=False):
            if not self._health([(st, A, st.param.grad)])[0]:
                return
            op = self._distributed(self.estimator.operator(self, st, A))
            evals, V = self._solve([st], op)
            self._commit(st, V, evals, self.comm.all_reduce_sum(op.trace.clone()), early)

    def _refresh_stacked(self, items: list[tuple[ParamState, torch.Tensor]]) -> None:
        """Warm refreshes of many weights: one host synchronisation for all their health
        checks, one stacked power iteration per group of equal shapes. [ours]"""
        with torch.autocast(device_type=items[0][1].device.type, enabled=False):
            health = self._health([(st, A, st.param.grad) for st, A in items])
            groups: dict[tuple, list[tuple[ParamState, torch.Tensor]]] = {}
            for (st, A), ok in zip(items, health, strict=True):
                if ok:  # the key is the same on every rank (row counts may differ)
                    groups.setdefault((st.dim, self.block_width(st)), []).append((st, A))
            for group in groups.values():
                sts = [st for st, _ in group]
                n = max(A.shape[0] for _, A in group)  # zero rows leave A^T A unchanged
                As = torch.stack([torch.nn.functional.pad(A, (0, 0, 0, n - A.shape[0]))
                                  for _, A in group])
                op = self._distributed(CovarianceEstimator().operator(self, sts[0], As))
                evals, V = self._solve(sts, op)
                for j, (st, A) in enumerate(group):
                    self._commit(st, V[j], evals[j], self.comm.all_reduce_sum(
                        trace_of_covariance(A)))

    def refresh_(self) -> list[tuple[ParamState, torch.Tensor | None]]:
        """Refresh every weight whose refresh is due (and that has a gradient, unless the
        policy says otherwise); hand rows captured between refreshes to the policy.

        Returns ``(state, old basis E or None)`` for every weight whose basis changed (what
        SubspaceAdam re-projects its moments with).
        """
        if not any(st.rows or st.due(self.step) for st in self._states.values()):
            return []
        before = {st.name: (st.refreshes, None if st.block is None else st.basis)
                  for st in self._states.values()}
        stacked: list[tuple[ParamState, torch.Tensor]] = []
        for st in self._states.values():
            if st.param.grad is None and not self.policy.refresh_without_grad:
                continue  # no backward reached it: nothing to project, the refresh stays due
            if st.rows and st.block is not None and not st.due(self.step):
                A = self._take_rows(st)
                if self.policy.between_refreshes(self, st, A):
                    self._refresh_one(st, A, early=True)
            elif st.due(self.step):
                A = self._take_rows(st)
                if self._use_stacks(st) and self.is_warm(st):
                    stacked.append((st, A))
                else:
                    self._refresh_one(st, A)
        if stacked:
            self._refresh_stacked(stacked)
        return [(st, before[st.name][1]) for st in self._states.values()
                if st.refreshes != before[st.name][0]]

    @torch.no_grad()
    def refresh_now(self) -> None:
        """Refresh every weight that has captured rows, without projecting or stepping.

        For bases outside a training step (transfer sources, trained models): run forward passes
        in train mode while a refresh is due (a new projector is due at once), then call this.
        """
        for st in self._states.values():
            if st.rows:
                self._refresh_one(st, self._take_rows(st))

    # ------------------------------------------------------------------ 3. project
    def _resolved_path(self, device: torch.device) -> str:
        if self.path != "auto":
            return self.path
        if device.type != "cuda":
            return "loop"
        # row-sharded weights reduce inside the projection: keep collectives out of a graph
        return "stacked" if self._sharded else "graph"

    def _use_stacks(self, st: ParamState) -> bool:
        return self._resolved_path(st.param.device) != "loop" and self.estimator.batchable

    def _update(self, G: torch.Tensor, E: torch.Tensor, st: ParamState, W: torch.Tensor | None,
                scale: torch.Tensor | float, host_check: bool) -> torch.Tensor:
        """The one update (:func:`dsbp_update_`) with this projector's switches and shards."""
        sharded = is_dtensor(st.param)
        return dsbp_update_(G, E, st.side, W=W, scale=scale, residual=self.residual,
                            rescale=self.rescale, max_rescale=self.max_rescale,
                            row_sum=self.comm.sum_over_row_shards if sharded else None,
                            host_check=host_check)

    def _local_basis(self, st: ParamState) -> torch.Tensor:
        """E, or on the output side of a row-sharded weight the rows this rank holds."""
        E = st.basis
        return E[self.comm.row_slice(st.param)] if st.side == "output" else E

    def _project_loop(self, sts: list[ParamState]) -> list[torch.Tensor]:
        oks = []
        for st in sts:
            g = self.comm.local(st.grad)
            G = st.matrix(g)  # a view of .grad, unless .grad's layout needs a copy
            W = st.matrix(self.comm.local(st.param.detach())) if st.sharpness else None
            oks.append(self._update(G, self._local_basis(st), st, W, st.sharpness_scale(),
                                    host_check=G.device.type == "cpu"))
            st.write_matrix(g, G)
        return oks

    def _stacked_basis(self, sts: list[ParamState]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked bases (B, d, k) and sharpness scales (B,), rebuilt after refreshes."""
        key = tuple(st.name for st in sts)
        tag = basis_tags(sts)
        hit = self._stack_cache.get(key)
        if hit is None or not same_tags(hit[0], tag):
            Es = torch.stack([self._local_basis(st) for st in sts])
            s = torch.stack([st.sharpness_scale() for st in sts]).to(Es.dtype)
            hit = self._stack_cache[key] = (tag, Es, s)
        return hit[1], hit[2]

    def update_stack_(self, sts: list[ParamState], G: torch.Tensor, E: torch.Tensor,
                      s: torch.Tensor) -> torch.Tensor:
        """Overwrite a stack of gradients ``G`` (B, d_out, d_in) of the weights ``sts`` with
        their DSBP directions (shared by the stacked path and the CUDA graph)."""
        W = (torch.stack([st.matrix(self.comm.local(st.param.detach())) for st in sts])
             if any(st.sharpness for st in sts) else None)
        return self._update(G, E, sts[0], W, s, host_check=False)

    def _project_stacked(self, groups: list[list[ParamState]]) -> list[torch.Tensor]:
        oks = []
        for sts in groups:
            E, s = self._stacked_basis(sts)
            grads = [self.comm.local(st.grad) for st in sts]
            G = torch.stack([st.matrix(g) for st, g in zip(sts, grads, strict=True)]).to(E.dtype)
            oks.append(self.update_stack_(sts, G, E, s))
            for st, g, Gi in zip(sts, grads, G.unbind(0), strict=True):
                st.write_matrix(g, Gi, copy=True)
        return oks

    def _project_graphed(self, groups: list[list[ParamState]]) -> list[torch.Tensor] | None:
        """Every group in one replay of a captured CUDA graph (:mod:`dsbp.optim.graphed`);
        None, having done nothing, where that does not apply."""
        if torch.cuda.is_current_stream_capturing():
            return None  # the caller is capturing a graph of its own: stay plain
        sig = (self.residual, self.rescale, self.max_rescale, tuple(
            tuple((st.name, tuple(st.param.shape), st.side, st.k, st.sharpness != 0.0,
                   st.block.dtype if st.block is not None else None, st.param.data_ptr())
                  for st in g) for g in groups))
        if self._graph is None or self._graph.signature != sig:
            if self._graph_builds >= self.MAX_GRAPH_BUILDS:
                return None
            self._graph_builds += 1
            try:
                graph = ProjectionGraph(groups, sig, self._local_basis, self.comm.local,
                                        self.update_stack_)
                graph.capture()
            except RuntimeError as err:  # capture unsupported here: stacked from now on
                warnings.warn(f"DSBP: CUDA-graph capture of the projection failed ({err}); "
                              "projecting eagerly", RuntimeWarning, stacklevel=3)
                self.path, self._graph = "stacked", None
                return None
            self._graph = graph
        return self._graph.replay()

    def _report_nonfinite(self, sts: list[ParamState], oks: list[torch.Tensor],
                          read_now: bool) -> None:
        """Count steps with a non-finite gradient per weight (left unprojected) and warn. On a
        CPU the flags are read every step; on a GPU they are summed on the device (one add per
        step) and read on refresh steps only, or when the set of weights changes."""
        bad = (~torch.cat([o.reshape(-1) for o in oks])).to(torch.int64)
        names = tuple(st.name for st in sts)
        if self._nonfinite is not None:
            old_names, old = self._nonfinite
            self._nonfinite = None
            if old_names == names:
                bad = bad + old
            else:
                self._warn_nonfinite(old_names, old)
        if read_now:
            self._warn_nonfinite(names, bad)
        else:
            self._nonfinite = (names, bad)

    def _warn_nonfinite(self, names: tuple[str, ...], counts: torch.Tensor) -> None:
        if not bool(counts.any()):
            return
        for name, n in zip(names, counts.tolist(), strict=True):
            if n:
                warnings.warn(f"DSBP weight {name!r}: non-finite gradient on {n} step(s) up "
                              f"to step {self.step}; left unprojected (as the base optimizer "
                              "would see it)", RuntimeWarning, stacklevel=5)

    @torch.no_grad()
    def project_(self) -> None:
        """One DSBP step on every projected gradient, in place; advances the step counter.

        ``G <- E E^T G + beta * lam_hat * e1 e1^T W`` (output side) or
        ``G <- G E E^T + beta * lam_hat * W e1 e1^T`` (input side), ``lam_hat = lambda_1 /
        trace(C)``, with the residual / rescale switches. Due refreshes run first. Weights
        without a basis yet are left as they are; weights without a gradient are skipped (their
        refresh waits for a step that has one). With mixed precision call it on *unscaled*
        gradients (``scaler.unscale_(opt)`` first).
        """
        refreshed = self.refresh_()
        if self.step >= self.warmup:
            live = [st for st in self._states.values()
                    if st.param.grad is not None and st.block is not None]
            if live:
                self._project(live, read_now=bool(refreshed) or
                              live[0].param.device.type == "cpu")
        self.end_step()

    def _project(self, live: list[ParamState], read_now: bool) -> None:
        # a low-rank backward already projected these: only the sharpness term
        in_span = [st for st in live if st.in_span_step == self.step]
        oks = [dsbp_update_(st.matrix(st.grad), st.basis, st.side, in_span=True,
                            W=st.matrix(st.param.detach()) if st.sharpness else None,
                            scale=st.sharpness_scale()) for st in in_span]
        live = [st for st in live if st.in_span_step != self.step]
        path = self._resolved_path(live[0].param.device) if live else "loop"
        if path == "loop":
            sts, oks = in_span + live, oks + self._project_loop(live)
        else:
            groups: dict[tuple, list[ParamState]] = {}
            for st in live:
                g, blk = st.grad, st.basis
                key = (tuple(g.shape), g.dtype, g.device, st.side, st.k, blk.dtype)
                groups.setdefault(key, []).append(st)
            grouped = list(groups.values())
            sts = [st for g in grouped for st in g]
            graphed = self._project_graphed(grouped) if path == "graph" else None
            oks += graphed if graphed is not None else self._project_stacked(grouped)
            sts = in_span + sts
        self._report_nonfinite(sts, oks, read_now)

    def end_step(self) -> None:
        """Close a step: advance the counter (for optimizers that refresh with
        :meth:`refresh_` and apply the update themselves, such as SubspaceAdam)."""
        self.step += 1

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Tensors and plain numbers only, so ``torch.load(weights_only=True)`` reads it."""
        return {"step": self.step, "side": self.side,
                "layers": {n: s.to_dict() for n, s in self._states.items()},
                "estimator": self.estimator.state_dict(), "policy": self.policy.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore bases, eigenvalues, per-weight settings and the step counter, after checking
        all of it (names, shapes, ranks, finiteness, required keys) against this projector."""
        if not isinstance(state, Mapping) or "layers" not in state or "step" not in state:
            raise ValueError("not a SpectralProjector state dict: needs 'step' and 'layers', "
                             f"got {sorted(state) if isinstance(state, Mapping) else state!r}")
        if state.get("side", self.side) != self.side:
            raise ValueError(f"state was saved with side={state['side']!r}, "
                             f"this projector uses side={self.side!r}")
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        saved = set(state["layers"])
        if saved != set(self._states):
            raise ValueError(f"state has weights {sorted(saved - set(self._states))} this "
                             f"projector lacks and lacks {sorted(set(self._states) - saved)}")
        for n, d in state["layers"].items():
            st = self._states[n]
            st.check_dict(d, self.block_width(st) if d.get("rank") == st.rank else st.dim)
        for n, d in state["layers"].items():
            self._states[n].load_dict(d)
        self.estimator.load_state_dict(state.get("estimator", {}))
        self.policy.load_state_dict(state.get("policy", {}))
        self.step = int(step)
        self._graph = None  # new bases: a graph is captured again on the next step
