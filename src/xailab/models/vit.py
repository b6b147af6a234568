"""A Vision Transformer (Dosovitskiy et al. 2021) for small images, in one readable file (nanoGPT's style).

``[B, C, H, W]`` -> non-overlapping ``p x p`` patches -> linear patch embedding ``[B, N, D]`` -> a class token
in front and learned position embeddings added ``[B, 1 + N, D]`` -> ``depth`` pre-norm blocks
(``x + attn(norm1(x))``, ``x + mlp(norm2(x))``) -> final LayerNorm of the class token -> linear head ``[B, K]``.

The attention is written out (``softmax(q k^T / sqrt(d)) v``) and its post-softmax map ``[B, heads, T, T]``
passes through the identity module ``blocks.<i>.attn.attend``, so a forward hook there reads it (or replaces
it). With ``fused_attention=True`` a block uses ``scaled_dot_product_attention`` instead, except when a hook
listens at ``attend``: the map is then computed explicitly, so explanation methods always see it.

What explanation methods need is declared on the model, the way CNNs declare ``cam_layer``:
``capabilities`` (``{"attention", "tokens"}``), ``num_prefix_tokens`` (the class token), ``patch_size``,
``attention_layers`` (paths of the ``attend`` modules), ``block_layers`` (paths of the blocks, each outputting
``[B, 1 + N, D]``), ``cam_layer`` (the tokens entering the last block's attention: the last block's own patch
outputs never reach the logits), and ``forward_head(tokens, pool)`` mapping any block's tokens to logits.

The patch embedding is a ``Linear`` on unfolded patches (the same function as a ``Conv2d`` with kernel = stride
= patch), so the model has no convolution and CNN-only methods know they do not apply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xailab.errors import ConfigError
from xailab.models.base import register_model

# DeiT's sizes (Touvron et al. 2021): width, depth, heads
SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6)}


@dataclass(frozen=True)
class ViTConfig:
    """Hyper-parameters of a ViT; ``image_size`` is the size the position embeddings are learned for."""

    in_channels: int = 3
    num_classes: int = 10
    image_size: int = 32
    patch_size: int = 4
    width: int = 192
    depth: int = 12
    heads: int = 3
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    fused_attention: bool = False

    def __post_init__(self) -> None:
        for key in ("in_channels", "num_classes", "image_size", "patch_size", "width", "depth", "heads"):
            if getattr(self, key) < 1:
                raise ConfigError(f"vit: {key} must be at least 1, got {getattr(self, key)}")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"vit: image_size {self.image_size} is not divisible by patch_size {self.patch_size}; use "
                f"an image size that is a multiple of {self.patch_size} or a patch size dividing {self.image_size}"
            )
        if self.width % self.heads:
            raise ConfigError(
                f"vit: width {self.width} is not divisible by heads {self.heads}; choose heads dividing the width"
            )
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"vit: dropout must be in [0, 1), got {self.dropout}")


def grid_of(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """The ``(h, w)`` patch grid of an ``height x width`` image; ConfigError if the patch does not divide it."""
    if height % patch_size or width % patch_size:
        raise ConfigError(
            f"vit: the input is {height}x{width}, not divisible by the patch size {patch_size}; resize the "
            f"images to a multiple of {patch_size} (e.g. {height // patch_size * patch_size or patch_size}x"
            f"{width // patch_size * patch_size or patch_size}) or build the model with another patch_size"
        )
    return height // patch_size, width // patch_size


class PatchEmbedding(nn.Module):
    """Cut ``[B, C, H, W]`` into ``p x p`` patches (row-major) and project each: ``[B, (H/p)(W/p), D]``."""

    def __init__(self, in_channels: int, patch_size: int, width: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(in_channels * patch_size * patch_size, width)

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        p = self.patch_size
        h, w = grid_of(height, width, p)
        # [B, C, h, p, w, p] -> [B, h, w, C, p, p]: the (C, p, p) order of a Conv2d kernel
        patches = x.reshape(b, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, c * p * p)
        return self.proj(patches)


class TokenEmbedding(nn.Module):
    """Prepend the learned class token and add learned position embeddings: ``[B, N, D] -> [B, 1 + N, D]``.

    The position embeddings are learned for a ``grid`` of patches; another grid gets them bicubically
    interpolated (the class token's own embedding unchanged), as DeiT and timm do for fine-tuning at a new size.
    """

    def __init__(self, width: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = grid
        self.cls_token = nn.Parameter(torch.empty(1, 1, width))
        self.pos_embed = nn.Parameter(torch.empty(1, 1 + grid[0] * grid[1], width))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """ViT's initialisation: truncated normal, std 0.02 (also what the randomisation sanity check calls)."""
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def positions(self, grid: tuple[int, int]) -> Tensor:
        """Position embeddings ``[1, 1 + h * w, D]`` for a ``grid = (h, w)`` of patches."""
        if grid == self.grid:
            return self.pos_embed  # unchanged size: exactly the learned embeddings
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        d = patch_pos.shape[-1]
        patch_pos = patch_pos.reshape(1, *self.grid, d).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=grid, mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], d)], dim=1)

    def forward(self, patches: Tensor, grid: tuple[int, int]) -> Tensor:
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + self.positions(grid)


