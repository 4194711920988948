"""dsbp: reference PyTorch implementation of Dynamic Spectral Backpropagation (arXiv 2505.23369).

Public API: :class:`SpectralProjector` (edits ``.grad`` in place, works with any optimizer),
:class:`DSBP` (a ``torch.optim.Optimizer`` drop-in wrapping a base optimizer) and
:class:`DistributedDSBP` (the same under DDP or FSDP2).
"""

from dsbp.optim.distributed import DistributedDSBP
from dsbp.optim.dsbp import DSBP
from dsbp.optim.projector import SpectralProjector

__version__ = "0.1.0"
__all__ = ["DSBP", "DistributedDSBP", "SpectralProjector", "__version__"]
