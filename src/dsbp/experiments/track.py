"""Diagnostics recorded at every evaluation of a run (``RunConfig.track`` / ``--track``).

Each tracker is built once per run by a factory ``factory(cfg) -> tracker`` and then called
after every evaluation as ``tracker(model=, method=, data=, loss_fn=, state=)``; it returns a
dict of scalars that the loop stores in the eval record as ``"<name>/<key>"``. The registry
:data:`TRACKERS` is open: ``register_tracker("name")`` adds one.

Built in:

- ``spectrum`` (DSBP methods; records nothing for others): mean over layers of
  ``lambda_1 / trace(C)`` (the normalised top eigenvalue of the sharpness term) and the
  mean subspace drift ``sqrt(1 - ||E_old^T E_new||_F^2 / k)`` of each layer's basis since
  the previous evaluation.
- ``hessian``: top eigenvalue of the training-loss Hessian on the first
  :data:`HESSIAN_BATCHES` training batches of epoch 0 (Lanczos on Hessian-vector products,
  ``dsbp.diagnostics.hessian.hessian_top_eigenvalues``).
- ``alignment`` (DSBP methods): ``dsbp.diagnostics.alignment.AlignmentTracker`` on the same
  batches: per-layer gradient energy kept in the DSBP subspace, basis drift, and optionally
  the overlap with the top Hessian eigenvectors.

Tracker state (the previous bases, for drift) lives in memory: after ``--resume`` the first
evaluation has no drift value. Trackers use the first training batches of epoch 0 (fixed
across evaluations) and private RNGs, so they never change the training itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dsbp.experiments.config import RunConfig

Tracker = Callable[..., dict[str, float]]
TrackerFactory = Callable[[RunConfig], Tracker]

TRACKERS: dict[str, TrackerFactory] = {}

# [ours] batches (of the run's batch size) used for the Hessian estimate: enough for a stable
# top eigenvalue on small models, cheap enough to run at every epoch on a CPU.
HESSIAN_BATCHES = 2


def register_tracker(name: str) -> Callable[[TrackerFactory], TrackerFactory]:
    """Decorator adding a tracker factory to :data:`TRACKERS` under ``name``."""

    def deco(fn: TrackerFactory) -> TrackerFactory:
        if name in TRACKERS:
            raise ValueError(f"tracker {name!r} is already registered")
        TRACKERS[name] = fn
        return fn

    return deco


def build_trackers(names: tuple[str, ...], cfg: RunConfig) -> dict[str, Tracker]:
    """Instantiate the trackers ``names`` for one run; unknown names raise ``ValueError``."""
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(f"unknown tracker(s) {unknown}; known: {sorted(TRACKERS)}")
    return {n: TRACKERS[n](cfg) for n in names}


@register_tracker("spectrum")
def _spectrum(cfg: RunConfig) -> Tracker:
    from dsbp.core.subspace import drift

    previous: dict[str, torch.Tensor] = {}

    def track(*, method: Any, **_: Any) -> dict[str, float]:
        proj = getattr(method.optimizer, "projector", None)
        if proj is None:  # not a DSBP method: nothing to record
            return {}
        lam_hat, drifts = [], []
        for name in proj.layer_names():
            st = proj.layer_state(name)
            if st.block is None:
                continue
            E = proj.basis(name).detach().double().cpu()  # (d, k)
            lam_hat.append(float(st.eigenvalues[0] / st.trace))
            if name in previous and previous[name].shape == E.shape:
                drifts.append(float(drift(previous[name], E)))
            previous[name] = E
        nan = float("nan")
        return {
            "lam1_over_trace": sum(lam_hat) / len(lam_hat) if lam_hat else nan,
            "drift": sum(drifts) / len(drifts) if drifts else nan,
        }

    return track


@register_tracker("hessian")
def _hessian(cfg: RunConfig) -> Tracker:
    def track(*, model: torch.nn.Module, data: Any, loss_fn: Any, **_: Any) -> dict[str, float]:
        from dsbp.diagnostics.hessian import hessian_top_eigenvalues

        batches = _first_train_batches(data, HESSIAN_BATCHES)
        # A fixed generator: the estimate must not consume the run's global RNG (resume).
        eig = hessian_top_eigenvalues(model, loss_fn, batches, k=1,
                                      generator=torch.Generator().manual_seed(0))
        assert not isinstance(eig, dict)  # per_layer=False: one estimate
        return {"top_eigenvalue": float(eig.eigenvalues[0])}

    return track


def _first_train_batches(data: Any, n: int) -> list[Any]:
    batches = []
    for i, batch in enumerate(data.train.iter_epoch(0)):
        if i >= n:
            break
        batches.append(batch)
    return batches


@register_tracker("alignment")
def _alignment(cfg: RunConfig) -> Tracker:
    """Gradient energy kept in the DSBP subspace and basis drift per layer (figure 1a); with
    ``method_kwargs["alignment_hessian_k"] > 0`` also the overlap with the top Hessian
    eigenvectors. Records nothing for methods without a projector."""
    from dsbp.diagnostics.alignment import AlignmentTracker

    trackers: dict[int, Any] = {}
    hessian_k = int(cfg.method_kwargs.get("alignment_hessian_k", 0))

    def track(*, model: torch.nn.Module, method: Any, data: Any, loss_fn: Any,
              **_: Any) -> dict[str, float]:
        proj = getattr(method.optimizer, "projector", None)
        if proj is None:
            return {}
        tracker = trackers.setdefault(id(proj), AlignmentTracker(proj, hessian_k=hessian_k,
                                                                 seed=cfg.seed))
        return tracker(model, loss_fn, _first_train_batches(data, HESSIAN_BATCHES))

    return track
