"""Agreement between methods: do two methods find the same evidence in the same image?"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from xailab.errors import ConfigError
from xailab.metrics.base import spearman


def topk_masks(maps: Tensor, k_fraction: float) -> Tensor:
    """The ``ceil(k_fraction * H * W)`` highest pixels of each map ``[B, 1, H, W]`` as bool ``[B, H * W]``."""
    if not 0 < k_fraction <= 1:
        raise ConfigError(f"k_fraction={k_fraction} must be in (0, 1]")
    flat = maps.flatten(1)
    k = max(1, int(-(-k_fraction * flat.shape[1] // 1)))
    top = torch.sort(flat, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, top, True)


def topk_iou(a: Tensor, b: Tensor, k_fraction: float = 0.1) -> Tensor:
    """Intersection over union of the top ``k_fraction`` pixels of two maps ``[B, 1, H, W]``: ``[B]``."""
    ma, mb = topk_masks(a, k_fraction), topk_masks(b, k_fraction)
    return (ma & mb).sum(1).double() / (ma | mb).sum(1).double()


def agreement_matrix(maps: Mapping[str, Tensor], k_fraction: float = 0.1, abs: bool = True) -> dict:
    """Mean over images of the Spearman rank correlation and of the top-k IoU between every pair of methods'
    maps ``[B, 1, H, W]`` of the same images (``abs``: of the absolute values, so a method's sign
    convention does not count as disagreement).

    Returns ``{"methods": [M names], "spearman": [M, M], "topk_iou": [M, M], "k_fraction": k}`` (float64
    tensors; a correlation with a constant map is NaN and left out of the mean).
    """
    names = list(maps)
    if not names:
        raise ConfigError("agreement_matrix needs at least one method's maps")
    shapes = {tuple(m.shape) for m in maps.values()}
    if len(shapes) != 1:
        raise ConfigError(f"all maps must have the same [B, 1, H, W] shape, got {sorted(shapes)}")
    prepared = {n: (m.abs() if abs else m).detach().float().cpu() for n, m in maps.items()}
    size = len(names)
    rank = torch.eye(size, dtype=torch.float64)
    iou = torch.eye(size, dtype=torch.float64)
    for i in range(size):
        for j in range(i + 1, size):
            a, b = prepared[names[i]], prepared[names[j]]
            rank[i, j] = rank[j, i] = spearman(a.flatten(1), b.flatten(1)).nanmean()
            iou[i, j] = iou[j, i] = topk_iou(a, b, k_fraction).mean()
    return {"methods": names, "spearman": rank, "topk_iou": iou, "k_fraction": k_fraction}
