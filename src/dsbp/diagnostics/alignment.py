"""Alignment between DSBP's spectral subspaces, the gradient and the Hessian (figure 1a).

Three per-layer quantities, for a model with a :class:`dsbp.SpectralProjector`:

- **Gradient energy kept** ``||P(G)||_F / ||G||_F`` with ``P(G) = E E^T G`` (output side) or
  ``G E E^T`` (input side), ``G`` the layer's raw (unprojected) loss gradient viewed as
  (d_out, d_in). 1 means the gradient lies in the DSBP subspace. It is the cosine between G and
  its projection. (``dsbp.core.subspace.energy_kept``.)
- **Hessian overlap** [ours]: with ``h_1..h_m`` the top-m eigenvectors of the Hessian block of
  the layer's weight (unit vectors over the weight's entries), each reshaped to a
  (d_out, d_in) matrix ``H_i``, ``overlap = (1/m) sum_i ||P(H_i)||_F^2``: the mean squared cosine
  between the top curvature directions and the subspace ``{E K}`` (output side) /
  ``{K E^T}`` (input side) that DSBP updates move in. A random direction scores
  ``k / d_out`` (output) or ``k / d_in`` (input), reported as ``chance``.
- **Drift** ``sqrt(1 - ||E_old^T E_new||_F^2 / k)`` between the bases seen at consecutive calls
  of the tracker (``dsbp.core.subspace.drift``), with the number of refreshes in between.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from dsbp.core.projection import project
from dsbp.core.subspace import drift, energy_kept
from dsbp.diagnostics.hessian import hessian_top_eigenvalues
from dsbp.diagnostics.hvp import Batch, LossFn, as_batch_list, make_grad
from dsbp.layers.adapters import as_matrix

__all__ = [
    "AlignmentTracker",
    "gradient_energy_kept",
    "hessian_basis_overlap",
    "overlap_with_subspace",
]


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    """The ``.weight`` of submodule ``name`` (Any: torch types it ``Tensor | Module``)."""
    layer: Any = model.get_submodule(name)
    return layer.weight


def _layers_with_basis(projector: Any, layers: Iterable[str] | None) -> list[str]:
    names = list(layers) if layers is not None else projector.layer_names()
    out = []
    for n in names:
        st = projector.layer_state(n)
        if st.block is not None:
            out.append(n)
    return out


def gradient_energy_kept(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch] | Batch,
    projector: Any,
    layers: Iterable[str] | None = None,
) -> dict[str, float]:
    """Fraction of each layer's gradient norm inside its DSBP subspace, ``||P(G)|| / ||G||``.

    The gradient is that of the batch-averaged loss at the current weights, in eval mode (the
    :mod:`dsbp.diagnostics.hvp` conventions), computed fresh: ``.grad`` is not read or changed.

    Args:
        model: the network the projector is attached to.
        loss_fn, batches: as in :mod:`dsbp.diagnostics.hvp`.
        projector: a :class:`dsbp.SpectralProjector` (``layer_names``, ``layer_state``, ``basis``).
        layers: layer names (default: every layer that has a basis yet).

    Returns:
        ``{layer_name: energy_kept}`` in [0, 1].
    """
    names = _layers_with_basis(projector, layers)
    if not names:
        return {}
    weights: list[torch.Tensor] = [_weight(model, n) for n in names]
    g = make_grad(model, loss_fn, batches, weights)()
    out = {}
    for n, w, gw in zip(names, weights, torch.split(g, [w.numel() for w in weights]), strict=True):
        G = as_matrix(gw.view_as(w))
        E = projector.basis(n)
        out[n] = float(energy_kept(G, E.to(G.device), projector.layer_state(n).side))
    return out


def overlap_with_subspace(
    vectors: torch.Tensor, E: torch.Tensor, side: str, shape: tuple[int, int]
) -> torch.Tensor:
    """Squared cosines ``||P(H_i)||_F^2 / ||H_i||_F^2`` of weight-space vectors with a subspace.

    Args:
        vectors: (d_out * d_in, m) columns, each a direction over a weight's entries (row-major
            (d_out, d_in) order, as :func:`dsbp.layers.adapters.as_matrix` views the weight).
        E: basis (d, k), d = d_out (output side) or d_in (input side).
        side: ``"output"`` or ``"input"``.
        shape: ``(d_out, d_in)``.

    Returns:
        (m,) float64 in [0, 1].
    """
    V = vectors.to(torch.float64)
    Ed = E.to(device=V.device, dtype=torch.float64)
    out = []
    for i in range(V.shape[1]):
        H = V[:, i].reshape(shape)
        nrm = H.pow(2).sum()
        out.append(project(H, Ed, side).pow(2).sum() / nrm if nrm > 0 else nrm)
    return torch.stack(out)


def hessian_basis_overlap(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch] | Batch,
    projector: Any,
    layer: str,
    k: int = 4,
    *,
    iters: int | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Mean squared cosine between a layer's top-k Hessian eigenvectors and its DSBP subspace.

    Args:
        layer: a layer name of ``projector`` with a basis.
        k: number of top Hessian eigenvectors of the layer's weight block (Lanczos).
        iters, generator: Lanczos settings.

    Returns:
        ``{"overlap": mean squared cosine, "chance": k_E / d, "top_eigenvalue": lambda_1 of the
        block}``.
    """
    st = projector.layer_state(layer)
    if st.block is None:
        raise ValueError(f"layer {layer!r} has no DSBP basis yet (no refresh happened)")
    weight = _weight(model, layer)
    eig = hessian_top_eigenvalues(model, loss_fn, batches, k=min(k, weight.numel()),
                                  params=[weight], iters=iters, generator=generator)
    assert not isinstance(eig, dict)  # per_layer=False: one estimate
    d_out, d_in = as_matrix(weight).shape
    shape = (d_out, d_in)
    E = projector.basis(layer)
    cos2 = overlap_with_subspace(eig.eigenvectors, E, st.side, shape)
    d = shape[0] if st.side == "output" else shape[1]
    return {
        "overlap": float(cos2.mean()),
        "chance": E.shape[1] / d,
        "top_eigenvalue": float(eig.eigenvalues[0]),
    }


