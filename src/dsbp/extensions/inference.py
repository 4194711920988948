"""Dynamic spectral inference (METHOD.md §2.1): drift-adaptive bases in training, spectral TTA.

Training side, :class:`AdaptiveSpectralProjector` (and the optimizer :class:`AdaptiveDSBP`):

* **EMA covariance** (rho). Rows are normalised per row, ``C_b = A^T A / n``, so batches of any
  size weigh the same. When the width ``d <= ema_dense_max`` the d x d matrix
  ``C <- rho C + (1 - rho) C_b`` is kept. Above it the d x d matrix is never formed: the old EMA
  is kept in the low-rank form of the last solve, ``V diag(lambda) V^T`` (the block and its Ritz
  values), and the next power iteration runs on
  ``X -> rho V diag(lambda) V^T X + (1 - rho) A^T (A X) / n``, the EMA of the block's matvec
  **[ours]**; the EMA of the trace is kept as a scalar.
* **Drift** ``delta = sqrt(1 - ||E_old^T E_new||_F^2 / k)`` (``dsbp.core.subspace.drift``).
  Between refreshes, every ``probe_every`` steps a *probe* captures the batch and runs
  ``probe_iters`` power iterations from the current block on the batch covariance alone (cheap,
  and not smoothed by the EMA, so a change shows at once). If ``delta > tau`` the layer refreshes
  at once, restarting its EMA from that batch (a change point), and its interval halves.
* **Adaptive interval** ``p`` in ``[p_min, p_max]``: after each scheduled refresh, ``p``
  is multiplied by ``grow`` when the drift since the last refresh is ``<= tau`` and divided by it
  otherwise. The rules and defaults are [ours].

Test time, :class:`SpectralTTA` (projected TENT) and :class:`TENT`:

* On an unlabeled stream, BatchNorm layers use the batch statistics (as TENT) and a few
  steps minimise the mean prediction entropy, adapting the BatchNorm affine parameters (and,
  with ``adapt="all"``, the Linear/Conv weights).
* :class:`SpectralTTA` tracks each layer's output-side basis ``E`` online with an
  :class:`AdaptiveSpectralProjector` on the stream and projects every update into it: a
  BatchNorm's ``gamma`` / ``beta`` gradient (a vector over the channels of the conv / linear
  layer feeding it) becomes ``E E^T g`` **[ours]**; weight gradients get the DSBP projection.
* :class:`TENT` is the same loop without the projection (Wang et al., ICLR 2021).

:func:`shift_benchmark` runs no adaptation / BN statistics only / TENT / spectral TTA on the
shifted streams of :func:`dsbp.data.shifts.apply_shift`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from dsbp.core.covariance import covariance, gram_matvec, trace_of_covariance
from dsbp.core.eigen import block_power_iteration
from dsbp.core.subspace import drift
from dsbp.layers import adapters
from dsbp.layers.state import ParamState
from dsbp.optim.dsbp import DSBP
from dsbp.optim.projector import CovarianceEstimator, Operator, RefreshPolicy, SpectralProjector

__all__ = [
    "TENT",
    "AdaptiveDSBP",
    "AdaptiveSpectralProjector",
    "DriftPolicy",
    "EMACovariance",
    "SpectralTTA",
    "entropy",
    "shift_benchmark",
]


class EMACovariance(CovarianceEstimator):
    """The EMA of the per-row covariance (module docstring), as a projector's estimator.

    Its operator is in the units of the batch's ``A^T A`` (``n`` times the per-row EMA), so the
    eigenvalues and trace a refresh stores keep their usual meaning and ``lambda_1 / trace``
    stays a ratio of EMA quantities. Not batchable: each weight refreshes on its own.
    """

    batchable = False

    def __init__(self, rho: float, dense_max: int) -> None:
        self.rho, self.dense_max = rho, int(dense_max)
        self.cov: dict[str, torch.Tensor] = {}  # dense EMA covariance (per row), small d only
        self.trace: dict[str, torch.Tensor] = {}  # EMA of trace(C_b)
        self.rows_used: dict[str, int] = {}
        self._restart: set[str] = set()  # weights whose next refresh restarts the EMA

    def restart(self, name: str) -> None:
        """The next refresh of weight ``name`` starts the EMA afresh (a change point)."""
        self._restart.add(name)

    def operator(self, proj: SpectralProjector, st: ParamState, A: torch.Tensor) -> Operator:
        n, d = A.shape
        name = st.name
        fresh = name in self._restart or st.block is None or self.rho == 0.0
        self._restart.discard(name)
        tr_b = trace_of_covariance(A) / n
        rho = self.rho
        if d <= self.dense_max:
            Cb = covariance(A) / n
            prev = self.cov.get(name)
            C = Cb if fresh or prev is None else rho * prev.to(Cb) + (1 - rho) * Cb
            self.cov[name] = C
            tr = torch.diagonal(C).sum()
            op = Operator(lambda X: n * (C @ X), lambda: n * C, n * tr)
        else:
            used = self.rows_used.get(name)
            if fresh or used is None or not proj.is_warm(st) or st.eigenvalues is None:
                tr = tr_b
                op = Operator(gram_matvec(A), lambda: covariance(A), n * tr)
            else:  # the old EMA in the low-rank form of the last solve
                assert st.block is not None
                Vo = st.block.to(A)
                lam = (st.eigenvalues / used).to(A).clamp(min=0)
                tr = rho * self.trace.get(name, tr_b) + (1 - rho) * tr_b

                def matvec(X: torch.Tensor) -> torch.Tensor:
                    return n * rho * (Vo @ (lam[:, None] * (Vo.T @ X))) + (1 - rho) * (
                        A.T @ (A @ X))

                op = Operator(matvec, lambda: matvec(torch.eye(d, dtype=A.dtype,
                                                               device=A.device)), n * tr)
        self.trace[name], self.rows_used[name] = tr, n
        return op

    def state_dict(self) -> dict:
        return {"cov": dict(self.cov), "trace": dict(self.trace),
                "rows_used": dict(self.rows_used)}

    def load_state_dict(self, state: Mapping) -> None:
        self.cov = {n: t.detach().clone() for n, t in state.get("cov", {}).items()}
        self.trace = {n: t.detach().clone() for n, t in state.get("trace", {}).items()}
        self.rows_used = {n: int(v) for n, v in state.get("rows_used", {}).items()}


class DriftPolicy(RefreshPolicy):
    """Drift probes between refreshes, early refreshes on drift, an adaptive interval.

    See :class:`AdaptiveSpectralProjector` for the arguments. ``history`` lists one
    ``{"step", "layer", "event", "drift", "interval"}`` dict per probe and refresh (``event`` in
    ``probe``, ``refresh``, ``early``).
    """

    def __init__(self, tau: float, p_min: int, p_max: int, grow: float, probe_every: int,
                 probe_iters: int, estimator: EMACovariance | None = None,
                 refresh_without_grad: bool = False) -> None:
        self.tau, self.p_min, self.p_max, self.grow = tau, p_min, p_max, grow
        self.probe_every, self.probe_iters = probe_every, probe_iters
        self.estimator = estimator
        self.refresh_without_grad = refresh_without_grad
        self.last_probe: dict[str, int] = {}
        self.history: list[dict] = []

    def _probe_due(self, proj: SpectralProjector, st: ParamState) -> bool:
        if st.block is None or st.due(proj.step):
            return False
        since = proj.step - max(st.last_refresh, self.last_probe.get(st.name, -1))
        return since >= self.probe_every

    def wants_rows(self, proj: SpectralProjector, st: ParamState) -> bool:
        """Capture on refresh steps and on probe steps."""
        return st.due(proj.step) or self._probe_due(proj, st)

    def _log(self, proj: SpectralProjector, st: ParamState, event: str,
             delta: float | None) -> None:
        self.history.append({"step": proj.step, "layer": st.name, "event": event,
                             "drift": delta, "interval": st.interval})

    def between_refreshes(self, proj: SpectralProjector, st: ParamState,
                          A: torch.Tensor) -> bool:
        """A probe: a few power iterations on this batch alone; refresh early on drift."""
        self.last_probe[st.name] = proj.step
        if not bool(torch.isfinite(A).all()) or float(trace_of_covariance(A)) <= 0:
            return False
        assert st.block is not None
        k = st.k
        _, V = block_power_iteration(gram_matvec(A), st.block.to(A.dtype), self.probe_iters)
        delta = float(drift(st.block[:, :k].to(V), V[:, :k]))
        if delta <= self.tau:
            self._log(proj, st, "probe", delta)
            return False
        self._log(proj, st, "early", delta)
        if self.estimator is not None:
            self.estimator.restart(st.name)
        return True

    def after_refresh(self, proj: SpectralProjector, st: ParamState,
                      old_block: torch.Tensor | None, early: bool) -> None:
        assert st.block is not None
        if early:  # the probe logged it; a drifting weight refreshes more often
            st.interval = max(self.p_min, int(st.interval / self.grow))
            return
        if old_block is not None and old_block.shape == st.block.shape:
            k = st.k
            delta = float(drift(old_block[:, :k].to(st.block), st.block[:, :k]))
            if delta > self.tau:
                st.interval = max(self.p_min, int(st.interval / self.grow))
            else:
                st.interval = min(self.p_max, int(round(st.interval * self.grow)))
            self._log(proj, st, "refresh", delta)
        else:
            self._log(proj, st, "refresh", None)

    def state_dict(self) -> dict:
        return {"last_probe": dict(self.last_probe)}

    def load_state_dict(self, state: Mapping) -> None:
        self.last_probe = {n: int(v) for n, v in state.get("last_probe", {}).items()}


class AdaptiveSpectralProjector(SpectralProjector):
    """A SpectralProjector with an :class:`EMACovariance` estimator and a :class:`DriftPolicy`
    (composition: this class only wires its arguments into those two objects).

    Args:
        model, rank, *args: as for :class:`~dsbp.SpectralProjector` (then power_iters, side,
            sharpness, max_rows, layers).
        interval: the starting interval p (steps between scheduled refreshes).
        rho: EMA factor of the covariance in [0, 1); 0 disables the EMA (default 0.9).
        tau: drift threshold in (0, 1] (default 0.3).
        p_min, p_max: bounds of the adaptive interval (defaults 10 and 1000; ``interval`` is
            clipped into them).
        grow: factor by which p grows after a quiet refresh and shrinks after a drifting one
            (default 2).
        probe_every: steps between drift probes (default ``p_min``); probes only run between
            refreshes.
        probe_iters: power iterations of a probe (default 2).
        ema_dense_max: keep the d x d EMA covariance only when d <= this (default 512).
        refresh_without_grad: refresh weights that have no gradient (frozen weights, as in
            test-time adaptation of norm layers only); by default they wait. Default False.
        **kwargs: the parent's keyword-only arguments (``oversample``, ``seed``, ...).

    Attributes:
        history: the policy's probe and refresh log (see :class:`DriftPolicy`).
    """

    def __init__(
        self,
        model: nn.Module,
        rank: int = 10,
        interval: int = 100,
        *args: Any,
        rho: float = 0.9,
        tau: float = 0.3,
        p_min: int = 10,
        p_max: int = 1000,
        grow: float = 2.0,
        probe_every: int | None = None,
        probe_iters: int = 2,
        ema_dense_max: int = 512,
        refresh_without_grad: bool = False,
        **kwargs: Any,
    ) -> None:
        rho, tau, grow = float(rho), float(tau), float(grow)
        if not 0.0 <= rho < 1.0:
            raise ValueError(f"rho must be in [0, 1), got {rho}")
        if not 0.0 < tau <= 1.0:
            raise ValueError(f"tau (drift threshold) must be in (0, 1], got {tau}")
        for name, v in (("p_min", p_min), ("p_max", p_max), ("probe_iters", probe_iters)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if p_min > p_max:
            raise ValueError(f"p_min ({p_min}) must be <= p_max ({p_max})")
        if not grow > 1.0:
            raise ValueError(f"grow must be > 1, got {grow}")
        probe_every = p_min if probe_every is None else probe_every
        if isinstance(probe_every, bool) or not isinstance(probe_every, int) or probe_every < 1:
            raise ValueError(f"probe_every must be a positive integer, got {probe_every!r}")
        for taken in ("estimator", "policy"):
            if taken in kwargs:
                raise ValueError(f"AdaptiveSpectralProjector sets its own {taken}")
        self.ema = EMACovariance(rho, ema_dense_max)
        self.drift_policy = DriftPolicy(tau, p_min, p_max, grow, probe_every, probe_iters,
                                        self.ema, bool(refresh_without_grad))
        interval = min(max(int(interval), p_min), p_max)
        super().__init__(model, rank, interval, *args, estimator=self.ema,
                         policy=self.drift_policy, **kwargs)

    @property
    def history(self) -> list[dict]:
        return self.drift_policy.history

    def intervals(self) -> dict[str, int]:
        """The current adaptive interval p of every weight."""
        return {st.name: st.interval for st in self.states()}

    def ema_covariance(self, module_or_name: nn.Module | str) -> torch.Tensor:
        """The dense EMA covariance (per row) of a weight with ``d <= ema_dense_max``."""
        name = self.layer_state(module_or_name).name
        if name not in self.ema.cov:
            raise KeyError(f"weight {name!r} keeps no dense EMA covariance (d > ema_dense_max "
                           "or no refresh yet)")
        return self.ema.cov[name]


class AdaptiveDSBP(DSBP):
    """:class:`~dsbp.DSBP` whose projector is an :class:`AdaptiveSpectralProjector`.

    Args:
        model, base_optimizer, rank, interval, power_iters, side, sharpness, max_rows, layers,
            params, projector_kwargs, **base_kwargs: as for :class:`~dsbp.DSBP`.
        rho, tau, p_min, p_max, grow, probe_every, probe_iters, ema_dense_max: see
            :class:`AdaptiveSpectralProjector`.
    """

    projector_class = AdaptiveSpectralProjector

    def __init__(
        self,
        model: nn.Module,
        *args: Any,
        rho: float = 0.9,
        tau: float = 0.3,
        p_min: int = 10,
        p_max: int = 1000,
        grow: float = 2.0,
        probe_every: int | None = None,
        probe_iters: int = 2,
        ema_dense_max: int = 512,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, *args, rho=rho, tau=tau, p_min=p_min, p_max=p_max, grow=grow,
                         probe_every=probe_every, probe_iters=probe_iters,
                         ema_dense_max=ema_dense_max, **kwargs)

    def _sync_group_overrides(self) -> None:
        # Groups may carry rank / sharpness. A group "interval" would overwrite the adaptive
        # interval on every step, so it is rejected: pass the starting interval as ``interval``.
        if any("interval" in group for group in self.param_groups):
            raise ValueError(
                "AdaptiveDSBP adapts each layer's interval itself; remove "
                "'interval' from the param group (use interval=, p_min=, p_max=)"
            )
        super()._sync_group_overrides()


# ============================================================================ test time
def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of the softmax of each row of ``logits`` (B, classes) -> (B,)."""
    logp = logits.log_softmax(dim=1)
    return -(logp.exp() * logp).sum(dim=1)


