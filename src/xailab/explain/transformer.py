"""Explanation methods of attention models: attention rollout, transformer attribution and LeGrad.

Each is ``fn(model, inputs[B, C, H, W], target[B], ...) -> [B, 1, H, W]``: a relevance per patch token, laid
out on the patch grid and upsampled bilinearly to the input size. They read what the model declares (see
``xailab.models.vit``): ``attention_layers`` (modules whose output is a post-softmax attention map
``[B, heads, T, T]``), ``block_layers`` (modules outputting the tokens ``[B, T, D]``), ``num_prefix_tokens``,
``patch_size`` and, for LeGrad, ``forward_head(tokens, pool)``. They register with ``needs={"attention",
"tokens"}``, so ``explain`` refuses them for a CNN with an error listing the methods that apply.

Hooks live only inside ``recorded_outputs`` (removed on leaving it, also on errors); gradients come from
``torch.autograd.grad`` on the recorded maps, so no backward hook exists.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xailab.errors import ConfigError
from xailab.explain.base import register_method
from xailab.explain.cam import get_layer
from xailab.explain.tokens import TokenGrid, token_grid

HeadFusion = Literal["mean", "max", "min"]
TRANSFORMER_NEEDS = frozenset({"attention", "tokens"})
# torchcam's guard of the min-max normalisation (``_CAM._normalize``), kept for LeGrad's parity
NORMALISE_EPS = 1e-8


def declared(model: nn.Module, name: str) -> tuple[str, ...]:
    """The module paths ``model`` declares under ``name`` (``attention_layers``, ``block_layers``)."""
    paths = getattr(model, name, None)
    if not paths:
        raise ConfigError(
            f"the model declares no {name}; an attention model lists its modules' paths there "
            f"(see xailab.models.vit.ViT)"
        )
    return tuple(paths)


@contextlib.contextmanager
def recorded_outputs(
    model: nn.Module, paths: Sequence[str], differentiable: bool = False
) -> Iterator[list[Tensor | None]]:
    """Within the block, each forward pass stores the output of ``model``'s module ``paths[i]`` at index ``i``
    of the yielded list. ``differentiable``: an output that does not require grad (frozen model, forced map) is
    replaced by a leaf copy that does, so ``torch.autograd.grad`` can differentiate w.r.t. it. All hooks are
    removed on leaving the block, also when the forward pass raises."""
    outputs: list[Tensor | None] = [None] * len(paths)

    def recorder(index: int):
        def record(_module: nn.Module, _inputs: tuple, output: Tensor) -> Tensor | None:
            if differentiable and not output.requires_grad:
                output = output.detach().requires_grad_(True)
                outputs[index] = output
                return output
            outputs[index] = output
            return None

        return record

    handles = []
    try:
        for index, path in enumerate(paths):
            handles.append(get_layer(model, path).register_forward_hook(recorder(index)))
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def fuse_heads(attention: Tensor, how: HeadFusion) -> Tensor:
    """``[B, heads, T, T] -> [B, T, T]`` by the mean, max or min over heads (Abnar & Zuidema's fusions)."""
    if how == "mean":
        return attention.mean(dim=1)
    if how == "max":
        return attention.amax(dim=1)
    if how == "min":
        return attention.amin(dim=1)
    raise ConfigError(f"head_fusion {how!r} is not one of: mean, max, min")


def discard_lowest(attention: Tensor, ratio: float) -> Tensor:
    """Zero the lowest ``ratio`` fraction of each ``[T, T]`` map of ``[B, T, T]``, never the class token's
    attention to itself (entry ``[0, 0]``), as in the reference rollout code (jacobgil/vit-explain)."""
    if ratio == 0:
        return attention
    b, t, _ = attention.shape
    flat = attention.reshape(b, t * t)
    lowest = flat.topk(int(t * t * ratio), dim=1, largest=False).indices
    drop = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, lowest, True)
    drop[:, 0] = False
    return flat.masked_fill(drop, 0).reshape(b, t, t)


def rollout(attentions: Sequence[Tensor], discard_ratio: float = 0.0, residual: bool = True) -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020) of head-fused maps ``[B, T, T]``, first layer first.

    Each layer's map gets the residual connection (``(A + I) / 2``, when ``residual``) and rows renormalised to
    sum to 1; the rollout is ``A_L ... A_2 A_1`` ``[B, T, T]``: row ``i`` is how much token ``i`` of the last
    layer draws on each input token.
    """
    b, t, _ = attentions[0].shape
    eye = torch.eye(t, device=attentions[0].device, dtype=attentions[0].dtype).expand(b, t, t)
    result = eye
    for attention in attentions:
        attention = discard_lowest(attention, discard_ratio)
        if residual:
            attention = (attention + eye) / 2
        attention = attention / attention.sum(dim=-1, keepdim=True).clamp_min(
            torch.finfo(attention.dtype).tiny
        )
        result = attention @ result
    return result


def patch_map(relevance: Tensor, grid: TokenGrid, size: tuple[int, ...]) -> Tensor:
    """Relevance per patch token ``[B, h * w]`` as a map ``[B, 1, H, W]`` (bilinear upsampling)."""
    maps = relevance.reshape(-1, 1, grid.height, grid.width)
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def layout(model: nn.Module, inputs: Tensor) -> TokenGrid:
    """The model's token grid for ``inputs``; a model without declared tokens gets a ConfigError."""
    grid = token_grid(model, inputs)
    if grid is None:
        raise ConfigError("this method needs a model that declares 'tokens' in its capabilities (a ViT)")
    return grid


