"""Pictures of explanations: heatmap overlays, a detailed panel per image, and a prediction grid.

Figures are plain ``matplotlib.figure.Figure`` objects (no pyplot: no global figure registry, no GUI
backend), so they can be made in servers and threads. Maps are normalised per map to their 99th
percentile (a few extreme pixels would otherwise wash the rest out); grayscale images are turned to RGB so
the colour map stays readable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from xailab.io import atomic_write

CMAP = "jet"


def normalise_map(attribution: Tensor, percentile: float = 99.0) -> Tensor:
    """``[H, W]`` (or ``[1, H, W]``) map -> ``[H, W]`` in [0, 1], scaled by its ``percentile``-th percentile.

    Signed maps are shown by magnitude. Non-negative maps are shifted to start at 0 first: RISE and
    Score-CAM put a large common offset on every pixel, which would otherwise hide their structure.
    """
    m = attribution.detach().float().reshape(attribution.shape[-2:]).cpu()
    m = m - m.min() if m.min() >= 0 else m.abs()
    scale = torch.quantile(m.flatten(), percentile / 100.0)
    if scale <= 0:
        scale = m.max()
    return (m / scale).clamp(0, 1) if scale > 0 else torch.zeros_like(m)


def to_rgb(image: Tensor) -> np.ndarray:
    """uint8 ``[H, W, C]`` (C = 1 or 3) -> float ``[H, W, 3]`` in [0, 1]."""
    x = image.detach().cpu().float() / 255.0
    if x.shape[-1] == 1:
        x = x.expand(*x.shape[:2], 3)
    return x.numpy()


def overlay(image: Tensor, attribution: Tensor, alpha: float = 0.5, percentile: float = 99.0) -> np.ndarray:
    """The image ``[H, W, C]`` uint8 blended with the colour-mapped, normalised map: float ``[H, W, 3]``."""
    heat = matplotlib.colormaps[CMAP](normalise_map(attribution, percentile).numpy())[..., :3]
    return (1 - alpha) * to_rgb(image) + alpha * heat


def explanation_panel(
    image: Tensor,
    maps: Mapping[str, Tensor],
    top: Sequence[tuple[str, float]],
    title: str = "",
    alpha: float = 0.5,
) -> Figure:
    """One image explained: the original with its top predictions, then per method the overlay (top row)
    and the raw normalised map with a colour bar (bottom row). ``maps``: method -> ``[1, H, W]``."""
    n = len(maps) + 1
    fig = Figure(figsize=(2.4 * n, 5.0))
    axes = fig.subplots(2, n, squeeze=False)
    axes[0, 0].imshow(to_rgb(image), interpolation="nearest")
    axes[0, 0].set_title("input", fontsize=9)
    axes[1, 0].barh(range(len(top))[::-1], [p for _, p in top], color="tab:blue")
    axes[1, 0].set_yticks(range(len(top))[::-1], [name for name, _ in top], fontsize=8)
    axes[1, 0].set_xlim(0, 1)
    axes[1, 0].set_title("top predictions", fontsize=9)
    for j, (method, attribution) in enumerate(maps.items(), start=1):
        axes[0, j].imshow(overlay(image, attribution, alpha), interpolation="nearest")
        axes[0, j].set_title(method, fontsize=9)
        im = axes[1, j].imshow(
            normalise_map(attribution).numpy(), cmap=CMAP, vmin=0, vmax=1, interpolation="nearest"
        )
        fig.colorbar(im, ax=axes[1, j], fraction=0.046, pad=0.04)
    for ax in [*axes[0], *axes[1, 1:]]:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def prediction_grid(
    images: Tensor,
    labels: Sequence[str],
    predictions: Sequence[str],
    maps: Tensor | None = None,
    columns: int = 8,
    alpha: float = 0.5,
) -> Figure:
    """A grid of images ``[N, H, W, C]`` (with map overlays ``[N, 1, H, W]`` when given), each titled
    "true → predicted", green when correct and red when wrong; at most ``columns`` a row, fewer when N is
    smaller."""
    n = images.shape[0]
    columns = max(1, min(columns, n))  # two images make a two-panel figure, not eight with six blank
    rows = max(1, -(-n // columns))
    fig = Figure(figsize=(1.6 * columns, 1.8 * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= n:
            ax.axis("off")
            continue
        shown = overlay(images[i], maps[i], alpha) if maps is not None else to_rgb(images[i])
        ax.imshow(shown, interpolation="nearest")
        correct = labels[i] == predictions[i]
        ax.set_title(f"{labels[i]} → {predictions[i]}", fontsize=7, color="green" if correct else "red")
        for spine in ax.spines.values():
            spine.set_edgecolor("green" if correct else "red")
            spine.set_linewidth(2)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` as PNG atomically."""
    return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=dpi))