class Attention(nn.Module):
    """Multi-head self-attention ``[B, T, D] -> [B, T, D]`` with its map ``[B, heads, T, T]`` at ``attend``."""

    def __init__(self, width: int, heads: int, dropout: float, fused: bool) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.fused = fused
        self.qkv = nn.Linear(width, 3 * width)
        self.attend = nn.Identity()  # the post-softmax map passes here: the hook point of explanation methods
        self.attn_drop = nn.Dropout(dropout)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        # [B, T, 3D] -> 3 x [B, heads, T, D / heads]
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        listened = bool(self.attend._forward_hooks or self.attend._forward_pre_hooks)
        if self.fused and not listened:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        else:
            attention = (q @ k.transpose(-2, -1) * (1.0 / math.sqrt(q.shape[-1]))).softmax(dim=-1)
            y = self.attn_drop(self.attend(attention)) @ v
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    """``Linear(D, rD) -> GELU -> Linear(rD, D)`` with dropout after each linear layer."""

    def __init__(self, width: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """A pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``; ``[B, T, D]``."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width)
        self.attn = Attention(config.width, config.heads, config.dropout, config.fused_attention)
        self.norm2 = nn.LayerNorm(config.width)
        self.mlp = MLP(config.width, round(config.width * config.mlp_ratio), config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision Transformer ``[B, C, H, W] -> [B, K]``; H and W multiples of the patch size (see module doc)."""

    capabilities = frozenset({"attention", "tokens"})
    num_prefix_tokens = 1

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        p = config.patch_size
        self.patch_size = (p, p)
        self.patch_embed = PatchEmbedding(config.in_channels, p, config.width)
        self.tokens = TokenEmbedding(config.width, grid_of(config.image_size, config.image_size, p))
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, config.num_classes)
        self.block_layers = tuple(f"blocks.{i}" for i in range(config.depth))
        self.attention_layers = tuple(f"blocks.{i}.attn.attend" for i in range(config.depth))
        self.cam_layer = f"blocks.{config.depth - 1}.norm1"
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """The tokens after the last block (before the final norm): ``[B, C, H, W] -> [B, 1 + N, D]``."""
        grid = grid_of(x.shape[-2], x.shape[-1], self.config.patch_size)
        x = self.drop(self.tokens(self.patch_embed(x), grid))
        for block in self.blocks:
            x = block(x)
        return x

    def forward_head(self, tokens: Tensor, pool: Literal["cls", "mean"] = "cls") -> Tensor:
        """Logits ``[B, K]`` from any block's tokens ``[B, T, D]``: final norm + head of the class token
        (``cls``, the model's own pooling) or of the mean token (``mean``, LeGrad's layer-wise score)."""
        pooled = tokens[:, 0] if pool == "cls" else tokens.mean(dim=1)
        return self.head(self.norm(pooled))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@register_model("vit_tiny", input_size=(32, 32))
def vit_tiny(
    in_channels: int = 3,
    num_classes: int = 10,
    size: Literal["tiny", "small"] = "tiny",
    image_size: int = 32,
    patch_size: int = 4,
    width: int | None = None,
    depth: int | None = None,
    heads: int | None = None,
    mlp_ratio: float = 4.0,
    dropout: float = 0.0,
    fused_attention: bool = False,
) -> ViT:
    """Vision Transformer, patch 4 at 32x32 (DeiT-Tiny 192 wide, 12 deep, 3 heads; size=small: 384/12/6)."""
    if size not in SIZES:
        raise ConfigError(f"vit_tiny: size {size!r} is not one of: {', '.join(SIZES)}")
    default_width, default_depth, default_heads = SIZES[size]
    return ViT(
        ViTConfig(
            in_channels=in_channels,
            num_classes=num_classes,
            image_size=image_size,
            patch_size=patch_size,
            width=width or default_width,
            depth=depth or default_depth,
            heads=heads or default_heads,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            fused_attention=fused_attention,
        )
    )
