"""Diagnostics: curvature, alignment, loss landscapes, perturbations, the SDE check, PAC-Bayes.

Conventions shared by every function (see :mod:`dsbp.diagnostics.hvp` and docs/diagnostics.md):
``batches`` is an iterable of ``(x, y)``, ``loss_fn(model(x), y)`` a scalar mean loss, the model
is in eval mode during the computation (BatchNorm running statistics) and restored afterwards.
"""

from __future__ import annotations

from dsbp.diagnostics.alignment import (
    AlignmentTracker,
    gradient_energy_kept,
    hessian_basis_overlap,
)
from dsbp.diagnostics.hessian import (
    hessian_spectral_density,
    hessian_top_eigenvalues,
    hessian_trace,
)
from dsbp.diagnostics.hvp import flat_params, make_hvp
from dsbp.diagnostics.landscape import (
    basis_direction,
    filter_normalized_direction,
    loss_slice_1d,
    loss_slice_2d,
)
from dsbp.diagnostics.pac_bayes import pac_bayes_bound
from dsbp.diagnostics.perturbation import perturbation_curve

__all__ = [
    "AlignmentTracker",
    "basis_direction",
    "filter_normalized_direction",
    "flat_params",
    "gradient_energy_kept",
    "hessian_basis_overlap",
    "hessian_spectral_density",
    "hessian_top_eigenvalues",
    "hessian_trace",
    "loss_slice_1d",
    "loss_slice_2d",
    "make_hvp",
    "pac_bayes_bound",
    "perturbation_curve",
]
