"""Faithfulness: does removing what the map calls important change the model's output the most?

Every perturbed copy of every image is built from flat indices with tensor ops and scored in chunks of
``batch_size`` images (``xailab.explain.batching.score_copies``), never one Python iteration per image or
perturbation. Removed pixels show a baseline of ``xailab.explain.batching.BASELINES`` (``"black"``, each
image's minimum, is Quantus's default).

Definitions follow the papers; where Quantus 0.6 differs, the docstring says which one is followed and
``tests/test_quality_parity_quantus.py`` compares like with like:

- Pixels are removed in ``descending_order`` of the map; tied values (a Grad-CAM map's ReLU zeros, flat
  borders) in the order numpy's default argsort of the negated map gives them, which is Quantus's, so pixel
  flipping and ROAD equal Quantus also on maps with ties (on one-channel images; with C channels Quantus
  orders the C copies of each value, see the next point).
- Quantus flattens ``[C, H, W]`` inputs and broadcasts the map over channels, so its "features" are channel
  values: one step of ``features_in_step`` features removes ``features_in_step / C`` pixels. Here a step
  removes whole pixels (all channels); the two agree for ``features_in_step = C * pixels_per_step`` (pixel
  flipping) and for one-channel images (faithfulness correlation, ROAD, whose Quantus imputation indexes
  pixels with channel-value indices and so only works for one channel).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xailab.errors import ConfigError
from xailab.explain.batching import (
    Baseline,
    Score,
    baseline_images,
    check_positive,
    chunk_size,
    score_copies,
    seeded_generator,
)
from xailab.explain.perturbation import Segments, segment_images
from xailab.metrics.base import descending_order, pearson, register_metric, target_scores


def removal_ranks(
    attributions: Tensor, segments: Segments = None, grid: int = 7, inputs: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """When each pixel is removed: ``rank`` ``[B, H * W]`` (0 = first; pixels of one superpixel share its
    rank) and the number of units ``[B]`` (pixels, or superpixels per image).

    ``segments``: None for pixel steps; ``"grid"``, ``"slic"`` or a ``[B, H, W]`` label map for superpixel
    steps, ordered by their mean attribution (``inputs`` are needed for SLIC).
    """
    b, _, h, w = attributions.shape
    flat = attributions.flatten(1)
    if segments is None:
        order = descending_order(attributions)
        rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(h * w, device=order.device).expand(b, -1)
        )
        return rank, torch.full((b,), h * w, device=flat.device)
    labels, counts = segment_images(inputs if inputs is not None else attributions, segments, grid=grid)
    labels = labels.flatten(1)
    n_max = int(counts.max())
    sums = torch.zeros(b, n_max, device=flat.device).scatter_add_(1, labels, flat)
    sizes = torch.zeros(b, n_max, device=flat.device).scatter_add_(1, labels, torch.ones_like(flat))
    means = torch.where(sizes > 0, sums / sizes.clamp(min=1), torch.full_like(sums, -float("inf")))
    order = descending_order(means)
    segment_rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(n_max, device=order.device).expand(b, -1)
    )
    return segment_rank.gather(1, labels), counts


def swapped_scores(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    rank: Tensor,
    counts: Tensor,
    start: Tensor,
    end: Tensor,
    softmax: bool,
    batch_size: int | None,
) -> Tensor:
    """The target's score (probability with ``softmax``, else logit) of one copy per ``counts`` ``[B, S]``
    entry: the pixels whose ``rank`` ``[B, H * W]`` is below the count show ``end``, the others ``start``
    (both ``[B, C, H, W]``) -> ``[B, S]``. The one kernel of the deletion, insertion and pixel-flipping
    curves: copies are built chunk by chunk, never all at once."""
    b, s = counts.shape

    def build(idx: Tensor) -> Tensor:
        image = idx // s
        swapped = rank[image] < counts[image, idx % s][:, None]
        return torch.where(swapped.view(len(idx), 1, *inputs.shape[2:]), end[image], start[image])

    chunk = chunk_size(inputs, batch_size, model=model)
    score: Score = "softmax" if softmax else "logit"
    return score_copies(model, build, targets.repeat_interleave(s), chunk, score, like=inputs).view(b, s)


def trapezoid(curve: Tensor, dx: float = 1.0) -> Tensor:
    """Area under each row of ``curve`` ``[B, S]`` by the trapezoidal rule with spacing ``dx``: ``[B]``."""
    if curve.shape[1] < 2:
        return torch.zeros(curve.shape[0], dtype=curve.dtype, device=curve.device)
    return (curve.sum(1) - (curve[:, 0] + curve[:, -1]) / 2) * dx


def removal_curve(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    attributions: Tensor,
    mode: Literal["deletion", "insertion"] = "deletion",
    n_steps: int = 32,
    baseline: Baseline = "zero",
    segments: Segments = None,
    grid: int = 7,
    softmax: bool = True,
    batch_size: int | None = None,
) -> Tensor:
    """Petsiuk et al.'s curves: the target's probability (logit without ``softmax``) as the most important
    units are removed (``deletion``: replaced by ``baseline``) or inserted into the baseline image
    (``insertion``), at ``n_steps + 1`` evenly spaced fractions 0, 1/n, ..., 1 of the units: ``[B, n+1]``.

    Units are pixels, or superpixels when ``segments`` is given (see ``removal_ranks``).
    """
    check_positive(n_steps=n_steps)
    rank, units = removal_ranks(attributions, segments, grid, inputs)
    steps = torch.arange(n_steps + 1, device=inputs.device)
    removed_count = torch.round(steps[None, :] * units[:, None].double() / n_steps).long()  # [B, S+1]
    fill = baseline_images(inputs, baseline)
    start, end = (inputs, fill) if mode == "deletion" else (fill, inputs)
    return swapped_scores(model, inputs, targets, rank, removed_count, start, end, softmax, batch_size)


@register_metric("deletion_auc", better="lower")
def deletion_auc(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    attributions: Tensor,
    n_steps: int = 32,
    baseline: Baseline = "zero",
    segments: Segments = None,
    grid: int = 7,
    softmax: bool = True,
    batch_size: int | None = None,
) -> Tensor:
    """Deletion AUC (Petsiuk et al. 2018): area under the target probability as the most important pixels
    (or superpixels) are replaced by ``baseline``, over removed fractions in [0, 1]. Lower is better. ``[B]``"""
    curve = removal_curve(
        model,
        inputs,
        targets,
        attributions,
        "deletion",
        n_steps,
        baseline,
        segments,
        grid,
        softmax,
        batch_size,
    )
    return trapezoid(curve, 1.0 / n_steps)


@register_metric("insertion_auc", better="higher")
def insertion_auc(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    attributions: Tensor,
    n_steps: int = 32,
    insertion_baseline: Baseline = "blur",
    segments: Segments = None,
    grid: int = 7,
    softmax: bool = True,
    batch_size: int | None = None,
) -> Tensor:
    """Insertion AUC (Petsiuk et al. 2018): area under the target probability as the most important pixels
    (or superpixels) are put back into a blurred copy (``insertion_baseline``). Higher is better. ``[B]``"""
    curve = removal_curve(
        model,
        inputs,
        targets,
        attributions,
        "insertion",
        n_steps,
        insertion_baseline,
        segments,
        grid,
        softmax,
        batch_size,
    )
    return trapezoid(curve, 1.0 / n_steps)


def pixel_flipping_curve(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    attributions: Tensor,
    pixels_per_step: int | None = None,
    baseline: Baseline = "black",
    softmax: bool = True,
    batch_size: int | None = None,
) -> Tensor:
    """Bach et al.'s pixel flipping as Quantus's ``PixelFlipping``: the target probability after each step
    of replacing the next ``pixels_per_step`` most relevant pixels (cumulative) by ``baseline``, ``[B, S]``
    with ``S = ceil(H * W / pixels_per_step)`` (the unperturbed image is not a point of the curve).

    ``pixels_per_step`` defaults to ``ceil(H * W / 32)`` (32 steps); Quantus's ``features_in_step`` equals
    ``C * pixels_per_step``.
    """
    b, _, h, w = inputs.shape
    pixels_per_step = pixels_per_step or -(-h * w // 32)
    check_positive(pixels_per_step=pixels_per_step)
    n_steps = -(-h * w // pixels_per_step)
    rank, _ = removal_ranks(attributions)
    fill = baseline_images(inputs, baseline)
    flipped = ((torch.arange(n_steps, device=inputs.device) + 1) * pixels_per_step).expand(b, -1)
    return swapped_scores(model, inputs, targets, rank, flipped, inputs, fill, softmax, batch_size)


@register_metric("pixel_flipping", better="lower")
def pixel_flipping(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    attributions: Tensor,
    pixels_per_step: int | None = None,
    baseline: Baseline = "black",
    softmax: bool = True,
    batch_size: int | None = None,
) -> Tensor:
    """Pixel flipping (Bach et al. 2015): area (trapezoids of width 1 per step, Quantus's
    ``return_auc_per_sample``) under the target probability as pixels are flipped most relevant first.
    Lower is better. ``[B]``"""
    curve = pixel_flipping_curve(
        model, inputs, targets, attributions, pixels_per_step, baseline, softmax, batch_size
    )
    return trapezoid(curve, 1.0)


def random_subsets(inputs: Tensor, n_runs: int, subset_size: int, seed: int) -> Tensor:
    """``n_runs`` random pixel subsets of ``subset_size`` per image (without replacement), seeded:
    ``[B, n_runs, subset_size]`` flat pixel indices."""
    b, _, h, w = inputs.shape
    if not 0 < subset_size <= h * w:
        raise ConfigError(f"subset_size={subset_size} must be between 1 and the {h * w} pixels of an image")
    keys = torch.rand(b, n_runs, h * w, generator=seeded_generator(inputs, seed), device=inputs.device)
    return keys.topk(subset_size, dim=2).indices


@register_metric("faithfulness_correlation", better="higher")
def faithfulness_correlation(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    attributions: Tensor,
    n_runs: int = 100,
    subset_size: int | None = None,
    baseline: Baseline = "black",
    softmax: bool = False,
    subsets: Tensor | None = None,
    batch_size: int | None = None,
    seed: int = 0,
) -> Tensor:
    """Faithfulness correlation (Bhatt et al. 2020): Pearson correlation over ``n_runs`` random pixel subsets
    between the subset's attribution sum and the drop of the target logit when the subset shows
    ``baseline``. Higher is better. ``[B]``

    ``subset_size`` defaults to ``min(224, H * W // 2)`` (Quantus's default 224 is meant for 224x224).
    ``subsets`` ``[B, R, k]`` gives the pixel subsets explicitly (to match another library's random draw).
    """
    b, _, h, w = inputs.shape
    if subsets is None:
        check_positive(n_runs=n_runs)
        subsets = random_subsets(inputs, n_runs, subset_size or min(224, h * w // 2), seed)
    subsets = subsets.to(inputs.device).long()
    n_runs = subsets.shape[1]
    fill = baseline_images(inputs, baseline)

    def build(idx: Tensor) -> Tensor:
        image = idx // n_runs
        chosen = torch.zeros(len(idx), h * w, dtype=torch.bool, device=inputs.device)
        chosen.scatter_(1, subsets[image, idx % n_runs], True)
        return torch.where(chosen.view(len(idx), 1, h, w), fill[image], inputs[image])

    chunk = chunk_size(inputs, batch_size, model=model)
    original = target_scores(model, inputs, targets, softmax)
    score: Score = "softmax" if softmax else "logit"
    perturbed = score_copies(model, build, targets.repeat_interleave(n_runs), chunk, score, like=inputs).view(
        b, n_runs
    )
    flat = attributions.flatten(1).double()
    attribution_sums = flat.gather(1, subsets.flatten(1)).view(b, n_runs, -1).sum(2)
    return pearson(attribution_sums, original[:, None].double() - perturbed.double()).float()


# ---------------------------------------------------------------------------------------------------------
# ROAD (Rong et al. 2022): remove and debias with noisy linear imputation, solved in torch
# ---------------------------------------------------------------------------------------------------------

# Rong et al.'s neighbour weights: 1/6 for the 4 direct neighbours, 1/12 for the 4 diagonal ones
_NEIGHBOURS = (
    (-1, -1, 1 / 12), (-1, 0, 1 / 6), (-1, 1, 1 / 12), (0, -1, 1 / 6),
    (0, 1, 1 / 6), (1, -1, 1 / 12), (1, 0, 1 / 6), (1, 1, 1 / 12),
)  # fmt: skip


def neighbour_sum(u: Tensor) -> Tensor:
    """The weighted sum of each pixel's in-image 8 neighbours, ``[N, 1, H, W]`` (shifted slices of a
    zero-padded copy: as a 3x3 convolution, but fast in float64 on a CPU too)."""
    h, w = u.shape[-2:]
    padded = F.pad(u, (1, 1, 1, 1))
    total = torch.zeros_like(u)
    for dy, dx, weight in _NEIGHBOURS:
        total += weight * padded[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
    return total


def linear_imputation(
    images: Tensor, masks: Tensor, tol: float = 1e-10, max_iter: int | None = None
) -> Tensor:
    """Fill the masked pixels of ``images`` ``[N, C, H, W]`` (``masks`` ``[N, 1, H, W]`` bool, True =
    impute) so each equals the weighted mean of its in-image 8 neighbours (Rong et al.'s linear
    imputation, Quantus's ``noisy_linear_imputation`` without noise).

    The sparse system (one unknown per masked pixel) is symmetric positive definite, so it is solved by
    batched conjugate gradients on the pixel grid (float64) for all images and channels at once instead of
    one sparse factorisation per image; systems leave the batch as they converge (a lightly masked image
    needs a few iterations, a 99% masked one a hundred). Every image needs at least one unmasked pixel.
    """
    n, c, h, w = images.shape
    dtype = torch.float64 if images.device.type != "mps" else torch.float32
    m = masks.to(dtype).expand(n, c, h, w).reshape(n * c, 1, h, w)
    x = images.to(dtype).reshape(n * c, 1, h, w)
    degree = neighbour_sum(torch.ones(1, 1, h, w, device=images.device, dtype=dtype))
    solution = x.clone()

    def dot(a: Tensor, b: Tensor) -> Tensor:
        return (a * b).sum((1, 2, 3), keepdim=True)

    active = torch.arange(n * c, device=images.device)
    mask = m
    rhs = mask * neighbour_sum((1 - mask) * x)
    u, r = torch.zeros_like(x), rhs.clone()
    p, rs = r.clone(), dot(r, r)
    limit = tol**2 * rs.clamp(min=1e-300)
    for i in range(max_iter or 4 * h * w):
        ap = mask * (degree * p - neighbour_sum(mask * p))
        alpha = rs / dot(p, ap).clamp(min=1e-300)
        u = u + alpha * p
        r = r - alpha * ap
        rs_new = dot(r, r)
        if i % 4 == 3:  # retire the converged systems
            done = (rs_new <= limit).flatten()
            if bool(done.any()):
                solution[active[done]] = torch.where(mask[done].bool(), u[done], x[active[done]])
                keep = ~done
                active, mask, u, r, p = active[keep], mask[keep], u[keep], r[keep], p[keep]
                rs, rs_new, limit = rs[keep], rs_new[keep], limit[keep]
                if active.numel() == 0:
                    break
        p = r + (rs_new / rs.clamp(min=1e-300)) * p
        rs = rs_new
    if active.numel():  # max_iter reached: keep the last iterate
        solution[active] = torch.where(mask.bool(), u, x[active])
    return solution.view(n, c, h, w).to(images.dtype)


def road_curve(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    attributions: Tensor,
    percentages: tuple[float, ...] = tuple(range(1, 100, 2)),
    order: Literal["morf", "lerf"] = "morf",
    noise: float = 0.01,
    score: Literal["accuracy", "probability"] = "accuracy",
    batch_size: int | None = None,
    seed: int = 0,
) -> Tensor:
    """ROAD curve: for each percentage ``p``, the ``int(H * W * p / 100)`` most (``morf``) or least
    (``lerf``) relevant pixels imputed from their neighbours (``linear_imputation``) plus Gaussian noise of
    std ``noise``; scored as 1.0 where the model still predicts the target (``accuracy``, as Quantus and the
    paper) or the target's probability: ``[B, P]``."""
    b, _, h, w = inputs.shape
    if not all(0 <= p < 100 for p in percentages):
        raise ConfigError(f"percentages={percentages} must lie in [0, 100): imputation needs a kept pixel")
    if order not in ("morf", "lerf"):
        raise ConfigError(f"order={order!r} is invalid; valid: 'morf', 'lerf'")
    ranked = attributions if order == "morf" else -attributions
    rank, _ = removal_ranks(ranked)
    counts = torch.tensor([int(h * w * p / 100) for p in percentages], device=inputs.device)
    n_p = len(percentages)
    generator = seeded_generator(inputs, seed)

    def build(idx: Tensor) -> Tensor:
        image = idx // n_p
        masks = (rank[image] < counts[idx % n_p][:, None]).view(len(idx), 1, h, w)
        filled = linear_imputation(inputs[image], masks)
        if noise > 0:
            jitter = torch.randn(filled.shape, generator=generator, device=inputs.device) * noise
            filled = torch.where(masks, filled + jitter, filled)
        return filled

    chunk = chunk_size(inputs, batch_size, model=model)
    kind: Score = "predicted" if score == "accuracy" else "softmax"
    return score_copies(model, build, targets.repeat_interleave(n_p), chunk, kind, like=inputs).view(b, n_p)


@register_metric("road", better="lower")
def road(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    attributions: Tensor,
    percentages: tuple[float, ...] = tuple(range(1, 100, 2)),
    order: Literal["morf", "lerf"] = "morf",
    noise: float = 0.01,
    score: Literal["accuracy", "probability"] = "accuracy",
    batch_size: int | None = None,
    seed: int = 0,
) -> Tensor:
    """ROAD (Rong et al. 2022): the mean over removal percentages of the ROAD curve (``road_curve``), i.e.
    the normalised area under it. With ``order="morf"`` (default, as Quantus) lower is better; with
    ``"lerf"`` higher is better. ``[B]``"""
    return road_curve(
        model, inputs, targets, attributions, percentages, order, noise, score, batch_size, seed
    ).mean(1)


# ---------------------------------------------------------------------------------------------------------
# Infidelity (Yeh et al. 2019)
# ---------------------------------------------------------------------------------------------------------


def patch_perturbations(inputs: Tensor, patch_size: int, baseline: Baseline) -> Tensor:
    """Quantus's Infidelity perturbations: patches of ``patch_size`` in row-major order replaced by
    ``baseline`` cumulatively (patch k's copy also has patches 0..k-1 replaced): ``[B, P, C, H, W]`` of
    ``I = x - x_perturbed``."""
    h, w = inputs.shape[-2:]
    if h % patch_size or w % patch_size:
        raise ConfigError(f"patch_size={patch_size} must divide the image size {h}x{w}")
    ph, pw = h // patch_size, w // patch_size
    patch_of = (torch.arange(h, device=inputs.device)[:, None] // patch_size) * pw + (
        torch.arange(w, device=inputs.device)[None, :] // patch_size
    )
    removed = patch_of[None] <= torch.arange(ph * pw, device=inputs.device)[:, None, None]  # [P, H, W]
    fill = baseline_images(inputs, baseline)
    return torch.where(
        removed[None, :, None], (inputs - fill)[:, None], torch.zeros((), device=inputs.device)
    )


@register_metric("infidelity", better="lower")
def infidelity(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    attributions: Tensor,
    perturbation: Literal["gaussian", "patches"] = "gaussian",
    n_samples: int = 32,
    noise_std: float = 0.1,
    patch_size: int = 4,
    baseline: Baseline = "black",
    normalise: bool = False,
    softmax: bool = False,
    perturbations: Tensor | None = None,
    batch_size: int | None = None,
    seed: int = 0,
) -> Tensor:
    """Infidelity (Yeh et al. 2019): ``E_I[(sum(a * I) - (f(x) - f(x - I)))^2]`` of the target logit ``f``
    over perturbations ``I``. Lower is better. ``[B]``

    ``perturbation``: ``"gaussian"`` (``n_samples`` draws of ``N(0, noise_std^2)`` per value, the paper's
    and Captum's usual choice) or ``"patches"`` (Quantus's default: ``patch_size`` patches replaced by
    ``baseline`` one after another, cumulatively; deterministic). ``perturbations`` ``[B, S, C, H, W]``
    gives ``I`` explicitly. ``normalise``: Captum's ``normalize=True`` (the attribution term scaled by the
    least-squares factor ``beta`` first).
    """
    b = inputs.shape[0]
    if perturbations is None:
        if perturbation == "gaussian":
            check_positive(n_samples=n_samples)
            shape = (b, n_samples, *inputs.shape[1:])
            perturbations = (
                torch.randn(shape, generator=seeded_generator(inputs, seed), device=inputs.device) * noise_std
            )
        elif perturbation == "patches":
            perturbations = patch_perturbations(inputs, patch_size, baseline)
        else:
            raise ConfigError(f"perturbation={perturbation!r} is invalid; valid: 'gaussian', 'patches'")
    perturbations = perturbations.to(inputs)
    n = perturbations.shape[1]

    def build(idx: Tensor) -> Tensor:
        return inputs[idx // n] - perturbations[idx // n, idx % n]

    chunk = chunk_size(inputs, batch_size, model=model)
    original = target_scores(model, inputs, targets, softmax).double()
    score: Score = "softmax" if softmax else "logit"
    perturbed = score_copies(model, build, targets.repeat_interleave(n), chunk, score, like=inputs)
    drops = original[:, None] - perturbed.view(b, n).double()
    explained = (perturbations.double() * attributions.double()[:, None]).flatten(2).sum(2)  # [B, S]
    if normalise:
        beta = (explained * drops).mean(1, keepdim=True) / (explained * explained).mean(1, keepdim=True)
        explained = beta * explained
    return ((explained - drops) ** 2).mean(1).float()