_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def _bn_producers(model: nn.Module) -> dict[str, str]:
    """BatchNorm name -> name of the Linear / Conv2d feeding it (the last one registered before
    it with as many outputs as the norm has features)."""
    out, last = {}, None
    for name, m in model.named_modules():
        if adapters.is_supported(m):
            last = (name, adapters.as_matrix(m.weight).shape[0])
        elif isinstance(m, _BN) and last is not None and last[1] == m.num_features:
            out[name] = last[0]
    return out


class SpectralTTA:
    """Test-time entropy minimisation restricted to the tracked spectral subspace (projected TENT).

    Args:
        model: the trained network (adapted in place; pass a copy to keep the original).
        rank: k of the output-side bases (default 10).
        steps: entropy-minimisation steps per test batch (default 1, as TENT).
        lr: learning rate of the optimizer (default 1e-3).
        optimizer: ``"adam"`` (TENT's default, betas (0.9, 0.999)) or ``"sgd"`` (momentum 0.9).
        adapt: ``"bn"`` (BatchNorm affine parameters, TENT's choice) or ``"all"`` (also the
            Linear / Conv weights).
        project: restrict the updates to the spectral subspace (False gives :class:`TENT`).
        interval, rho, tau, p_min, p_max, power_iters: basis tracking on the stream with an
            :class:`AdaptiveSpectralProjector` (output side, no sharpness term); defaults track
            every batch (interval 1) with an EMA of 0.9 [ours].

    Usage::

        tta = SpectralTTA(copy.deepcopy(model))
        for x in stream:
            logits = tta(x)  # predictions for x (from the last adaptation step's forward pass)
    """

    def __init__(
        self,
        model: nn.Module,
        rank: int = 10,
        steps: int = 1,
        lr: float = 1e-3,
        optimizer: str = "adam",
        adapt: str = "bn",
        project: bool = True,
        interval: int = 1,
        rho: float = 0.9,
        tau: float = 0.3,
        p_min: int = 1,
        p_max: int = 8,
        power_iters: int = 2,
    ) -> None:
        if adapt not in ("bn", "all"):
            raise ValueError(f"adapt must be 'bn' or 'all', got {adapt!r}")
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        self.model, self.steps, self.project = model, steps, bool(project)
        model.train()  # BN on batch statistics, and the projector's hooks capture
        for m in model.modules():
            if isinstance(m, nn.Dropout | nn.Dropout2d):
                m.eval()
            if isinstance(m, _BN):  # TENT: normalise with the test batch's statistics only
                m.track_running_stats = False
                m.running_mean, m.running_var = None, None
        for p in model.parameters():
            p.requires_grad_(False)
        params: list[Any] = []
        bns: dict[str, Any] = {n: m for n, m in model.named_modules()
                               if isinstance(m, _BN) and m.affine}
        for m in bns.values():
            params += [m.weight, m.bias]
        if adapt == "all":
            params += [m.weight for m in model.modules() if adapters.is_supported(m)]
        for p in params:
            p.requires_grad_(True)
        if not params:
            raise ValueError(
                "the model has no BatchNorm affine parameters to adapt; use adapt='all'"
            )
        self.params = params
        self.opt = (
            torch.optim.Adam(params, lr=lr)
            if optimizer == "adam"
            else torch.optim.SGD(params, lr=lr, momentum=0.9)
        )
        self.projector = None
        self._bn_basis: list[tuple[Any, str]] = []
        if self.project:
            self.projector = AdaptiveSpectralProjector(
                model,
                rank=rank,
                interval=interval,
                power_iters=power_iters,
                side="output",
                sharpness=0.0,
                rho=rho,
                tau=tau,
                p_min=p_min,
                p_max=p_max,
                refresh_without_grad=True,
            )
            prod = _bn_producers(model)
            self._bn_basis = [(bns[n], prod[n]) for n in bns if n in prod]

    def _project_norm_grads(self) -> None:
        assert self.projector is not None
        for bn, layer in self._bn_basis:
            try:
                E = self.projector.basis(layer)
            except RuntimeError:
                continue  # no basis yet
            for p in (bn.weight, bn.bias):
                if p.grad is not None:
                    p.grad.copy_(E @ (E.T @ p.grad))

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        """Take ``steps`` entropy-minimisation steps on batch ``x``; return the logits of the
        last step's forward pass (detached), which are the predictions for ``x``."""
        logits = None
        for _ in range(self.steps):
            with torch.enable_grad():
                logits = self.model(x)
                loss = entropy(logits).mean()
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
            if self.projector is not None:
                self.projector.project_()  # tracks the bases; projects adapted weights' grads
                self._project_norm_grads()
            self.opt.step()
        assert logits is not None
        return logits.detach()

    __call__ = adapt

    def remove(self) -> None:
        """Remove the projector's hooks."""
        if self.projector is not None:
            self.projector.remove()


