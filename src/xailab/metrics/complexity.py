"""Complexity: how concentrated is a map? Concise maps are easier to read (Chalasani et al. 2020, Bhatt et al.
2020). These are properties of the map alone, not of its faithfulness."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from xailab.metrics.base import register_metric

GINI_EPS = 1e-7  # added to every |a| before the Gini index, as Quantus, so an all-zero map is defined (0)


def max_scaled(values: Tensor) -> Tensor:
    """Each row of non-negative ``values`` ``[B, N]`` divided by its maximum (all-zero rows left as they
    are): Quantus's default ``normalise_by_max``, which makes a score independent of the map's scale."""
    top = values.amax(1, keepdim=True)
    return values / torch.where(top > 0, top, torch.ones_like(top))


def gini(values: Tensor) -> Tensor:
    """Gini index of each row of non-negative ``values`` ``[B, N]``: 0 when uniform, ``1 - 1/N`` when one
    entry holds everything (the maximum): ``[B]``."""
    v = values.double().sort(dim=1).values
    n = v.shape[1]
    weights = 2 * torch.arange(1, n + 1, device=v.device, dtype=v.dtype) - n - 1
    return (v * weights).sum(1) / (n * v.sum(1))


@register_metric("sparseness", better="higher")
def sparseness(model: nn.Module, inputs: Tensor, targets: Tensor, attributions: Tensor) -> Tensor:
    """Sparseness (Chalasani et al. 2020): the Gini index of the map's absolute values, scaled to maximum 1
    (Quantus's default normalisation) plus 1e-7 (as Quantus). Higher means more concentrated; the same for
    a map at any scale (the epsilon would otherwise weigh more in a small-valued map). ``[B]``"""
    return gini(max_scaled(attributions.flatten(1).abs().double()) + GINI_EPS).float()


@register_metric("complexity", better="lower")
def complexity(model: nn.Module, inputs: Tensor, targets: Tensor, attributions: Tensor) -> Tensor:
    """Complexity (Bhatt et al. 2020): the entropy of the map's absolute values as a distribution,
    ``-sum p log(p + 1e-12)`` with ``p = |a| / sum |a|`` (as Quantus). Lower means more concentrated; ``p``
    is the same for a map at any scale. ``[B]``"""
    a = attributions.flatten(1).abs().double()
    p = a / a.sum(1, keepdim=True)
    return -(p * torch.log(p + 1e-12)).sum(1).float()
