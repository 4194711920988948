"""Baselines the paper compares DSBP with, each tested for its defining property.

- :class:`SAM` (sharpness-aware minimization, ``sam.py``);
- :func:`apply_lora` (LoRA through HuggingFace ``peft``, an optional extra imported only when
  called; ``lora.py``);
- :class:`MAML` (first- and second-order, ``maml.py``);
- :class:`SubspaceSGD` (Dom-SGD / Bulk-SGD / interpolated, ``subspace_sgd.py``).

SGD and AdamW are ``torch.optim.SGD`` and ``torch.optim.AdamW`` themselves.
"""

from dsbp.baselines.lora import apply_lora, lora_param_count, lora_target_names
from dsbp.baselines.maml import MAML
from dsbp.baselines.sam import SAM
from dsbp.baselines.subspace_sgd import SubspaceSGD

__all__ = ["MAML", "SAM", "SubspaceSGD", "apply_lora", "lora_param_count", "lora_target_names"]
