"""Pure batched tensor functions on uint8 NHWC images: augmentation, resizing, channel conversion, splits.

Every function works on any device. Random numbers come from an explicit ``torch.Generator``, drawn on the
generator's device and then moved to the images' device, so a CPU generator can drive GPU augmentation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from xailab.data.base import Augment

# ITU-R BT.601 luma weights in 16-bit fixed point, exactly as Pillow's convert("L") uses them,
# so tensor conversion and decode-time conversion of image folders give identical pixels.
_LUMA_WEIGHTS = (19595, 38470, 7471)

# Which images of a split are explained and assessed (``sample_indices``).
Sample = Literal["balanced", "first"]


def _draw_randint(high: int, n: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """``[n]`` ints in ``[0, high)`` drawn on the generator's device, returned on ``device``."""
    return torch.randint(0, high, (n,), generator=generator, device=generator.device).to(device)


def random_crop(x: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Zero-pad ``x`` (``[B, H, W, C]``) by ``padding`` on each side, then crop ``[H, W]`` at per-sample offsets.

    Gathers all windows with one advanced-indexing call. ``padding == 0`` returns ``x`` unchanged.
    """
    if padding == 0:
        return x
    b, h, w, _ = x.shape
    padded = F.pad(x, (0, 0, padding, padding, padding, padding))
    oy = _draw_randint(2 * padding + 1, b, generator, x.device)
    ox = _draw_randint(2 * padding + 1, b, generator, x.device)
    rows = oy[:, None] + torch.arange(h, device=x.device)  # [B, H]
    cols = ox[:, None] + torch.arange(w, device=x.device)  # [B, W]
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]]


def random_hflip(x: Tensor, generator: torch.Generator) -> Tensor:
    """Mirror each image of ``x`` (``[B, H, W, C]``) left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=generator, device=generator.device).to(x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(2), x)


