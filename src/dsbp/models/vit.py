"""A small Vision Transformer (Dosovitskiy et al. 2021) for the LoRA and transfer settings.

Every dense map is an ``nn.Linear`` (attention ``qkv`` and ``proj``, MLP ``fc1`` and ``fc2``, the
``head``), so LoRA (``target_modules=["qkv", "proj", "fc1", "fc2"]``) and DSBP's hooks apply to
them unchanged. The patch embedding is a stride-``patch`` Conv2d, i.e. a Linear on each
non-overlapping patch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Attention", "Block", "ViT"]


class Attention(nn.Module):
    """Multi-head self-attention from two Linears (``qkv``: dim -> 3 dim, ``proj``: dim -> dim).

    Shapes: (N, T, dim) -> (N, T, dim).
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (N, heads, T, d_head)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, heads, T, d_head)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)).

    Args:
        dim: token width.
        heads: attention heads (dim must be divisible by heads).
        mlp_ratio: hidden width of the MLP as a multiple of ``dim``. Default 4.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """Small ViT: conv patch embedding, learned position embedding, pre-norm blocks, linear head.

    Args:
        image_size: input height = width in pixels. Default 32.
        patch: patch side in pixels; must divide ``image_size``. Default 4 (64 patches at 32x32).
        in_channels: image channels. Default 3.
        num_classes: output logits. Default 10.
        dim: token width. Default 128.
        depth: number of transformer blocks. Default 6.
        heads: attention heads. Default 4.
        mlp_ratio: MLP hidden width / dim. Default 4.
        pool: ``"cls"`` (a learned class token, read out after the last block) or ``"mean"``
            (mean over patch tokens). Default ``"cls"``.

    Shapes: (N, in_channels, image_size, image_size) -> (N, num_classes). The token sequence
    has ``num_patches = (image_size // patch) ** 2`` patch tokens, plus one with ``pool="cls"``.
    """

    def __init__(
        self,
        image_size: int = 32,
        patch: int = 4,
        in_channels: int = 3,
        num_classes: int = 10,
        dim: int = 128,
        depth: int = 6,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        pool: str = "cls",
    ) -> None:
        super().__init__()
        if patch < 1 or image_size < 1 or image_size % patch != 0:
            raise ValueError(f"patch ({patch}) must divide image_size ({image_size})")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        for name, v in (
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("dim", dim),
            ("depth", depth),
            ("heads", heads),
        ):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.image_size = image_size
        self.patch = patch
        self.pool = pool
        self.num_patches = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        n_tokens = self.num_patches + (1 if pool == "cls" else 0)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch (and class) tokens with position embedding: (N, C, H, W) -> (N, T, dim)."""
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"ViT built for {self.image_size}x{self.image_size} inputs, got "
                f"{tuple(x.shape[-2:])}"
            )
        t = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, num_patches, dim)
        if self.cls_token is not None:
            t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        return t + self.pos_embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(x)
        for blk in self.blocks:
            t = blk(t)
        t = self.norm(t)
        feat = t[:, 0] if self.pool == "cls" else t.mean(dim=1)  # (N, dim)
        return self.head(feat)
