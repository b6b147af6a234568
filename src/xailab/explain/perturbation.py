"""Perturbation methods: occlusion, LIME, Kernel SHAP and RISE.

Each one scores many perturbed copies of the inputs. Every copy of every image goes through the model in
chunks of ``internal_batch_size`` images (default: ``default_batch_size(inputs, grad=False)``); copies are
built per chunk from flat indices with tensor ops (``xailab.explain.batching``), never one Python iteration
per perturbation. Random methods take ``seed`` (default 0) and draw everything from one
``torch.Generator`` on the inputs' device, so the same call gives the same map.

Scores are the target class's logit (as Captum's methods use ``forward_func=model``), except RISE, which
weights its masks by the target's softmax probability as in its paper.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xailab.errors import ConfigError, XailabWarning
from xailab.explain.base import register_method
from xailab.explain.batching import (
    Baseline,
    baseline_images,
    check_positive,
    chunk_size,
    chunks,
    score_copies,
    seeded_generator,
)

Segments = Literal["slic", "grid"] | Tensor | None

LIME_KERNEL_WIDTH = 0.25  # lime_image's default kernel width on the cosine distance


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or min(pair) < 1:
        raise ConfigError(f"{name}={value!r} must be a positive int or a (height, width) pair")
    return pair


def _solve_dtype(device: torch.device) -> torch.dtype:
    # The regressions are small ([S, S]) but badly conditioned in float32; MPS has no float64
    return torch.float32 if device.type == "mps" else torch.float64


# ---------------------------------------------------------------------------------------------------------
# Occlusion (Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014)
# ---------------------------------------------------------------------------------------------------------


def window_cover(size: int, window: int, stride: int, device: torch.device) -> Tensor:
    """Which pixels each window position covers along one axis: ``[n, size]`` bool. Windows start at
    ``0, s, 2s, ...`` until one reaches the end, ``ceil((size - window) / stride) + 1`` of them, the last
    possibly cut off, as in Captum's ``Occlusion``."""
    starts = torch.arange(math.ceil((size - window) / stride) + 1, device=device)[:, None] * stride
    pixels = torch.arange(size, device=device)
    return (pixels >= starts) & (pixels < starts + window)