def recorded(outputs: list[Tensor | None], paths: Sequence[str]) -> list[Tensor]:
    """The recorded outputs, or a ConfigError naming a declared module the forward pass never ran."""
    for output, path in zip(outputs, paths, strict=True):
        if not isinstance(output, Tensor):
            raise ConfigError(f"the declared layer {path!r} did not run in the forward pass; check its path")
    return [output for output in outputs if output is not None]


@register_method("attention_rollout", needs=TRANSFORMER_NEEDS)
def attention_rollout(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor,
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
    residual: bool = True,
) -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020): the class token's row of the rollout of every layer's
    head-fused attention, on the patches; ``[B, 1, H, W]``. Class-agnostic: ``target`` is not used.

    ``head_fusion``: mean, max or min over heads; ``discard_ratio``: fraction of the lowest attention weights
    of each layer set to zero; ``residual``: add the identity for the skip connections (the paper does).
    """
    if not 0 <= discard_ratio < 1:
        raise ConfigError(f"attention_rollout: discard_ratio must be in [0, 1), got {discard_ratio}")
    grid = layout(model, inputs)
    paths = declared(model, "attention_layers")
    with torch.no_grad(), recorded_outputs(model, paths) as outputs:
        model(inputs)
        fused = [fuse_heads(a, head_fusion) for a in recorded(outputs, paths)]
        relevance = rollout(fused, discard_ratio, residual)[:, 0, grid.prefix :]
    return patch_map(relevance, grid, inputs.shape[-2:])


@register_method("transformer_attribution", needs=TRANSFORMER_NEEDS)
def transformer_attribution(model: nn.Module, inputs: Tensor, target: Tensor) -> Tensor:
    """Gradient-weighted attention rollout (Chefer, Gur & Wolf 2021, "Generic Attention-model Explainability",
    their rule for self-attention encoders): ``R = I``, then for every layer ``R <- R + E_h[(dA * A)^+] R``,
    with ``A`` the layer's attention ``[B, heads, T, T]`` and ``dA`` the target logit's gradient w.r.t. it;
    the class token's row of ``R`` on the patches, ``[B, 1, H, W]``.

    (Their CVPR 2021 "Transformer Interpretability Beyond Attention Visualization" weights the gradient by
    LRP relevances instead of ``A``; the generic rule here is the one their later code recommends for ViTs.)
    """
    grid = layout(model, inputs)
    paths = declared(model, "attention_layers")
    x = inputs.detach().requires_grad_(True)
    with torch.enable_grad(), recorded_outputs(model, paths, differentiable=True) as outputs:
        score = model(x).gather(1, target[:, None]).sum()
        attentions = recorded(outputs, paths)
        grads = torch.autograd.grad(score, attentions, allow_unused=True)
    b, _, t, _ = attentions[0].shape
    relevance = torch.eye(t, device=x.device, dtype=attentions[0].dtype).expand(b, t, t)
    for attention, grad in zip(attentions, grads, strict=True):
        if grad is None:  # a layer the logits do not depend on adds nothing
            continue
        weighted = (grad * attention.detach()).clamp_min(0).mean(dim=1)
        relevance = relevance + weighted @ relevance
    return patch_map(relevance[:, 0, grid.prefix :], grid, inputs.shape[-2:])


@register_method("legrad", needs=TRANSFORMER_NEEDS)
def legrad(model: nn.Module, inputs: Tensor, target: Tensor, layers: int | None = None) -> Tensor:
    """LeGrad (Bousselham et al. 2024): for each of the last ``layers`` blocks (default: all), the gradient of
    that block's own target score (its tokens, mean-pooled, through the final norm and head:
    ``forward_head(tokens, "mean")``) w.r.t. its attention map; ReLU, mean over heads and queries, the patch
    keys averaged over the blocks and min-max normalised per image; ``[B, 1, H, W]``.

    The same computation as torchcam 0.5.0's ``LeGrad`` (tested for parity), batched over images.
    """
    grid = layout(model, inputs)
    attention_paths = declared(model, "attention_layers")
    block_paths = declared(model, "block_layers")
    if len(attention_paths) != len(block_paths):
        raise ConfigError(
            f"the model declares {len(attention_paths)} attention_layers but {len(block_paths)} block_layers; "
            f"LeGrad pairs each block with its attention"
        )
    head = getattr(model, "forward_head", None)
    if not callable(head):
        raise ConfigError(
            "legrad needs the model's forward_head(tokens, pool) mapping a block's tokens to logits"
        )
    depth = len(block_paths)
    count = depth if layers is None else layers
    if not 1 <= count <= depth:
        raise ConfigError(f"legrad: layers must be between 1 and the model's depth {depth}, got {layers}")
    attention_paths, block_paths = attention_paths[depth - count :], block_paths[depth - count :]
    x = inputs.detach().requires_grad_(True)
    relevances = []
    with (
        torch.enable_grad(),
        recorded_outputs(model, attention_paths, differentiable=True) as attentions,
        recorded_outputs(model, block_paths) as blocks,
    ):
        model(x)
        attention_maps = recorded(attentions, attention_paths)
        for i, (tokens, attention) in enumerate(
            zip(recorded(blocks, block_paths), attention_maps, strict=True)
        ):
            score = head(tokens, "mean").gather(1, target[:, None]).sum()
            (grad,) = torch.autograd.grad(score, attention, retain_graph=i < count - 1)
            relevances.append(grad.clamp_min(0).mean(dim=(1, 2))[:, grid.prefix :])
    cam = torch.stack(relevances).mean(dim=0)
    cam = cam - cam.amin(dim=1, keepdim=True)
    cam = cam / (cam.amax(dim=1, keepdim=True) + NORMALISE_EPS)
    return patch_map(cam, grid, inputs.shape[-2:])