class AlignmentTracker:
    """Logs alignment diagnostics of a DSBP model to a flat dict per call.

    Call it whenever you want a measurement (e.g. after each evaluation)::

        tracker = AlignmentTracker(optimizer.projector, hessian_k=4)
        record.update(tracker(model, loss_fn, batches))

    Keys (``<layer>`` is the module name): ``energy_kept/<layer>``, ``energy_kept/mean``;
    ``drift/<layer>``, ``drift/mean`` and ``refreshes/<layer>`` (from the second call on, for
    layers whose basis shape did not change); with ``hessian_k > 0`` also
    ``hessian_overlap/<layer>``, ``hessian_overlap/mean``, ``hessian_chance/<layer>``,
    ``hessian_top/<layer>``. All values are Python floats.

    Args:
        projector: the model's :class:`dsbp.SpectralProjector`.
        hessian_k: top Hessian eigenvectors per layer for the overlap (0 skips it: it costs
            ``iters`` Hessian-vector products per layer).
        hessian_iters: Lanczos steps per layer (default ``2k + 20``).
        layers: restrict to these layer names.
        seed: seeds the Lanczos start vectors (so tracking does not consume the global RNG).
    """

    def __init__(
        self,
        projector: Any,
        *,
        hessian_k: int = 0,
        hessian_iters: int | None = None,
        layers: Iterable[str] | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(hessian_k, int) or hessian_k < 0:
            raise ValueError(f"hessian_k must be an int >= 0, got {hessian_k!r}")
        self.projector = projector
        self.hessian_k = hessian_k
        self.hessian_iters = hessian_iters
        self.layers = list(layers) if layers is not None else None
        self.seed = int(seed)
        self._previous: dict[str, tuple[torch.Tensor, int]] = {}

    def __call__(
        self, model: nn.Module, loss_fn: LossFn, batches: Iterable[Batch] | Batch
    ) -> dict[str, float]:
        batch_list = as_batch_list(batches)
        out: dict[str, float] = {}
        kept = gradient_energy_kept(model, loss_fn, batch_list, self.projector, self.layers)
        for n, v in kept.items():
            out[f"energy_kept/{n}"] = v
        if kept:
            out["energy_kept/mean"] = sum(kept.values()) / len(kept)
        drifts = []
        for n in _layers_with_basis(self.projector, self.layers):
            E = self.projector.basis(n).detach().to("cpu", torch.float64).clone()
            count = self.projector.num_refreshes(n)
            prev = self._previous.get(n)
            if prev is not None and prev[0].shape == E.shape:
                out[f"drift/{n}"] = float(drift(prev[0], E))
                out[f"refreshes/{n}"] = float(count - prev[1])
                drifts.append(out[f"drift/{n}"])
            self._previous[n] = (E, count)
        if drifts:
            out["drift/mean"] = sum(drifts) / len(drifts)
        if self.hessian_k > 0:
            gen = torch.Generator().manual_seed(self.seed)
            overlaps = []
            for n in _layers_with_basis(self.projector, self.layers):
                r = hessian_basis_overlap(model, loss_fn, batch_list, self.projector, n,
                                          self.hessian_k, iters=self.hessian_iters, generator=gen)
                out[f"hessian_overlap/{n}"] = r["overlap"]
                out[f"hessian_chance/{n}"] = r["chance"]
                out[f"hessian_top/{n}"] = r["top_eigenvalue"]
                overlaps.append(r["overlap"])
            if overlaps:
                out["hessian_overlap/mean"] = sum(overlaps) / len(overlaps)
        return out
