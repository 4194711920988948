"""dsbp: reference PyTorch implementation of Dynamic Spectral Backpropagation (arXiv 2505.23369).

Public API: :class:`SpectralProjector` (edits ``.grad`` in place, works with any optimizer) and
:class:`DSBP` (a ``torch.optim.Optimizer`` drop-in wrapping a base optimizer).
"""

from dsbp.optim.dsbp import DSBP
from dsbp.optim.projector import SpectralProjector

__version__ = "0.1.0"
__all__ = ["DSBP", "SpectralProjector", "__version__"]