class TENT(SpectralTTA):
    """TENT (Wang et al., ICLR 2021): entropy minimisation of the BatchNorm affine parameters
    on the test stream, unprojected. Arguments as :class:`SpectralTTA` (``project`` is False)."""

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        kwargs["project"] = False
        super().__init__(model, **kwargs)


class _NormOnly:
    """BatchNorm with test-batch statistics and no parameter update (the "BN adapt" reference)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.train()
        for m in model.modules():
            if isinstance(m, nn.Dropout | nn.Dropout2d):
                m.eval()
            if isinstance(m, _BN):
                m.track_running_stats = False
                m.running_mean, m.running_var = None, None

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def remove(self) -> None:
        pass


class _Frozen:
    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def remove(self) -> None:
        pass


TTA_METHODS: dict[str, Callable[..., Any]] = {
    "none": lambda m, **kw: _Frozen(m),
    "bn_stats": lambda m, **kw: _NormOnly(m),
    "tent": lambda m, **kw: TENT(m, **kw),
    "spectral_tta": lambda m, **kw: SpectralTTA(m, **kw),
}


def shift_benchmark(
    model: nn.Module,
    shift_fn: Callable[..., torch.Tensor],
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    kinds: Sequence[str] = ("rotate", "noise", "blur", "contrast"),
    severities: Sequence[int] = (1, 3, 5),
    methods: Sequence[str] = ("none", "bn_stats", "tent", "spectral_tta"),
    batch_size: int = 128,
    seed: int = 0,
    method_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict]:
    """Online accuracy of each test-time method on each shifted stream.

    Every (shift, severity, method) starts from a fresh copy of ``model``; the stream is the
    shifted test split in one fixed random order (seeded), cut into batches; a batch's
    prediction is made by the method before it sees the next batch (TENT's online protocol).
    Severity 0 (the clean stream) is allowed.

    Args:
        model: the trained classifier.
        shift_fn: ``shift_fn(x_uint8, kind, severity, seed=...) -> x_uint8``, i.e.
            :func:`dsbp.data.shifts.apply_shift` (passed in: extensions do not import the data
            package).
        x_test, y_test: uint8 images (N, C, H, W) and labels (N,).
        mean, std: per-channel normalisation in [0, 1] units (the training split's).
        kinds, severities: shifts of :func:`dsbp.data.shifts.apply_shift`.
        methods: names in :data:`TTA_METHODS`: ``none`` (no adaptation), ``bn_stats`` (BN on
            test-batch statistics, no update), ``tent``, ``spectral_tta``.
        batch_size: test batch size.
        seed: order of the stream and the noise shift's draw.
        method_kwargs: per-method keyword arguments (e.g. ``{"tent": {"lr": 1e-3}}``).

    Returns:
        rows ``{"shift", "severity", "method", "accuracy", "n"}``.
    """
    unknown = set(methods) - set(TTA_METHODS)
    if unknown:
        raise ValueError(
            f"unknown test-time method(s) {sorted(unknown)}; known: {sorted(TTA_METHODS)}"
        )
    method_kwargs = method_kwargs or {}
    order = torch.randperm(len(y_test), generator=torch.Generator().manual_seed(seed))
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    rows = []
    for kind in kinds:
        for sev in severities:
            xs = shift_fn(x_test[order], kind, int(sev), seed=seed)
            ys = y_test[order]
            for name in methods:
                kw = dict(method_kwargs.get(name, {}))
                runner = TTA_METHODS[name](copy.deepcopy(model), **kw)
                correct = 0
                for i in range(0, len(ys), batch_size):
                    x = (xs[i : i + batch_size].float() / 255.0 - m) / s
                    correct += int((runner(x).argmax(1) == ys[i : i + batch_size]).sum())
                runner.remove()
                rows.append(
                    {
                        "shift": kind,
                        "severity": int(sev),
                        "method": name,
                        "accuracy": correct / len(ys),
                        "n": len(ys),
                    }
                )
    return rows
