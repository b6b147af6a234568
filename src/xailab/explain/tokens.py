"""Token sequences seen as feature maps: what lets the class activation maps explain a Vision Transformer.

A transformer layer outputs ``[B, P + h * w, D]``: ``P`` prefix tokens (the class token) then one token per
patch, row-major. ``TokenGrid`` turns that into the ``[B, D, h, w]`` map a CAM expects and back. The grid comes
from the model's declaration (``capabilities`` containing ``"tokens"``, ``num_prefix_tokens``, ``patch_size``)
and the input size, never from the user: ``token_grid(model, inputs)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from xailab.errors import ConfigError


@dataclass(frozen=True)
class TokenGrid:
    """The layout of a token sequence: ``prefix`` non-patch tokens, then an ``height x width`` patch grid."""

    prefix: int
    height: int
    width: int

    def fits(self, output: object) -> bool:
        """Whether ``output`` is a token sequence ``[B, prefix + height * width, D]`` of this layout."""
        return (
            isinstance(output, Tensor)
            and output.ndim == 3
            and output.shape[1] == self.prefix + self.height * self.width
        )

    def to_grid(self, tokens: Tensor) -> Tensor:
        """The patch tokens as a feature map: ``[B, P + h * w, D] -> [B, D, h, w]`` (prefix tokens dropped)."""
        b, _, d = tokens.shape
        return tokens[:, self.prefix :].transpose(1, 2).reshape(b, d, self.height, self.width)

    def to_tokens(self, grid: Tensor, tokens: Tensor) -> Tensor:
        """The inverse of ``to_grid``: the prefix tokens of ``tokens`` followed by ``grid`` ``[B, D, h, w]``
        flattened back to ``[B, h * w, D]``; returns ``[B, P + h * w, D]``."""
        return torch.cat([tokens[:, : self.prefix], grid.flatten(2).transpose(1, 2)], dim=1)


def has_tokens(model: nn.Module) -> bool:
    """Whether ``model`` declares token outputs (``"tokens"`` in its ``capabilities``)."""
    return "tokens" in getattr(model, "capabilities", ())


def token_grid(model: nn.Module, inputs: Tensor) -> TokenGrid | None:
    """The token layout of ``model``'s layers for ``inputs`` ``[B, C, H, W]``, from its declaration
    (``num_prefix_tokens``, ``patch_size``); None for models without tokens (CNNs)."""
    if not has_tokens(model):
        return None
    patch = getattr(model, "patch_size", None)
    if patch is None:
        raise ConfigError(
            "the model declares 'tokens' but no patch_size; declare patch_size = (ph, pw) and num_prefix_tokens"
        )
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    height, width = inputs.shape[-2:]
    if height % ph or width % pw:
        raise ConfigError(
            f"the input is {height}x{width}, not divisible by the model's patch size {ph}x{pw}; resize it to "
            f"a multiple of the patch size"
        )
    return TokenGrid(int(getattr(model, "num_prefix_tokens", 0)), height // ph, width // pw)
