"""On-device mini-batch loader with deterministic, resumable epochs (airbench style).

The uint8 images live on the device for the whole run (CIFAR-10 train padded by 4: 240 MB);
each batch is gathered, cropped, flipped, converted to float and normalised there, so the host
does no per-batch work. All random draws of an epoch (order, flips, crop offsets) come from a
private CPU ``torch.Generator`` seeded from (seed, epoch) [ours], so:

- the same (seed, epoch) gives the same batches on any device and in any process;
- ``iter_epoch(epoch, start_batch=b)`` yields exactly batches b, b+1, ... of the full epoch,
  which is how a run killed mid-epoch resumes bit-exactly;
- the global RNG is never touched.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import torch

from dsbp.data import augment as aug


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed from (seed, epoch) [ours]; distinct pairs give unrelated streams.

    A hash rather than ``seed + epoch`` so that (seed=0, epoch=1) and (seed=1, epoch=0) differ.
    """
    digest = hashlib.sha256(f"dsbp.loader:{int(seed)}:{int(epoch)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class DeviceLoader:
    """Mini-batches of normalised float images from uint8 tensors kept on ``device``.

    Args:
        x_uint8: uint8 images (N, C, H, W), any device (moved to ``device`` once).
        y: int labels (N,).
        batch_size: Images per batch.
        device: Where data and batches live (default CPU).
        shuffle: New random order each epoch.
        augment: Random crop (pad ``pad`` pixels, ``pad_mode``) and random horizontal flip
            (probability 1/2 each image), as in airbench.
        seed: Base seed; epoch e draws from ``epoch_seed(seed, e)``.
        mean: Per-channel mean in [0, 1] units (``ImageDataset.mean``); None: no centering.
        std: Per-channel std in [0, 1] units; None: no scaling (inputs in [0, 1]).
        drop_last: Drop the final short batch.
        pad: Crop padding in pixels (default 4, the CIFAR standard); 0 turns cropping off.
        pad_mode: ``"reflect"`` (airbench) or ``"zeros"`` (torchvision RandomCrop).
        flip: Random horizontal flips when ``augment``.
        dtype: Floating dtype of the yielded images (e.g. ``torch.bfloat16`` on GPU).
        channels_last: Yield images in ``torch.channels_last`` memory format.

    Yields (from :meth:`iter_epoch`):
        ``(x, y)``: x of ``dtype`` (B, C, H, W), ``(x/255 - mean) / std``; y int64 (B,).
    """

    def __init__(
        self,
        x_uint8: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        device: str | torch.device = "cpu",
        shuffle: bool = True,
        augment: bool = False,
        seed: int = 0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        drop_last: bool = False,
        pad: int = 4,
        pad_mode: str = "reflect",
        flip: bool = True,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
    ) -> None:
        if x_uint8.dtype != torch.uint8 or x_uint8.ndim != 4:
            raise ValueError(f"x_uint8 must be uint8 (N, C, H, W), got {x_uint8.dtype} "
                             f"{tuple(x_uint8.shape)}")
        if y.ndim != 1 or y.shape[0] != x_uint8.shape[0]:
            raise ValueError(f"y must be ({x_uint8.shape[0]},), got {tuple(y.shape)}")
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ValueError(f"y must hold integer labels, got {y.dtype}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        n, c, h, w = x_uint8.shape
        if n == 0:
            raise ValueError("cannot load an empty data set")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed = int(seed)
        self.drop_last = drop_last
        self.pad = pad if augment else 0
        self.flip = flip and augment
        self.dtype = dtype
        self.channels_last = channels_last
        self.num_samples = n
        self.image_size = (h, w)
        # Pad the whole set once (airbench); batches are crops of this copy.
        self._x = aug.pad_images(x_uint8.to(self.device), self.pad, pad_mode)
        self._y = y.to(self.device, torch.int64)
        self._scale, self._shift = self._affine(mean, std, c)
        self._next_epoch = 0

    def _affine(self, mean: Sequence[float] | None, std: Sequence[float] | None,
                c: int) -> tuple[torch.Tensor, torch.Tensor]:
        # (x/255 - mean)/std = x * scale + shift, per channel, computed in float32.
        m = torch.zeros(c, dtype=torch.float64) if mean is None else torch.tensor(
            [float(v) for v in mean], dtype=torch.float64)
        s = torch.ones(c, dtype=torch.float64) if std is None else torch.tensor(
            [float(v) for v in std], dtype=torch.float64)
        if m.shape != (c,) or s.shape != (c,):
            raise ValueError(f"mean and std need {c} values (one per channel), got "
                             f"{tuple(m.shape)} and {tuple(s.shape)}")
        if bool((s <= 0).any()):
            raise ValueError(f"std must be positive, got {s.tolist()}")
        scale = (1.0 / (255.0 * s)).float().view(1, c, 1, 1).to(self.device)
        shift = (-m / s).float().view(1, c, 1, 1).to(self.device)
        return scale, shift

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def epoch_draws(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The epoch's random draws, on CPU: (order (N,), flip mask (N,), crop offsets (N, 2)).

        Position i of the epoch shows image ``order[i]``, flipped if ``flips[i]``, cropped at
        ``offsets[i]`` in the padded image. Drawn in a fixed sequence from the private
        generator, so they depend only on (seed, epoch).
        """
        g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        n = self.num_samples
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        flips = torch.rand(n, generator=g) < 0.5
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=g)
        if not self.flip:
            flips = torch.zeros(n, dtype=torch.bool)
        return order, flips, offsets

    def iter_epoch(self, epoch: int, start_batch: int = 0
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the batches of ``epoch`` from batch index ``start_batch`` on.

        Args:
            epoch: Epoch number (any int >= 0); with ``seed`` it fixes every draw.
            start_batch: First batch to yield, 0 <= start_batch <= len(self). Resuming with
                ``start_batch = b`` yields the same tensors as batches b.. of a full pass.
        """
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}], got {start_batch}")
        order, flips, offsets = (t.to(self.device) for t in self.epoch_draws(epoch))
        for b in range(start_batch, len(self)):
            sl = slice(b * self.batch_size, min((b + 1) * self.batch_size, self.num_samples))
            idx = order[sl]
            x = self._x[idx]
            if self.pad:
                x = aug.crop(x, offsets[sl], self.image_size, flips[sl] if self.flip else None)
            elif self.flip:
                x = aug.flip(x, flips[sl])
            x = (x.float() * self._scale + self._shift).to(self.dtype)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self._y[idx]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Iterate the next epoch (0, 1, 2, ... on successive ``iter`` calls)."""
        epoch = self._next_epoch
        self._next_epoch += 1
        return self.iter_epoch(epoch)
