"""How a Linear / Conv2d turns activations and gradients into matrices (the K-FAC adapter idea).

* Weight / gradient: (d_out, d_in); a conv weight (C_out, C_in, kh, kw) is viewed as
  C_out x (C_in*kh*kw), METHOD.md §1.
* Output side: rows are the layer's outputs; for a conv, one row per sample and spatial
  position, d = C_out.
* Input side: rows are the layer's inputs; for a conv, im2col patches, d = C_in*kh*kw (the
  K-FAC "A" factor).

Rows are subsampled while they are extracted, so a refresh never materialises the full
(N*H*W, d) matrix of a large conv layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED = (nn.Linear, nn.Conv2d)


def is_supported(module: nn.Module) -> bool:
    return isinstance(module, SUPPORTED)


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """View a Linear / Conv2d weight (or its gradient) as a (d_out, d_in) matrix (no copy)."""
    return t.reshape(t.shape[0], -1)


def dim(module: nn.Module, side: str) -> int:
    """Width ``d`` of the covariance on ``side`` for ``module``."""
    W = as_matrix(module.weight)
    return W.shape[0] if side == "output" else W.shape[1]


def check_module(module: nn.Module, side: str, name: str = "") -> None:
    """Raise a clear error for layer configurations the input-side adapter cannot express."""
    if not is_supported(module):
        raise TypeError(f"layer {name!r} is a {type(module).__name__}; supported: Linear, Conv2d")
    if side == "input" and isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError(
                f"Conv2d {name!r} has groups={module.groups}: the input side (im2col) needs "
                "groups=1; use side='output' for grouped or depthwise convolutions"
            )
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            raise ValueError(
                f"Conv2d {name!r} uses padding={module.padding!r}, padding_mode="
                f"{module.padding_mode!r}: the input side supports integer zero padding only"
            )


def _pick(n: int, m: int, generator: torch.Generator) -> torch.Tensor:
    """``m`` distinct sorted indices out of ``n`` (all of them when m >= n), CPU int64.

    For n <= 4m a uniformly random m-subset (from a permutation of all n). Beyond that,
    stratified in O(m) [ours]: one index drawn uniformly from each of m equal consecutive
    stretches of ``[0, n)``. Every index is drawn with probability exactly m/n (so the
    covariance of the sampled rows stays unbiased), the draws are distinct and sorted by
    construction, and the sample is spread evenly over the batch and the positions. A
    ``randperm`` of n = 524288 rows (ResNet-18's first stage at batch 512) took 7 ms of host
    time per layer and refresh, more than the eigensolve.
    """
    if m >= n:
        return torch.arange(n)
    if n <= 4 * m:
        return torch.randperm(n, generator=generator)[:m].sort().values
    u = torch.rand(m, generator=generator, dtype=torch.float64)
    idx = ((torch.arange(m, dtype=torch.float64) + u) * (n / m)).long()
    return idx.clamp_(max=n - 1)


def _to(idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Indices to ``device`` without a host synchronisation (a pageable host-to-GPU copy waits
    for the stream, which serialised the forward pass on refresh steps): via pinned memory."""
    if device.type != "cuda":
        return idx.to(device)
    return idx.pin_memory().to(device, non_blocking=True)


def rows(
    module: nn.Module,
    inp: torch.Tensor,
    out: torch.Tensor,
    side: str,
    max_rows: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Activation rows (n, d), at most ``max_rows`` of them, detached, in fp32.

    Args:
        module: the Linear or Conv2d layer.
        inp: its input, (..., d_in) for Linear, (N, C_in, H, W) for Conv2d.
        out: its output, (..., d_out) or (N, C_out, H', W').
        side: ``"output"`` or ``"input"``.
        max_rows: cap on rows; rows beyond it are subsampled without replacement.
        generator: private CPU generator that picks the rows.
    """
    with torch.no_grad():
        if isinstance(module, nn.Linear):
            a = (out if side == "output" else inp).detach()
            a = a.reshape(-1, a.shape[-1])
            idx = _to(_pick(a.shape[0], max_rows, generator), a.device)
            return a.index_select(0, idx).float()
        if side == "output":
            o = out.detach().flatten(2)  # (N, C_out, L)
            N, C, L = o.shape
            flat = _to(_pick(N * L, max_rows, generator), o.device)
            return o[flat // L, :, flat % L].float()  # (m, C_out)
        # input side, conv: im2col only on enough images to supply max_rows rows (x4 for variety)
        x = inp.detach()
        N = x.shape[0]
        Lh = _out_len(x.shape[2], module, 0)
        Lw = _out_len(x.shape[3], module, 1)
        L = Lh * Lw
        n_img = min(N, max(1, math.ceil(4 * max_rows / L)))
        imgs = _to(_pick(N, n_img, generator), x.device)
        cols = F.unfold(
            x.index_select(0, imgs),
            kernel_size=module.kernel_size,
            dilation=module.dilation,
            padding=module.padding,
            stride=module.stride,
        )  # (n_img, C_in*kh*kw, L)
        cols = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        idx = _to(_pick(cols.shape[0], max_rows, generator), cols.device)
        return cols.index_select(0, idx).float()


def _out_len(size: int, conv: nn.Conv2d, axis: int) -> int:
    p, d, k, s = conv.padding[axis], conv.dilation[axis], conv.kernel_size[axis], conv.stride[axis]
    return (size + 2 * p - d * (k - 1) - 1) // s + 1
