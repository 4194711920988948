"""SpectralProjector: DSBP's gradient projection as a hook-based preconditioner.

It edits each weight's ``.grad`` in place, so it works with any optimizer (the K-FAC pattern):

    proj = SpectralProjector(model, rank=10, interval=100)
    loss.backward(); proj.project_(); opt.step()

Per step it costs two thin matrix products per layer, O(k d_out d_in). Every ``interval`` steps
(a *refresh*), forward hooks capture at most ``max_rows`` activation rows per layer and a
warm-started block power iteration updates the top-k eigenvectors of the activation
covariance (METHOD.md §1). Between refreshes the hooks capture nothing.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from dsbp.core.covariance import covariance, gram_matvec, subsample_rows, trace_of_covariance
from dsbp.core.eigen import block_power_iteration, top_eigh
from dsbp.core.projection import SIDES, project, sharpness_term
from dsbp.layers import adapters
from dsbp.layers.hooks import register_forward_hooks, select_layers
from dsbp.layers.state import LayerState
from dsbp.optim.graphed import ProjectionGraph, basis_tags, same_tags, signature

_OVERRIDABLE = ("rank", "interval", "sharpness")


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_sharpness(value) -> float:
    value = float(value)
    if not value >= 0.0 or value != value or value == float("inf"):
        raise ValueError(f"sharpness (beta) must be a finite number >= 0, got {value!r}")
    return value


class SpectralProjector:
    """Projects each layer's weight gradient onto the top-k eigenvectors of its activation
    covariance.

    Args:
        model: the network; hooks go on its ``nn.Linear`` and ``nn.Conv2d`` layers.
        rank: k, eigenvectors kept per layer (the paper: 10). Clipped to the layer width d.
        interval: p, steps between eigen-refreshes (the paper: 100).
        power_iters: block power iterations per refresh, warm-started (the paper: 5).
        side: ``"output"`` (the paper's shapes: covariance of the layer's outputs, ``E E^T G``)
            or ``"input"`` (covariance of its inputs / im2col patches, ``G E E^T``).
        sharpness: beta, the weight of the sharpness term
            ``beta * (lambda_1 / trace C) * e1 e1^T W`` [ours: normalised eigenvalue];
            0 disables it.
        max_rows: at most this many activation rows per layer enter a refresh (subsampled
            without replacement by a private, seeded RNG).
        layers: module names to act on; ``None`` means every Linear / Conv2d.
        oversample: extra block columns beyond k; they speed up and stabilise power iteration
            and are never used in the projection. [ours]
        exact_threshold: on a layer's first refresh (no basis to warm-start from) the top
            eigenvectors come from ``torch.linalg.eigh`` of the explicit d x d covariance when
            d <= this, else from ``cold_iters`` power iterations on a random block. [ours]
        cold_iters: power iterations for a cold start with d > exact_threshold.
        seed: seeds the private RNG used for row subsampling and cold starts.
        eig_dtype: precision of the covariance products and eigensolves (METHOD.md: fp32).
            ``torch.float64`` resolves nearly degenerate spectra at a higher refresh cost.
        overrides: per-layer ``{name: {"rank": .., "interval": .., "sharpness": ..}}``.
        residual: alpha in [0, 1], the weight of the complement: ``G~ = P G + alpha (G - P G)``.
            0 is the paper's DSBP; 1 is the plain gradient (plus the sharpness term). [ours:
            a damped step outside the subspace, as Fira and Bulk-SGD suggest]
        rescale: rescale the projected part to the gradient's Frobenius norm,
            ``P G * ||G|| / ||P G||`` (at most ``max_rescale`` times), so the projection changes
            the direction of the step but not its length. [ours]
        max_rescale: cap on that factor (guards layers whose gradient is nearly orthogonal to
            the subspace).
        warmup: steps at the start with unprojected gradients (bases still refresh on schedule,
            so they are warm when projection starts). [ours]
        energy: adaptive rank: at each refresh a layer keeps the smallest r <= rank whose top-r
            eigenvalues hold this fraction of ``trace(C)`` (None: always ``rank``). [ours]
        exclude: module names to leave out (e.g. the stem and the classifier).
        skip_first_last: leave out the first and the last supported layer (in module order).
        cuda_graph: on a GPU, capture the projection of a step once as a CUDA graph and
            replay it (one launch instead of ~6 per group of layers; see
            :mod:`dsbp.optim.graphed`). It is captured again when the layers, shapes, ranks or
            weight storage change, and skipped where the caller is capturing a graph itself.
            [ours]

    Raises:
        ValueError: rank/interval/power_iters/max_rows not positive, an unknown side, a
            negative sharpness, a model without supported layers, or an unknown layer name.
    """

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
        cuda_graph: bool = True,
    ) -> None:
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        self.rank = _check_positive_int("rank", rank)
        self.interval = _check_positive_int("interval", interval)
        self.power_iters = _check_positive_int("power_iters", power_iters)
        self.max_rows = _check_positive_int("max_rows", max_rows)
        self.cold_iters = _check_positive_int("cold_iters", cold_iters)
        if isinstance(oversample, bool) or not isinstance(oversample, int) or oversample < 0:
            raise ValueError(f"oversample must be an integer >= 0, got {oversample!r}")
        self.oversample, self.exact_threshold = oversample, int(exact_threshold)
        self.sharpness = _check_sharpness(sharpness)
        self.side, self.seed, self.model = side, int(seed), model
        if eig_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"eig_dtype must be torch.float32 or torch.float64, got {eig_dtype}")
        self.eig_dtype = eig_dtype
        if not 0.0 <= float(residual) <= 1.0:
            raise ValueError(f"residual (alpha) must be in [0, 1], got {residual!r}")
        if not float(max_rescale) >= 1.0:
            raise ValueError(f"max_rescale must be >= 1, got {max_rescale!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
        if energy is not None and not 0.0 < float(energy) <= 1.0:
            raise ValueError(f"energy must be in (0, 1] or None, got {energy!r}")
        self.residual, self.rescale, self.max_rescale = float(residual), bool(rescale), float(
            max_rescale)
        self.warmup = warmup
        self.energy = None if energy is None else float(energy)
        self.cuda_graph = bool(cuda_graph)
        self._graph: ProjectionGraph | None = None
        self._graph_builds = 0
        self.step = 0

        self._layers: dict[str, LayerState] = {}
        chosen = select_layers(model, layers)
        excluded = set(exclude or ())
        unknown = excluded - {n for n, _ in select_layers(model, None)}
        if unknown:
            raise ValueError(f"exclude names {sorted(unknown)}, which are not Linear/Conv2d "
                             "layers of the model")
        if skip_first_last:
            excluded |= {chosen[0][0], chosen[-1][0]}
        chosen = [(n, m) for n, m in chosen if n not in excluded]
        if not chosen:
            raise ValueError("every supported layer is excluded: DSBP has nothing to project")
        for i, (name, module) in enumerate(chosen):
            adapters.check_module(module, side, name)
            self._layers[name] = LayerState(
                name=name, module=module, index=i, side=side,
                rank=self.rank, interval=self.interval, sharpness=self.sharpness,
            )
        self._by_module = {id(s.module): s for s in self._layers.values()}
        for name, ov in (overrides or {}).items():
            self.configure(name, **ov)
        self._handles = register_forward_hooks(
            [s.module for s in self._layers.values()], self._capture
        )

    # ------------------------------------------------------------------ configuration
    def configure(self, name: str, **settings) -> None:
        """Override ``rank``, ``interval`` and/or ``sharpness`` for one layer (by module name).

        A new rank takes effect at that layer's next refresh.
        """
        st = self._state(name)
        unknown = set(settings) - set(_OVERRIDABLE)
        if unknown:
            raise ValueError(f"unknown per-layer setting(s) {sorted(unknown)}; "
                             f"allowed: {_OVERRIDABLE}")
        if "rank" in settings:
            st.rank = _check_positive_int("rank", settings["rank"])
        if "interval" in settings:
            st.interval = _check_positive_int("interval", settings["interval"])
        if "sharpness" in settings:
            st.sharpness = _check_sharpness(settings["sharpness"])

    def layer_names(self) -> list[str]:
        """Names of the modules DSBP acts on, in model order."""
        return list(self._layers)

    def layer_state(self, module_or_name: nn.Module | str) -> LayerState:
        """The :class:`LayerState` of one layer (for diagnostics and extensions)."""
        return self._state(module_or_name)

    def basis(self, module_or_name: nn.Module | str) -> torch.Tensor:
        """The layer's basis ``E`` (d, k): top-k eigenvectors of its activation covariance."""
        st = self._state(module_or_name)
        if st.block is None:
            raise RuntimeError(f"layer {st.name!r} has no basis yet: no refresh has run")
        return st.block[:, : st.k]

    def eigenvalues(self, module_or_name: nn.Module | str) -> torch.Tensor:
        """The layer's top-k eigenvalues (k,), descending (of ``C = A^T A`` on captured rows)."""
        st = self._state(module_or_name)
        if st.eigenvalues is None:
            raise RuntimeError(f"layer {st.name!r} has no eigenvalues yet: no refresh has run")
        return st.eigenvalues[: st.k]

    def num_refreshes(self, module_or_name: nn.Module | str | None = None) -> int:
        """Eigensolves done for one layer, or summed over all layers."""
        if module_or_name is None:
            return sum(s.refreshes for s in self._layers.values())
        return self._state(module_or_name).refreshes

    def refresh_due(self) -> bool:
        """Whether any layer refreshes on the current step (its activations are being captured)."""
        return any(s.due(self.step) for s in self._layers.values())

    def _state(self, key: nn.Module | str) -> LayerState:
        if isinstance(key, str):
            if key not in self._layers:
                raise KeyError(f"{key!r} is not one of the projector's layers: "
                               f"{list(self._layers)}")
            return self._layers[key]
        st = self._by_module.get(id(key))
        if st is None:
            raise KeyError(f"{type(key).__name__} module is not one of the projector's layers")
        return st

    # ------------------------------------------------------------------ hooks
    def _generator(self, st: LayerState, salt: int) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed((self.seed * 1_000_003 + self.step * 7919 + st.index * 104_729 + salt)
                      % (2**62))
        return g

    def _wants_rows(self, st: LayerState) -> bool:
        """Whether the forward hook captures ``st``'s activations on this step: on refresh
        steps here; subclasses that also read rows between refreshes (probes, basis tracking)
        widen it."""
        return st.due(self.step)

    def _capture(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        st = self._by_module[id(module)]
        if not self._wants_rows(st):
            return
        gen = self._generator(st, 1 + st.captures)
        st.rows.append(adapters.rows(module, inputs[0], output, st.side, self.max_rows, gen))
        st.captures += 1
        if sum(r.shape[0] for r in st.rows) > 2 * self.max_rows:  # gradient accumulation
            st.rows = [subsample_rows(torch.cat(st.rows), self.max_rows, gen)]

    def remove(self) -> None:
        """Remove the forward hooks (the projector stops capturing activations)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # ------------------------------------------------------------------ refresh
    def _warn(self, st: LayerState, msg: str) -> None:
        warnings.warn(f"DSBP layer {st.name!r}, step {self.step}: {msg}", RuntimeWarning,
                      stacklevel=3)

    def _eigensolve(self, st: LayerState, A: torch.Tensor, b: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-b eigenpairs of ``A^T A``: warm-started power iteration, exact/cold on first use."""
        if st.block is not None and st.block.shape == (A.shape[1], b):
            return block_power_iteration(gram_matvec(A), st.block, self.power_iters)
        if A.shape[1] <= self.exact_threshold:
            return top_eigh(covariance(A), b)
        V0 = torch.randn(A.shape[1], b, generator=self._generator(st, 0), dtype=A.dtype)
        V0 = V0.to(A.device)
        return block_power_iteration(gram_matvec(A), V0, self.cold_iters)

    def _refresh(self, st: LayerState, grad: torch.Tensor | None) -> None:
        """Recompute one layer's basis from its captured rows (or keep it, with a warning).

        Three steps a subclass can override one at a time: :meth:`_checked_trace` (is this
        refresh healthy? the distributed projector agrees on it across ranks),
        :meth:`_eigensolve`, and :meth:`_commit` (the bookkeeping, shared by all).
        """
        rows, st.rows, st.captures = st.rows, [], 0
        dev = st.module.weight.device
        with torch.autocast(device_type=dev.type, enabled=False):
            if rows:
                A = torch.cat(rows).to(self.eig_dtype)
                A = subsample_rows(A, self.max_rows, self._generator(st, 0))
            else:
                d = adapters.dim(st.module, st.side)
                A = torch.zeros(0, d, dtype=self.eig_dtype, device=dev)
            tr = self._checked_trace(st, A, grad)
            if tr is None:
                return
            evals, V = self._eigensolve(st, A, self._block_width(st, A.shape[1]))
        self._commit(st, V, evals, tr)

    def _refresh_due(self, due: list[tuple[LayerState, torch.Tensor]]) -> None:
        """Refresh every due layer: warm-started layers of equal shapes in one batched power
        iteration where that applies (:meth:`_refresh_batched`), the others one by one."""
        if not self._batch_refresh_applies(due[0][1]):
            for st, g in due:
                self._refresh(st, g)
            return
        warm, rest = [], []
        for st, g in due:
            d = adapters.dim(st.module, st.side)
            ok = st.rows and st.block is not None and st.block.shape == (
                d, self._block_width(st, d))
            (warm if ok else rest).append((st, g))
        for st, g in rest:  # cold starts (exact eigh) and refreshes without rows: as before
            self._refresh(st, g)
        if warm:
            self._refresh_batched(warm)

    def _block_width(self, st: LayerState, d: int) -> int:
        """Columns of the power-iteration block: k plus the oversampling, at most d."""
        return min(d, min(st.rank, d) + self.oversample)

    def _batch_refresh_applies(self, g: torch.Tensor) -> bool:
        """Batched refreshes on a GPU (per-layer work there is kernel launches and host syncs),
        not on a CPU unless forced (``projector._batch_refresh = True``, as the tests do), and
        only where a subclass has not changed how one layer refreshes. [ours]"""
        base = SpectralProjector
        cls = type(self)
        if (cls._refresh is not base._refresh or cls._eigensolve is not base._eigensolve
                or cls._checked_trace is not base._checked_trace):
            return False
        return getattr(self, "_batch_refresh", g.device.type == "cuda")

    def _refresh_batched(self, warm: list[tuple[LayerState, torch.Tensor]]) -> None:
        """Warm-started refreshes of many layers with one host synchronisation for all their
        health checks, and one block power iteration per group of equal shapes (a (B, n, d)
        stack of captured rows); the same arithmetic as :meth:`_refresh` per layer. [ours]"""
        dev = warm[0][0].module.weight.device
        with torch.autocast(device_type=dev.type, enabled=False):
            As, trs, flags = [], [], []
            for st, g in warm:
                rows, st.rows, st.captures = st.rows, [], 0
                A = subsample_rows(torch.cat(rows).to(self.eig_dtype), self.max_rows,
                                   self._generator(st, 0))
                tr = trace_of_covariance(A)
                As.append(A)
                trs.append(tr)
                flags += self._health_flags(A, tr, g)
            flags = torch.stack(flags).view(len(warm), 4).tolist()  # the one sync
            groups: dict[tuple, list[int]] = {}
            for i, ((st, _), f) in enumerate(zip(warm, flags, strict=True)):
                if self._healthy(st, f):
                    key = (tuple(As[i].shape), tuple(st.block.shape), st.block.dtype)
                    groups.setdefault(key, []).append(i)
            for idx in groups.values():
                A = torch.stack([As[i] for i in idx])
                V0 = torch.stack([warm[i][0].block.to(A.dtype) for i in idx])
                evals, V = block_power_iteration(gram_matvec(A), V0, self.power_iters)
                for j, i in enumerate(idx):
                    self._commit(warm[i][0], V[j], evals[j], trs[i])

    @torch.no_grad()
    def refresh_now(self) -> None:
        """Refresh every layer that has captured rows, from those rows, without projecting.

        For computing bases outside a training step (e.g. source bases for transfer, or bases
        of a trained model): run forward passes in train mode while a refresh is due (a new
        projector is due at once), then call this. The step counter does not move.
        """
        for st in self._layers.values():
            if st.rows:
                self._refresh(st, st.module.weight.grad)

    def _checked_trace(self, st: LayerState, A: torch.Tensor, grad: torch.Tensor | None
                       ) -> torch.Tensor | None:
        """``trace(A^T A)`` if the refresh may go ahead, else None after a warning naming why."""
        if A.shape[0] == 0:
            self._warn(st, "refresh due but no activations were captured (was the "
                       "forward pass run in train mode with grad enabled?); keeping the old basis")
            return None
        # One host synchronisation for all the checks (each bool() on a GPU tensor waits for
        # the device; three per layer and refresh made a ResNet-18 refresh several ms slower).
        tr = trace_of_covariance(A)
        return tr if self._healthy(st, torch.stack(self._health_flags(A, tr, grad)).tolist()) \
            else None

    @staticmethod
    def _health_flags(A: torch.Tensor, tr: torch.Tensor, grad: torch.Tensor | None
                      ) -> list[torch.Tensor]:
        """0-d bool tensors, no host sync: finite activations, finite gradient, finite and
        positive trace (read together by :meth:`_healthy`)."""
        fin_g = (torch.ones((), dtype=torch.bool, device=A.device) if grad is None
                 else torch.isfinite(grad).all().to(A.device))
        return [torch.isfinite(A).all(), fin_g, torch.isfinite(tr), tr > 0]

    def _healthy(self, st: LayerState, flags: list[bool]) -> bool:
        """Whether a refresh may go ahead, from :meth:`_health_flags` read on the host; warns
        with the reason otherwise (the old basis is kept)."""
        fin_a, fin_g, fin_tr, positive = flags
        if not fin_a:
            self._warn(st, "non-finite activations; refresh skipped, old basis kept")
        elif not fin_g:
            self._warn(st, "non-finite gradient; refresh skipped, old basis kept")
        elif not (fin_tr and positive):
            msg = ("all captured activations are zero" if fin_tr
                   else "the activations' sum of squares overflows")
            self._warn(st, f"{msg}; refresh skipped")
        else:
            return True
        return False

    def _commit(self, st: LayerState, V: torch.Tensor, evals: torch.Tensor, tr: torch.Tensor
                ) -> None:
        """Store a new basis and do the per-refresh bookkeeping (energy rank, counters)."""
        st.block, st.eigenvalues, st.trace = V, evals, tr
        if self.energy is not None:
            frac = torch.cumsum(evals.clamp(min=0), 0) / tr
            r = int(torch.searchsorted(frac, frac.new_tensor(self.energy - 1e-12)).item()) + 1
            st.k_active = max(1, min(r, st.rank, V.shape[1]))
        st.refreshes += 1
        st.last_refresh = self.step

    # ------------------------------------------------------------------ the projection
    @torch.no_grad()
    def project_(self) -> None:
        """Project every layer's weight gradient in place and advance the step counter.

        ``G <- E E^T G + beta * lam_hat * e1 e1^T W`` (output side) or
        ``G <- G E E^T + beta * lam_hat * W e1 e1^T`` (input side), with
        ``lam_hat = lambda_1 / trace(C)``. On a refresh step the basis is recomputed first.
        Layers without a basis yet are left untouched; layers without a gradient are skipped
        (their refresh, if due, waits for a step that has one).

        With mixed precision, call it on *unscaled* gradients (``scaler.unscale_(opt)`` first):
        the sharpness term is not scaled by the loss scale.
        """
        if not getattr(self, "_batched", True):
            self._project_loop()
            return
        if self.step < self.warmup:
            self._refresh_only()
            return
        # Fast path [ours]: refresh what is due, then project layers whose gradients share a
        # shape in one batched product (torch.bmm over stacked grads; one kernel per group on a
        # GPU instead of ~4 per layer), with the sharpness term folded into the thin k-dim
        # factor. No .item() or host sync: the step is capturable. The reference loop is
        # ``_project_loop`` (set ``projector._batched = False``); tests/optim/test_fastpath.py
        # checks that both agree.
        groups: dict[tuple, list[LayerState]] = {}
        # no backward reached a layer without a gradient: nothing to project, refresh stays due
        live = [(st, st.module.weight.grad) for st in self._layers.values()
                if st.module.weight.grad is not None]
        due = [(st, g) for st, g in live if st.due(self.step)]
        if due:
            self._refresh_due(due)
        for st, g in live:
            if st.block is None:
                continue
            key = (tuple(g.shape), g.dtype, g.device, st.side, st.k, st.block.dtype)
            if not self._stack_pays(g):
                key += (st.name,)  # a group of one: the fused per-layer product
            groups.setdefault(key, []).append(st)
        if not (groups and self._project_graphed(list(groups.values()))):
            for sts in groups.values():
                if len(sts) == 1:
                    self._project_one(sts[0])
                else:
                    self._project_group(sts)
        self.step += 1

    MAX_GRAPH_BUILDS = 8  # a signature that keeps changing: stop capturing, stay eager

    def _project_graphed(self, groups: list[list[LayerState]]) -> bool:
        """Project every group with one replay of a captured CUDA graph (see
        :mod:`dsbp.optim.graphed`); False, having done nothing, where that does not apply."""
        if not self.cuda_graph or groups[0][0].module.weight.grad.device.type != "cuda":
            return False
        if torch.cuda.is_current_stream_capturing():
            return False  # the caller is capturing a graph of its own: stay plain
        g = self._graph
        if g is None or g.signature != signature(self, groups):
            if self._graph_builds >= self.MAX_GRAPH_BUILDS:
                return False
            self._graph_builds += 1
            try:
                g = ProjectionGraph(self, groups)
                g.capture()
            except RuntimeError as err:  # capture unsupported here: eager from now on
                warnings.warn(f"DSBP: CUDA-graph capture of the projection failed ({err}); "
                              "projecting eagerly", RuntimeWarning, stacklevel=3)
                self.cuda_graph, self._graph = False, None
                return False
            self._graph = g
        g.replay()
        return True

    def _stack_pays(self, g: torch.Tensor) -> bool:
        """Whether stacking this gradient into a batched product is expected to be faster. [ours]

        On a GPU always (one kernel instead of several per layer; launches dominate). On a CPU
        the stacking copies cost more than they save at every size measured (ResNet-18 width
        0.25, ``project_`` alone: stacked 4.2 ms, fused per-layer 2.0 ms; width 1: 1.45x
        slower stacked; benchmarks/projection_only.py), so CPU gradients take the fused
        per-layer path unless they have at most ``_stack_max_numel`` elements (default 0).
        """
        if g.device.type != "cpu":
            return True
        return g.numel() <= getattr(self, "_stack_max_numel", 0)

    def _refresh_only(self) -> None:
        """Warm-up step: refresh the bases that are due, leave every gradient as it is."""
        for st in self._layers.values():
            g = st.module.weight.grad
            if g is not None and st.due(self.step):
                self._refresh(st, g)
        self.step += 1

    def _project_loop(self) -> None:
        """The reference per-layer projection loop (the fast path's parity reference).

        ``G <- alpha G + (1 - alpha) c E E^T G + beta lam_hat e1 e1^T W`` (output side), with
        ``c = min(||G|| / ||E E^T G||, max_rescale)`` if ``rescale`` else 1.
        """
        if self.step < self.warmup:
            self._refresh_only()
            return
        for st in self._layers.values():
            g = st.module.weight.grad
            if g is None:  # no backward reached this layer: nothing to project, refresh stays due
                continue
            if st.due(self.step):
                self._refresh(st, g)
            if st.block is None:
                continue
            G = adapters.as_matrix(g)
            E = st.block[:, : st.k]
            Gc = G.to(E.dtype)
            new = project(Gc, E, st.side)
            if self.rescale:
                c = torch.linalg.matrix_norm(Gc) / torch.linalg.matrix_norm(new).clamp(min=1e-30)
                new.mul_(c.clamp(max=self.max_rescale))
            if self.residual != 0.0:
                new.mul_(1.0 - self.residual).add_(Gc, alpha=self.residual)
            if st.sharpness != 0.0:
                W = adapters.as_matrix(st.module.weight).to(E.dtype)
                lam_hat = st.eigenvalues[0] / st.trace
                new.add_(sharpness_term(W, E[:, 0], lam_hat, st.side), alpha=st.sharpness)
            g.copy_(new.view_as(g))
        self.step += 1

    def _project_one(self, st: LayerState) -> None:
        """One layer, sharpness folded into the thin factor, written into ``.grad`` directly.

        Output side: ``E (E^T G + s e_1 (e1^T W))`` with ``s = beta * lam_hat``, which equals
        ``E E^T G + s e1 e1^T W`` since ``E e_1 = e1`` (``e_1``: first unit vector of R^k).
        Input side: ``(G E + s (W e1) e_1^T) E^T``.
        """
        g = st.module.weight.grad
        G = adapters.as_matrix(g)  # (d_out, d_in), a view of .grad when it is contiguous
        E = st.block[:, : st.k]  # (d, k)
        Gc = G.to(E.dtype)
        output = st.side == "output"
        M = E.T @ Gc if output else Gc @ E  # (k, d_in) or (d_out, k)
        self._scale_thin_factor(M, Gc)
        if st.sharpness != 0.0:
            W = adapters.as_matrix(st.module.weight).to(E.dtype)
            s = st.eigenvalues[0] / st.trace * st.sharpness  # 0-d tensor: no host sync
            if output:
                M[0].add_(s * (E[:, 0] @ W))
            else:
                M[:, 0].add_(s * (W @ E[:, 0]))
        a = self.residual  # G <- a G + E M  (output side), G <- a G + M E^T (input side)
        if Gc.data_ptr() == g.data_ptr() and G.is_contiguous():
            # M no longer reads G, so the product can overwrite the gradient in place
            if a == 0.0:
                torch.mm(E, M, out=G) if output else torch.mm(M, E.T, out=G)
            else:
                G.addmm_(E, M, beta=a) if output else G.addmm_(M, E.T, beta=a)
        else:
            new = E @ M if output else M @ E.T
            if a != 0.0:
                new.add_(Gc, alpha=a)
            g.copy_(new.view_as(g))

    def _scale_thin_factor(self, M: torch.Tensor, Gc: torch.Tensor) -> None:
        """Fold ``(1 - alpha) * c`` into the thin factor ``M = E^T G`` (or ``G E``) in place.

        ``||E E^T G|| = ||E^T G||`` for orthonormal E, so the rescale factor
        ``c = ||G|| / ||P G||`` needs no d x d work and no host sync. M is (k, d_in), (d_out, k),
        or a stack (B, ., .) with Gc stacked alike.
        """
        if self.rescale:
            gn = torch.linalg.matrix_norm(Gc)
            mn = torch.linalg.matrix_norm(M).clamp(min=1e-30)
            c = (gn / mn).clamp(max=self.max_rescale)
            M.mul_(c.unsqueeze(-1).unsqueeze(-1) if M.dim() == 3 else c)
        if self.residual != 0.0:
            M.mul_(1.0 - self.residual)

    def _stacked_basis(self, sts: list[LayerState]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked bases (B, d, k) and sharpness scales (B,) of a group, rebuilt after refreshes."""
        cache = self.__dict__.setdefault("_stack_cache", {})
        key = tuple(st.name for st in sts)
        tag = basis_tags(sts)
        hit = cache.get(key)
        if hit is None or not same_tags(hit[0], tag):
            Es = torch.stack([st.block[:, : st.k] for st in sts])
            s = torch.stack([st.eigenvalues[0] / st.trace * st.sharpness for st in sts])
            hit = cache[key] = (tag, Es, s.to(Es.dtype))
        return hit[1], hit[2]

    def _project_group(self, sts: list[LayerState]) -> None:
        """Same-shaped layers in one batched product (see :meth:`_project_one` for the algebra)."""
        Es, s = self._stacked_basis(sts)  # (B, d, k), (B,)
        grads = [st.module.weight.grad for st in sts]
        Gs = torch.stack([adapters.as_matrix(g) for g in grads]).to(Es.dtype)  # (B, d_out, d_in)
        self._project_stack_(sts, Gs, Es, s)
        views = [n.view_as(g) for n, g in zip(Gs.unbind(0), grads, strict=True)]
        torch._foreach_copy_(grads, views)

    def _project_stack_(self, sts: list[LayerState], G: torch.Tensor, E: torch.Tensor,
                        s: torch.Tensor) -> None:
        """Overwrite a stack of gradients ``G`` (B, d_out, d_in) of the layers ``sts`` with
        their projections, in place: ``a G + E (E^T G + s e_1 (e1^T W))`` (output side) or
        ``a G + (G E + s (W e1) e_1^T) E^T`` (input side), with ``E`` (B, d, k) and the
        sharpness scales ``s`` (B,). Shared by the eager stacked path and the CUDA graph."""
        output = sts[0].side == "output"
        M = torch.bmm(E.transpose(1, 2), G) if output else torch.bmm(G, E)
        self._scale_thin_factor(M, G)
        if any(st.sharpness != 0.0 for st in sts):
            W = torch.stack([adapters.as_matrix(st.module.weight) for st in sts]).to(E.dtype)
            e1 = E[:, :, :1]  # (B, d, 1)
            if output:
                M[:, :1, :].add_(s.view(-1, 1, 1) * torch.bmm(e1.transpose(1, 2), W))
            else:
                M[:, :, :1].add_(s.view(-1, 1, 1) * torch.bmm(W, e1))
        a = self.residual  # M no longer reads G, so the product can overwrite it
        if a:
            G.baddbmm_(E, M, beta=a) if output else G.baddbmm_(M, E.transpose(1, 2), beta=a)
        else:
            torch.bmm(E, M, out=G) if output else torch.bmm(M, E.transpose(1, 2), out=G)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Tensors and plain numbers only, so ``torch.load(weights_only=True)`` reads it."""
        return {
            "step": self.step,
            "side": self.side,
            "layers": {n: s.to_dict() for n, s in self._layers.items()},
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore bases, eigenvalues, per-layer settings and the step counter."""
        if state.get("side", self.side) != self.side:
            raise ValueError(f"state was saved with side={state['side']!r}, "
                             f"this projector uses side={self.side!r}")
        saved = set(state["layers"])
        if saved != set(self._layers):
            raise ValueError(f"state has layers {sorted(saved)}, projector has "
                             f"{sorted(self._layers)}")
        for n, d in state["layers"].items():
            self._layers[n].load_dict(d)
        self.step = int(state["step"])
        self._graph = None  # new bases: a graph is captured again on the next step
