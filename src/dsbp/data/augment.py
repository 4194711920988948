"""Batched on-device augmentation: pad once, then random crops and horizontal flips.

The random draws are arguments, not drawn inside, so the functions are pure and the loader
decides where randomness comes from (a private generator per (seed, epoch)). As in
KellerJordan/cifar10-airbench, the whole data set is padded once and each batch is cropped
from the padded copy; any dtype works (uint8 stays uint8, 4x less device memory than fp32).
"""

from __future__ import annotations

import torch

PAD_MODES = ("reflect", "zeros")


def _reflect_index(n: int, pad: int, device: torch.device) -> torch.Tensor:
    # Indices -pad..n+pad-1 mirrored about the edge pixels (numpy "reflect", torch "reflect").
    i = torch.arange(-pad, n + pad, device=device)
    i = i.abs()
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


def pad_images(x: torch.Tensor, pad: int, mode: str = "reflect") -> torch.Tensor:
    """Pad (N, C, H, W) images by ``pad`` pixels on every side.

    Args:
        x: Images of any dtype, (N, C, H, W).
        pad: Pixels per side, 0 <= pad < min(H, W) for reflect.
        mode: ``"reflect"`` (mirror without repeating the edge, airbench's choice) or
            ``"zeros"`` (torchvision RandomCrop's default fill).

    Returns:
        (N, C, H + 2 pad, W + 2 pad), same dtype and device.
    """
    if mode not in PAD_MODES:
        raise ValueError(f"pad mode must be one of {PAD_MODES}, got {mode!r}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    if pad == 0:
        return x
    n, c, h, w = x.shape
    if mode == "zeros":
        out = x.new_zeros((n, c, h + 2 * pad, w + 2 * pad))
        out[:, :, pad:pad + h, pad:pad + w] = x
        return out
    if pad >= min(h, w):
        raise ValueError(f"reflect padding {pad} needs images larger than {pad}, got {h}x{w}")
    rows = _reflect_index(h, pad, x.device)
    cols = _reflect_index(w, pad, x.device)
    return x[:, :, rows][:, :, :, cols]


def crop(
    x_padded: torch.Tensor,
    offsets: torch.Tensor,
    size: tuple[int, int],
    flip: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cut one window per image from padded images, optionally mirrored left-right.

    Args:
        x_padded: (B, C, Hp, Wp).
        offsets: int (B, 2): top-left corner (row, col) of each window, in
            ``[0, Hp - h] x [0, Wp - w]``.
        size: Window (h, w).
        flip: Optional bool (B,): mirror window b left-right where True (folded into the same
            gather, so a flip costs nothing extra).

    Returns:
        (B, C, h, w); image b is ``x_padded[b, :, r:r+h, c:c+w]`` with ``(r, c) = offsets[b]``,
        flipped along the last axis where ``flip[b]``.
    """
    b, c, hp, wp = x_padded.shape
    h, w = size
    if offsets.shape != (b, 2):
        raise ValueError(f"offsets must be ({b}, 2), got {tuple(offsets.shape)}")
    if not (0 < h <= hp and 0 < w <= wp):
        raise ValueError(f"window {size} does not fit images of {hp}x{wp}")
    dev = x_padded.device
    # Checked only for CPU offsets: on an accelerator the check would force a host sync per
    # batch (the loader draws offsets in range itself).
    if offsets.device.type == "cpu" and bool(
        ((offsets < 0) | (offsets > torch.tensor([hp - h, wp - w]))).any()
    ):
        raise ValueError(f"offsets must lie in [0, {hp - h}] x [0, {wp - w}]")
    offsets = offsets.to(dev, torch.int64)
    j = torch.arange(w, device=dev)
    if flip is not None:
        j = torch.where(flip.to(dev).view(b, 1), w - 1 - j, j)  # (B, w) or (w,)
    rows = offsets[:, 0:1] + torch.arange(h, device=dev)  # (B, h)
    cols = offsets[:, 1:2] + j  # (B, w)
    # One flat gather per image: 6x faster on CPU than 4-D advanced indexing (measured,
    # 512x3x40x40 uint8: 11 ms vs 60 ms), and the same result.
    idx = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return torch.gather(x_padded.reshape(b, c, hp * wp), 2, idx).view(b, c, h, w)


def flip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the images where ``mask`` (bool (B,)) is True."""
    return torch.where(mask.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)
