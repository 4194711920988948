"""Distribution shifts of uint8 images and shifted streams, in pure torch (any device).

Used by dynamic spectral inference (METHOD.md §2.1), which is evaluated on shifted streams the
project makes itself. Severity tables are [ours]: five levels per kind, of the order of the
CIFAR-10-C corruptions (Hendrycks & Dietterich 2019) for noise, blur and contrast, and 15
degrees per level for rotation. All functions keep shape (N, C, H, W) and dtype uint8.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

KINDS = ("rotate", "noise", "blur", "contrast")
# Per severity 1..5 [ours]:
ROTATE_DEGREES = (15.0, 30.0, 45.0, 60.0, 75.0)  # counter-clockwise, as displayed
NOISE_SIGMA = (0.04, 0.06, 0.08, 0.10, 0.14)  # Gaussian noise std, in [0, 1] pixel units
BLUR_SIGMA = (0.4, 0.6, 0.8, 1.0, 1.5)  # Gaussian kernel std, in pixels
CONTRAST_FACTOR = (0.75, 0.5, 0.4, 0.3, 0.15)  # fraction of the deviation from the mean kept


def _check(x: torch.Tensor) -> None:
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise ValueError(f"expected uint8 images (N, C, H, W), got {x.dtype} {tuple(x.shape)}")


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.round().clamp(0, 255).to(torch.uint8)


def rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate every image by ``degrees`` counter-clockwise about its centre (as displayed).

    Bilinear interpolation; pixels rotated in from outside the image are 0. Rotating by 0 is
    the identity and by 90 equals ``torch.rot90(x, 1, (-2, -1))`` for square images.

    Args:
        x: uint8 (N, C, H, W).
        degrees: Angle in degrees.
    """
    _check(x)
    n, _, h, w = x.shape
    a = math.radians(degrees)
    cos, sin = math.cos(a), math.sin(a)
    # affine_grid maps output coords (x right, y down, normalised to [-1, 1]) to input coords.
    # A counter-clockwise turn on screen (y down) samples the input at R(+a) applied to the
    # output position; the aspect terms keep the rotation rigid for non-square images.
    theta = torch.tensor([[cos, -sin * h / w, 0.0], [sin * w / h, cos, 0.0]],
                         dtype=torch.float32, device=x.device).expand(n, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    return _to_uint8(out)


def gaussian_noise(x: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    """Add i.i.d. Gaussian noise of std ``sigma`` (in [0, 1] pixel units), clip to [0, 255].

    The noise comes from a private CPU generator seeded with ``seed``, so the result is the
    same on every device.
    """
    _check(x)
    g = torch.Generator().manual_seed(int(seed))
    z = torch.randn(x.shape, generator=g).to(x.device)
    return _to_uint8(x.float() + (255.0 * sigma) * z)


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian taps, radius ceil(3 sigma), float32 (2r+1,)."""
    if sigma <= 0:
        raise ValueError(f"blur sigma must be > 0, got {sigma}")
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).float()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of std ``sigma`` pixels, reflect padding at the borders."""
    _check(x)
    n, c, h, w = x.shape
    k = gaussian_kernel1d(sigma).to(x.device)
    r = (len(k) - 1) // 2
    y = x.float().reshape(n * c, 1, h, w)
    mode = "reflect" if r < min(h, w) else "replicate"
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode=mode), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode=mode), k.view(1, 1, -1, 1))
    return _to_uint8(y.reshape(n, c, h, w))


def contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Pull every pixel towards its image's mean: ``m + factor * (x - m)``.

    ``m`` is the mean over all channels and pixels of each image, as in CIFAR-10-C; factor 1
    is the identity, 0 gives a flat grey image.
    """
    _check(x)
    xf = x.float()
    m = xf.mean(dim=(1, 2, 3), keepdim=True)
    return _to_uint8(m + factor * (xf - m))


def apply_shift(x_uint8: torch.Tensor, kind: str, severity: int, seed: int = 0) -> torch.Tensor:
    """Apply one shift at one severity.

    Args:
        x_uint8: uint8 (N, C, H, W).
        kind: ``"rotate"``, ``"noise"``, ``"blur"`` or ``"contrast"``.
        severity: 1..5 (0 returns an unchanged copy, the clean reference).
        seed: Seed of the noise draw (other kinds are deterministic).

    Returns:
        uint8 (N, C, H, W), same device.
    """
    _check(x_uint8)
    if kind not in KINDS:
        raise ValueError(f"unknown shift kind {kind!r}; expected one of {KINDS}")
    if not isinstance(severity, int) or not 0 <= severity <= 5:
        raise ValueError(f"severity must be an int in 0..5, got {severity!r}")
    if severity == 0:
        return x_uint8.clone()
    s = severity - 1
    if kind == "rotate":
        return rotate(x_uint8, ROTATE_DEGREES[s])
    if kind == "noise":
        return gaussian_noise(x_uint8, NOISE_SIGMA[s], seed)
    if kind == "blur":
        return gaussian_blur(x_uint8, BLUR_SIGMA[s])
    return contrast(x_uint8, CONTRAST_FACTOR[s])


def shifted_stream(
    x: torch.Tensor,
    y: torch.Tensor,
    schedule: Sequence[tuple[str, int]],
    batch_size: int,
    seed: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, str, int]]:
    """A non-stationary test stream: one pass over the data per (kind, severity) segment.

    Each segment visits all samples in a fresh random order (private generator seeded from
    ``seed`` and the segment index [ours]) in batches of ``batch_size``, with its shift
    applied; labels are for evaluation only.

    Args:
        x: uint8 (N, C, H, W).
        y: labels (N,).
        schedule: Segments, e.g. ``[("rotate", 1), ("rotate", 3), ("noise", 5)]``.
        batch_size: Images per yielded batch.
        seed: Seed of the order and of the noise.

    Yields:
        ``(x_shifted uint8 (B, C, H, W), y (B,), kind, severity)``.
    """
    _check(x)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for seg, (kind, severity) in enumerate(schedule):
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + seg)
        order = torch.randperm(x.shape[0], generator=g)
        for b, lo in enumerate(range(0, x.shape[0], batch_size)):
            idx = order[lo:lo + batch_size]
            xb = apply_shift(x[idx.to(x.device)], kind, severity,
                             seed=int(seed) * 1_000_003 + seg * 100_003 + b)
            yield xb, y[idx.to(y.device)], kind, severity