def _draw_uniform(n: int, k: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """``[n, k]`` floats uniform in ``[-1, 1)``, drawn on the generator's device, returned on ``device``."""
    return (torch.rand(n, k, generator=generator, device=generator.device) * 2 - 1).to(device)


def affine_theta(u: Tensor, rotate: float, scale: float, translate: float) -> Tensor:
    """The ``[B, 2, 3]`` sampling matrices of ``affine_warp`` from ``u`` (``[B, 4]`` in ``[-1, 1]``): rotation
    ``u[:, 0] * rotate`` degrees (positive turns the content clockwise on screen, rows downwards), zoom
    ``1 + u[:, 1] * scale`` (> 1 enlarges the content), shift of the content by ``u[:, 2] * translate`` of the
    width (positive: right) and ``u[:, 3] * translate`` of the height (positive: down)."""
    angle = u[:, 0] * math.radians(rotate)
    zoom = 1 + u[:, 1] * scale
    # theta maps output to input coordinates in [-1, 1]: a zoom by s samples a region 1/s as large, and a
    # content shift by a fraction f of the size samples at -2f in these coordinates
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    row_x = torch.stack([cos, sin, -2 * translate * u[:, 2]], 1)
    row_y = torch.stack([-sin, cos, -2 * translate * u[:, 3]], 1)
    return torch.stack([row_x, row_y], 1)


def affine_warp(x: Tensor, theta: Tensor) -> Tensor:
    """Resample uint8 ``x`` (``[B, H, W, C]``) through per-image matrices ``theta`` (``[B, 2, 3]``, output to
    input coordinates in ``[-1, 1]``): one ``affine_grid`` + ``grid_sample`` for the batch, bilinear, edges
    filled by the nearest pixel (``padding_mode="border"``, Keras' ``fill_mode="nearest"``). Returns uint8."""
    b, h, w, c = x.shape
    grid = F.affine_grid(theta.float(), [b, c, h, w], align_corners=False)
    warped = F.grid_sample(
        x.permute(0, 3, 1, 2).float(), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return warped.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def random_affine(
    x: Tensor, rotate: float, scale: float, translate: float, generator: torch.Generator
) -> Tensor:
    """Warp each image of uint8 ``x`` (``[B, H, W, C]``) by its own random rotation, zoom and shift: rotation
    uniform in ``[-rotate, rotate]`` degrees, zoom in ``[1 - scale, 1 + scale]``, shift in ``[-translate,
    translate]`` of the width and of the height (``affine_theta``, ``affine_warp``). All three 0 returns
    ``x`` unchanged, drawing nothing."""
    if rotate == 0 and scale == 0 and translate == 0:
        return x
    u = _draw_uniform(x.shape[0], 4, generator, x.device)
    return affine_warp(x, affine_theta(u, rotate, scale, translate))


def random_intensity(x: Tensor, brightness: float, contrast: float, generator: torch.Generator) -> Tensor:
    """Jitter each image of uint8 ``x`` (``[B, H, W, C]``): contrast about its own mean, then brightness.

    ``x' = (x - mean) * c + mean + 255 * o`` with ``c`` uniform in ``[1 - contrast, 1 + contrast]`` and ``o`` in
    ``[-brightness, brightness]``, clipped to ``[0, 255]``. Both 0 returns ``x`` unchanged.
    """
    if brightness == 0 and contrast == 0:
        return x
    u = _draw_uniform(x.shape[0], 2, generator, x.device)
    factor = (1 + u[:, 0] * contrast)[:, None, None, None]
    offset = (255 * brightness * u[:, 1])[:, None, None, None]
    xf = x.float()
    mean = xf.mean(dim=(1, 2, 3), keepdim=True)
    return ((xf - mean) * factor + mean + offset).round_().clamp_(0, 255).to(torch.uint8)


def augment_batch(x: Tensor, augment: Augment, generator: torch.Generator) -> Tensor:
    """Apply a dataset's training augmentation to uint8 ``[B, H, W, C]`` images: affine warp, crop, flip,
    intensity jitter (each only when ``augment`` switches it on; the default crop + flip draw the same random
    numbers as before the warp and jitter existed, so seeded runs reproduce)."""
    x = random_affine(x, augment.rotate, augment.scale, augment.translate, generator)
    x = random_crop(x, augment.crop_padding, generator)
    x = random_hflip(x, generator) if augment.hflip else x
    return random_intensity(x, augment.brightness, augment.contrast, generator)


def to_model_input(
    x: Tensor,
    mean: Sequence[float] | Tensor,
    std: Sequence[float] | Tensor,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """uint8 ``[B, H, W, C]`` -> normalised float ``[B, C, H, W]`` ((x / 255 - mean) / std).

    The result is a permuted view made dense, so it is channels_last in memory, which convolutions prefer.
    """
    mean_t = torch.as_tensor(mean, dtype=dtype, device=x.device).reshape(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=dtype, device=x.device).reshape(-1, 1, 1)
    return (x.permute(0, 3, 1, 2).to(dtype) / 255 - mean_t) / std_t


def resize_uint8(images: Tensor, size: tuple[int, int], chunk: int = 4096) -> Tensor:
    """Resize uint8 ``[N, H, W, C]`` to ``[N, size[0], size[1], C]``: bilinear with antialias, rounded back.

    Works in chunks of ``chunk`` images to bound the float copy's memory.
    """
    if tuple(images.shape[1:3]) == tuple(size):
        return images
    out = torch.empty((images.shape[0], *size, images.shape[3]), dtype=torch.uint8, device=images.device)
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].permute(0, 3, 1, 2).float()
        y = F.interpolate(x, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + chunk] = y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return out


def to_channels(images: Tensor, channels: int) -> Tensor:
    """uint8 ``[N, H, W, C]`` -> ``[N, H, W, channels]``: gray to RGB by replication, RGB to gray by BT.601 luma."""
    c = images.shape[-1]
    if c == channels:
        return images
    if c == 1 and channels == 3:
        return images.expand(*images.shape[:3], 3).contiguous()
    if c == 3 and channels == 1:
        w = torch.tensor(_LUMA_WEIGHTS, dtype=torch.int32, device=images.device)
        luma = (images.to(torch.int32) * w).sum(-1, keepdim=True) + 0x8000
        return (luma >> 16).to(torch.uint8)
    raise ValueError(f"cannot convert {c}-channel images to {channels} channels (only 1 <-> 3)")


def stratified_split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Split indices of ``labels`` (``[N]`` int) into ``(train_idx, val_idx)``, both sorted ``[M]`` long tensors.

    Each class contributes ``round(count * fraction)`` indices to ``val_idx`` (but leaves at least one in
    ``train_idx``), chosen by a permutation seeded with ``seed``: the same inputs always give the same split.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    labels = labels.cpu().long()
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(labels.numel(), generator=generator)
    shuffled = labels[perm]
    order = torch.sort(shuffled, stable=True).indices  # grouped by class, random within a class
    grouped = shuffled[order]
    _classes, counts = torch.unique_consecutive(grouped, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(grouped.numel()) - torch.repeat_interleave(starts, counts)
    n_val = torch.minimum((counts.double() * fraction).round().long(), (counts - 1).clamp_min(0))
    is_val = rank < torch.repeat_interleave(n_val, counts)
    index = perm[order]
    return index[~is_val].sort().values, index[is_val].sort().values


def sample_indices(labels: Tensor, n: int, how: Sample = "balanced") -> Tensor:
    """The indices ``[min(n, N)]`` of the images of a split (``labels`` ``[N]``) to explain and assess.

    ``first``: ``0 .. n-1``, the split's own order. ``balanced``: the classes in turn — the first image of
    every class (in class order), then the second of every class, and so on; a class that runs out is
    skipped — in the split's order within a class. A split stored class by class (an image folder: the
    CIFAR-10 JPEG copy, the chest X-rays, whose first 234 test images are all NORMAL) is then not judged on
    its first class alone, and the first ``k`` of the sample (a report's gallery) show every class. On a
    split already in random order (the official MNIST files) both are fair samples, of different images.
    """
    labels = labels.cpu().long()
    count = min(n, labels.numel())
    if how == "first":
        return torch.arange(count)
    if how != "balanced":
        raise ValueError(f"how must be 'balanced' or 'first', got {how!r}")
    order = torch.sort(labels, stable=True).indices  # grouped by class, the split's order within a class
    _classes, counts = torch.unique_consecutive(labels[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(labels.numel()) - torch.repeat_interleave(starts, counts)  # position within its class
    return order[torch.sort(rank, stable=True).indices][:count]  # by rank, then class