@register_method("occlusion", reduce="mean")
def occlusion(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor,
    *,
    window: int | tuple[int, int] | None = None,
    stride: int | tuple[int, int] | None = None,
    baseline: float = 0.0,
    internal_batch_size: int | None = None,
) -> Tensor:
    """Occlusion (Zeiler & Fergus 2014): the target logit's drop when a window is set to ``baseline``.

    ``inputs`` ``[B, C, H, W]`` -> ``[B, C, H, W]``. Windows ``window`` (default ``min(H, W) / 7``, rounded)
    cover all channels and slide by ``stride`` (default half the window) from the top-left corner; a
    pixel's attribution is the mean of ``f(x) - f(x occluded)`` over the windows covering it, exactly
    Captum's ``Occlusion(sliding_window_shapes=(C, h, w), strides=(C, sh, sw), baselines=baseline)``. The
    channels of the map are identical (windows span them all), so it is registered with ``reduce="mean"``:
    the ``[B, 1, H, W]`` map is Captum's per-pixel value.
    """
    b, c, height, width = inputs.shape
    win = _pair(window if window is not None else max(1, round(min(height, width) / 7)), "window")
    step = _pair(stride if stride is not None else max(1, min(win) // 2), "stride")
    if win[0] > height or win[1] > width:
        raise ConfigError(f"window={win} is larger than the {height}x{width} inputs")
    # As Captum: a stride longer than the window would skip pixels (unless the window spans the axis)
    if (step[0] > win[0] and win[0] < height) or (step[1] > win[1] and win[1] < width):
        raise ConfigError(
            f"stride={step} is larger than window={win}: pixels between windows would be skipped"
        )
    # A window is a (row position, column position) pair; flat window index = row * n_cols + col
    row_cover = window_cover(height, win[0], step[0], inputs.device)
    col_cover = window_cover(width, win[1], step[1], inputs.device)
    n_rows, n_cols = len(row_cover), len(col_cover)

    def build(idx: Tensor) -> Tensor:
        image, window_idx = idx // (n_rows * n_cols), idx % (n_rows * n_cols)
        mask = row_cover[window_idx // n_cols, :, None] & col_cover[window_idx % n_cols, None, :]
        return torch.where(mask[:, None], baseline, inputs[image])

    with torch.no_grad():
        full = model(inputs).float().gather(1, target[:, None])
    chunk = chunk_size(inputs, internal_batch_size, model=model)
    occluded = score_copies(model, build, target.repeat_interleave(n_rows * n_cols), chunk, like=inputs)
    drop = (full - occluded.view(b, n_rows * n_cols)).view(b, n_rows, n_cols)
    # Sum of the drops of the windows covering each pixel, as row_cover^T @ drop @ col_cover, over their count
    row_cover, col_cover = row_cover.float(), col_cover.float()
    total = torch.einsum("bij,ih,jw->bhw", drop, row_cover, col_cover)
    count = row_cover.sum(0)[:, None] * col_cover.sum(0)[None, :]
    return (total / count)[:, None].expand(b, c, height, width).contiguous()


# ---------------------------------------------------------------------------------------------------------
# Superpixels and baselines shared by LIME and Kernel SHAP
# ---------------------------------------------------------------------------------------------------------


def grid_segments(height: int, width: int, grid: int, device: torch.device) -> Tensor:
    """A ``grid`` x ``grid`` partition of an ``H x W`` image: ``[H, W]`` labels ``0..grid**2 - 1``, row-major."""
    rows = torch.arange(height, device=device) * grid // height
    cols = torch.arange(width, device=device) * grid // width
    return rows[:, None] * grid + cols[None, :]


def slic_segments(image: Tensor, n_segments: int, compactness: float) -> Tensor:
    """scikit-image SLIC superpixels of one ``[C, H, W]`` image: ``[H, W]`` labels on the image's device.

    The image is min-max scaled first (inputs are normalised, SLIC expects [0, 1] RGB, which it converts
    to Lab); a grayscale image is scaled to [0, 100], Lab's lightness range, so ``compactness`` weighs
    colour against space the same way for both.
    """
    from skimage.segmentation import slic

    array = image.detach().float().cpu().numpy()
    array = (array - array.min()) / max(float(array.max() - array.min()), 1e-12)
    if array.shape[0] == 1:
        labels = slic(
            array[0] * 100.0, n_segments=n_segments, compactness=compactness, start_label=0, channel_axis=None
        )
    else:
        labels = slic(
            np.moveaxis(array, 0, -1),
            n_segments=n_segments,
            compactness=compactness,
            start_label=0,
            channel_axis=-1,
        )
    return torch.from_numpy(labels.astype(np.int64)).to(image.device)


def segment_images(
    inputs: Tensor,
    segments: Segments = None,
    n_segments: int = 50,
    compactness: float = 10.0,
    grid: int = 7,
) -> tuple[Tensor, Tensor]:
    """Superpixels of ``inputs`` ``[B, C, H, W]``: labels ``[B, H, W]`` (``0..S_b - 1`` in image ``b``) and
    the counts ``S_b`` ``[B]``.

    ``segments``: ``"slic"`` (scikit-image SLIC with ``n_segments`` and ``compactness``), ``"grid"`` (a
    ``grid`` x ``grid`` partition), an integer map ``[B, H, W]`` or ``[H, W]`` (any labels; renumbered per
    image), or None: SLIC from 64x64 up, the grid below, where superpixel algorithms find only a few
    segments (lime_image's quickshift finds 1-3 on 32x32 images).
    """
    b, _, height, width = inputs.shape
    if segments is None:
        segments = "slic" if min(height, width) >= 64 else "grid"
    if isinstance(segments, Tensor):
        maps = segments.to(inputs.device).long()
        maps = maps.expand(b, height, width) if maps.shape in ((height, width), (1, height, width)) else maps
        if maps.shape != (b, height, width):
            raise ConfigError(
                f"segments map has shape {tuple(segments.shape)}; give [B, H, W] = {(b, height, width)} labels"
            )
    elif segments == "grid":
        check_positive(grid=grid)
        maps = grid_segments(height, width, grid, inputs.device).expand(b, height, width)
    elif segments == "slic":
        check_positive(n_segments=n_segments)
        maps = torch.stack([slic_segments(image, n_segments, compactness) for image in inputs])
        found = [len(m.unique()) for m in maps]
        # SLIC merges noise-like images into a handful of segments: a near-constant map should not be silent
        if min(found) < max(2, n_segments // 5):
            warnings.warn(
                f"SLIC found only {min(found)} superpixels (asked for {n_segments}) in some images, so their "
                f"maps will be nearly constant; raise compactness (now {compactness}) or use segments='grid'",
                XailabWarning,
                stacklevel=2,
            )
    else:
        raise ConfigError(f"segments={segments!r} is invalid; valid: 'slic', 'grid' or a [B, H, W] label map")
    # Renumber to 0..S_b - 1 so that a segment's label is its feature index
    relabelled = [torch.unique(m, return_inverse=True) for m in maps]
    labels = torch.stack([inverse for _, inverse in relabelled])
    counts = torch.tensor([len(values) for values, _ in relabelled], device=inputs.device)
    return labels, counts


def coalition_scores(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor,
    labels: Tensor,
    coalitions: Tensor,
    background: Tensor,
    chunk: int,
) -> Tensor:
    """Target logits of the images where segments in each coalition keep ``inputs`` and the others show
    ``background``: ``coalitions`` ``[B, N, S]`` in {0, 1} -> ``[B, N]``.

    A pixel's mask is its segment's entry of the coalition: the coalition gathered by the label map (the
    same as multiplying the segments' one-hot maps by z, without materialising ``[S, H, W]``).
    """
    b, n, _ = coalitions.shape
    flat_labels = labels.flatten(1)

    def build(idx: Tensor) -> Tensor:
        image = idx // n
        keep = coalitions[image, idx % n].gather(1, flat_labels[image]).view(len(idx), 1, *labels.shape[1:])
        return torch.where(keep.bool(), inputs[image], background[image])

    return score_copies(model, build, target.repeat_interleave(n), chunk, like=inputs).view(b, n)


def segment_map(coefficients: Tensor, labels: Tensor) -> Tensor:
    """Each pixel gets its segment's coefficient: ``[B, S]`` and labels ``[B, H, W]`` -> ``[B, 1, H, W]``."""
    return coefficients.float().gather(1, labels.flatten(1)).view(labels.shape[0], 1, *labels.shape[1:])


# ---------------------------------------------------------------------------------------------------------
# LIME (Ribeiro et al., "Why Should I Trust You?", KDD 2016), as lime_image's LimeImageExplainer
# ---------------------------------------------------------------------------------------------------------


def lime_coalitions(counts: Tensor, n_samples: int, generator: torch.Generator) -> Tensor:
    """lime_image's samples: ``[B, n_samples, max S]`` with each real segment kept with probability 1/2;
    the first sample keeps everything (the unperturbed image). Padding features (``>= S_b``) are 0."""
    s_max = int(counts.max())
    real = torch.arange(s_max, device=counts.device) < counts[:, None]
    z = torch.rand(len(counts), n_samples, s_max, generator=generator, device=counts.device) < 0.5
    z[:, 0] = True
    return (z & real[:, None]).float()


def lime_weights(coalitions: Tensor, counts: Tensor, kernel_width: float = LIME_KERNEL_WIDTH) -> Tensor:
    """lime_image's sample weights ``[B, N]``: ``sqrt(exp(-d^2 / width^2))`` of the cosine distance ``d``
    between z and the all-ones vector, which is ``1 - sqrt(|z| / S)`` for binary z."""
    distance = 1 - (coalitions.sum(2) / counts[:, None]).sqrt()
    return torch.exp(-(distance**2) / (2 * kernel_width**2))


def weighted_ridge(features: Tensor, targets: Tensor, weights: Tensor, alpha: float = 1.0) -> Tensor:
    """Coefficients ``[B, S]`` of sklearn's ``Ridge(alpha, fit_intercept=True)`` fitted with
    ``sample_weight``, for every image at once: ``features`` ``[B, N, S]``, ``targets`` and ``weights``
    ``[B, N]``.

    Closed form: centre by the weighted means (the intercept is not penalised), then solve
    ``(Zc^T W Zc + alpha I) c = Zc^T W yc``. A constant feature (e.g. padding) gets coefficient 0, also
    with ``alpha=0``, as with sklearn's minimum-norm least squares.
    """
    dtype = _solve_dtype(features.device)
    z, y, w = features.to(dtype), targets.to(dtype), weights.to(dtype)
    total = w.sum(1, keepdim=True)
    zc = z - (w[..., None] * z).sum(1, keepdim=True) / total[..., None]
    yc = y - (w * y).sum(1, keepdim=True) / total
    # A constant column is all zero once centred: a 1 on its diagonal keeps the system regular
    constant = z.amax(1) == z.amin(1)
    gram = zc.transpose(1, 2) @ (w[..., None] * zc) + torch.diag_embed(alpha + constant.to(dtype))
    return torch.linalg.solve(gram, zc.transpose(1, 2) @ (w * yc)[..., None]).squeeze(-1)


@register_method("lime", reduce="none")
def lime(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor,
    *,
    segments: Segments = None,
    n_segments: int = 50,
    compactness: float = 10.0,
    grid: int = 7,
    n_samples: int = 500,
    baseline: Baseline = "mean",
    kernel_width: float = LIME_KERNEL_WIDTH,
    alpha: float = 1.0,
    seed: int = 0,
    internal_batch_size: int | None = None,
) -> Tensor:
    """LIME (Ribeiro et al. 2016) over superpixels, as lime_image: a weighted ridge fit of the target logit
    on which segments are kept.

    ``inputs`` ``[B, C, H, W]`` -> ``[B, 1, H, W]``: each pixel gets its segment's coefficient. Segments:
    see ``segment_images`` (``segments``, ``n_segments``, ``compactness``, ``grid``). ``n_samples``
    coalitions per image (the first keeps every segment), hidden segments show ``baseline`` (see
    ``baseline_images``); sample weights ``exp(-d^2 / (2 width^2))`` of the cosine distance to the
    all-ones coalition (lime_image's ``sqrt(exp(-d^2 / width^2))``, ``kernel_width`` 0.25); ridge
    ``alpha`` 1 with an intercept, solved in closed form for all images at once.
    """
    check_positive(n_samples=n_samples)
    labels, counts = segment_images(inputs, segments, n_segments, compactness, grid)
    z = lime_coalitions(counts, n_samples, seeded_generator(inputs, seed))
    background = baseline_images(inputs, baseline)
    chunk = chunk_size(inputs, internal_batch_size, model=model)
    scores = coalition_scores(model, inputs, target, labels, z, background, chunk)
    return segment_map(weighted_ridge(z, scores, lime_weights(z, counts, kernel_width), alpha), labels)


# ---------------------------------------------------------------------------------------------------------
# Kernel SHAP (Lundberg & Lee, "A Unified Approach to Interpreting Model Predictions", NeurIPS 2017)
# ---------------------------------------------------------------------------------------------------------


def shapley_coalitions(counts: Tensor, n_samples: int, generator: torch.Generator) -> Tensor:
    """Kernel SHAP samples ``[B, n_samples, max S]``: the all-ones and all-zeros coalitions first, then
    coalitions whose size k is drawn from the Shapley kernel's distribution ``p(k) ∝ (S-1) / (k (S-k))``,
    ``0 < k < S``, the k kept segments uniform among the ``S_b`` real ones (as Captum's ``KernelShap``).
    Sampling by the kernel makes every regression weight 1. Padding features (``>= S_b``) are 0."""
    b, s_max, device = len(counts), int(counts.max()), counts.device
    sizes = torch.arange(s_max + 1, device=device, dtype=torch.float64)
    s = counts[:, None].double()
    valid = (sizes > 0) & (sizes < s)
    probs = torch.where(valid, (s - 1) / (sizes * (s - sizes)).clamp(min=1), 0.0)
    # A single segment has no coalition strictly between empty and full: draw the full one (k = S = 1)
    probs[:, 1] += (counts == 1).double()
    n_drawn = max(n_samples - 2, 0)
    k = (
        torch.multinomial(probs, n_drawn, replacement=True, generator=generator)
        if n_drawn
        else torch.zeros(b, 0, dtype=torch.long, device=device)
    )
    keys = torch.rand(b, k.shape[1], s_max, generator=generator, device=device)
    real = torch.arange(s_max, device=device) < counts[:, None]
    keys = torch.where(real[:, None], keys, 2.0)  # padding features sort last, so they are never kept
    kept = keys.argsort(2).argsort(2) < k[..., None]
    ends = torch.stack([real, torch.zeros_like(real)], 1)
    return torch.cat([ends, kept], 1).float()


def enumerated_coalitions(counts: Tensor) -> tuple[Tensor, Tensor]:
    """Every coalition of ``max S`` features, ``[B, 2**max S, max S]`` (the all-ones first, the all-zeros
    second, then the rest in binary order; padding features ``>= S_b`` are 0, which repeats each of image
    ``b``'s real coalitions ``2**(max S - S_b)`` times: a uniform multiplicity that leaves the fit
    unchanged), and their Shapley kernel weights ``(S-1) / (C(S, k) k (S - k))`` ``[B, 2**max S]``. The
    empty and full coalitions have infinite weight: they enter as the fit's constraints, with weight 0 here."""
    s_max, device = int(counts.max()), counts.device
    codes = torch.tensor([2**s_max - 1, *range(2**s_max - 1)], device=device)
    bits = (codes[:, None] >> torch.arange(s_max, device=device)) & 1
    real = torch.arange(s_max, device=device) < counts[:, None]
    z = (bits[None].bool() & real[:, None]).to(_solve_dtype(device))
    k, s = z.sum(2), counts[:, None].to(z.dtype)
    binomial = torch.exp(torch.lgamma(s + 1) - torch.lgamma(k + 1) - torch.lgamma(s - k + 1))
    inner = (k > 0) & (k < s)
    weights = torch.where(inner, (s - 1) / (binomial * k * (s - k)).clamp(min=1e-300), 0.0)
    return z.float(), weights


def constrained_shapley_fit(
    coalitions: Tensor, scores: Tensor, counts: Tensor, weights: Tensor | None = None
) -> Tensor:
    """Kernel SHAP's regression with its constraints exact: ``phi`` ``[B, S]`` minimising
    ``sum_n w_n (f(z_n) - f(0) - z_n . phi)^2`` subject to ``sum phi = f(1) - f(0)``, for all images at once.

    ``coalitions`` ``[B, N, S]`` (rows 0 and 1 all-ones and all-zeros), ``scores`` ``[B, N]``, ``weights``
    ``[B, N]`` (default 1: coalitions sampled by the Shapley kernel). Captum gives the two constraint rows a
    weight of 1e6 instead, which tends to the same solution. The constraint eliminates the last real
    segment ``S_b - 1``: ``phi_last = delta - sum(others)``; the rest is least squares, solved by the
    pseudo-inverse so that too few samples give the minimum-norm fit rather than an error.
    """
    dtype = _solve_dtype(coalitions.device)
    z, y = coalitions.to(dtype), scores.to(dtype)
    w = torch.ones_like(y) if weights is None else weights.to(dtype)
    s_max = z.shape[2]
    last = counts - 1
    full, empty = y[:, 0], y[:, 1]
    delta = full - empty
    z_last = z.gather(2, last[:, None, None].expand(-1, z.shape[1], 1)).squeeze(2)
    free = torch.arange(s_max, device=z.device) < last[:, None]
    design = (z - z_last[..., None]) * free[:, None]
    residual = y - empty[:, None] - z_last * delta[:, None]
    weighted = design.transpose(1, 2) * w[:, None]
    # The eliminated and padding features get a 1 on the diagonal and a 0 right-hand side: coefficient 0
    gram = weighted @ design + torch.diag_embed((~free).to(dtype))
    phi = (torch.linalg.pinv(gram, hermitian=True) @ (weighted @ residual[..., None])).squeeze(-1)
    return phi + F.one_hot(last, s_max).to(dtype) * (delta - phi.sum(1))[:, None]


@register_method("kernel_shap", reduce="none")
def kernel_shap(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor,
    *,
    segments: Segments = None,
    n_segments: int = 50,
    compactness: float = 10.0,
    grid: int = 7,
    n_samples: int = 500,
    baseline: Baseline = "mean",
    seed: int = 0,
    internal_batch_size: int | None = None,
) -> Tensor:
    """Kernel SHAP (Lundberg & Lee 2017) over superpixels: Shapley values of the segments for the target
    logit, estimated by the Shapley-kernel-weighted regression.

    ``inputs`` ``[B, C, H, W]`` -> ``[B, 1, H, W]``: each pixel gets its segment's Shapley value, and they
    add up (per segment) to ``f(x) - f(baseline)``. Segments and ``baseline`` as for ``lime``;
    ``n_samples`` coalitions per image including the all-ones and all-zeros ones, sizes drawn from the
    Shapley kernel (``shapley_coalitions``); fit by ``constrained_shapley_fit``. Exact for a model that is
    additive in the segments once the samples span them. When ``2**S <= n_samples`` (``S``: the most
    segments of an image) every coalition is enumerated instead and weighted by the Shapley kernel
    (``enumerated_coalitions``): the exact Shapley values of any model, with fewer evaluations.
    """
    if n_samples < 2:
        raise ConfigError(f"n_samples={n_samples!r} must be at least 2 (the empty and full coalitions)")
    labels, counts = segment_images(inputs, segments, n_segments, compactness, grid)
    if 2 ** int(counts.max()) <= n_samples:
        z, weights = enumerated_coalitions(counts)
    else:
        z, weights = shapley_coalitions(counts, n_samples, seeded_generator(inputs, seed)), None
    background = baseline_images(inputs, baseline)
    chunk = chunk_size(inputs, internal_batch_size, model=model)
    scores = coalition_scores(model, inputs, target, labels, z, background, chunk)
    return segment_map(constrained_shapley_fit(z, scores, counts, weights), labels)


# ---------------------------------------------------------------------------------------------------------
# RISE (Petsiuk et al., "RISE: Randomized Input Sampling for Explanation of Black-box Models", BMVC 2018)
# ---------------------------------------------------------------------------------------------------------


def rise_masks(grids: Tensor, shifts: Tensor, height: int, width: int) -> Tensor:
    """RISE masks ``[N, H, W]`` from binary ``grids`` ``[N, s, s]`` and ``shifts`` ``[N, 2]``: each grid is
    upsampled bilinearly to ``(s + 1) * ceil(H / s)`` x ``(s + 1) * ceil(W / s)`` and cropped to ``H x W``
    at its shift, so mask edges do not all fall on one lattice."""
    s = grids.shape[-1]
    cell_h, cell_w = math.ceil(height / s), math.ceil(width / s)
    up = F.interpolate(
        grids[:, None], size=((s + 1) * cell_h, (s + 1) * cell_w), mode="bilinear", align_corners=False
    )[:, 0]
    rows = shifts[:, 0, None] + torch.arange(height, device=grids.device)
    cols = shifts[:, 1, None] + torch.arange(width, device=grids.device)
    return up[
        torch.arange(len(grids), device=grids.device)[:, None, None], rows[:, :, None], cols[:, None, :]
    ]


@register_method("rise", reduce="none")
def rise(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor,
    *,
    n_masks: int = 2000,
    cells: int = 7,
    p: float = 0.5,
    seed: int = 0,
    internal_batch_size: int | None = None,
) -> Tensor:
    """RISE (Petsiuk et al. 2018): ``sum_i P(target | x * M_i) M_i / (N p)`` over ``n_masks`` random masks.

    ``inputs`` ``[B, C, H, W]`` -> ``[B, 1, H, W]``. Mask i keeps each cell of a ``cells`` x ``cells`` grid
    with probability ``p``, upsampled bilinearly with a random shift (``rise_masks``); the same masks serve
    every image. Scores are the target's softmax probability, as in the paper.
    """
    check_positive(n_masks=n_masks, cells=cells)
    if not 0 < p <= 1:
        raise ConfigError(f"p={p!r} must be in (0, 1]")
    b, _, height, width = inputs.shape
    generator = seeded_generator(inputs, seed)
    # Only the small grids and shifts are drawn up front; full-size masks are rebuilt per chunk from them
    grids = (torch.rand(n_masks, cells, cells, generator=generator, device=inputs.device) < p).to(
        inputs.dtype
    )
    cell_sizes = torch.tensor([math.ceil(height / cells), math.ceil(width / cells)], device=inputs.device)
    shifts = (torch.rand(n_masks, 2, generator=generator, device=inputs.device) * cell_sizes).long()

    def build(idx: Tensor) -> Tensor:
        mask = idx % n_masks
        return inputs[idx // n_masks] * rise_masks(grids[mask], shifts[mask], height, width)[:, None]

    chunk = chunk_size(inputs, internal_batch_size, model=model)
    scores = score_copies(
        model, build, target.repeat_interleave(n_masks), chunk, score="softmax", like=inputs
    )
    scores = scores.view(b, n_masks)
    saliency = torch.zeros(b, height, width, device=inputs.device)
    for index in chunks(n_masks, chunk, inputs.device):
        masks = rise_masks(grids[index], shifts[index], height, width).float()
        saliency += torch.einsum("bn,nhw->bhw", scores[:, index], masks)
    return (saliency / (n_masks * p))[:, None]
