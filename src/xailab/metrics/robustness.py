"""Robustness: how much does the map change when the input changes imperceptibly (Yeh et al. 2019)?

All ``n_samples`` noisy copies of all images are explained in chunks of ``batch_size`` images.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from xailab.errors import ConfigError
from xailab.explain.batching import check_positive, chunk_size, map_chunks, seeded_generator
from xailab.metrics.base import ExplainFn, register_metric


def sensitivities(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    attributions: Tensor,
    explain_fn: ExplainFn | None,
    n_samples: int = 10,
    radius: float = 0.2,
    noise: Tensor | None = None,
    batch_size: int | None = None,
    seed: int = 0,
) -> Tensor:
    """``||a(x + d) - a(x)||_F / ||a(x)||_F`` for ``n_samples`` uniform perturbations ``d ~ U(-radius,
    radius)`` of every input value: ``[B, S]``. As Quantus's Max/AvgSensitivity (uniform noise, Frobenius
    norms, the perturbed inputs explained for the same targets); ``noise`` ``[B, S, C, H, W]`` gives ``d``
    explicitly (to match another library's draw). The noisy copies are explained ``batch_size`` at a time
    (default: ``default_batch_size``)."""
    if explain_fn is None:
        raise ConfigError("sensitivity metrics re-explain perturbed inputs: pass method=<name>")
    b = inputs.shape[0]
    if noise is None:
        check_positive(n_samples=n_samples, radius=radius)
        shape = (b, n_samples, *inputs.shape[1:])
        noise = (
            torch.rand(shape, generator=seeded_generator(inputs, seed), device=inputs.device) * 2 - 1
        ) * radius
    noise = noise.to(inputs)
    n = noise.shape[1]

    def explain_copies(idx: Tensor) -> Tensor:  # copies built per chunk: memory bounded by batch_size images
        image = idx // n
        return explain_fn(model, inputs[image] + noise[image, idx % n], targets[image])

    maps = map_chunks(
        explain_copies, b * n, chunk_size(inputs, batch_size, grad=True, model=model), inputs.device
    )
    diff = (maps.view(b, n, -1).double() - attributions.flatten(1).double()[:, None]).norm(dim=2)
    return (diff / attributions.flatten(1).double().norm(dim=1, keepdim=True)).float()


@register_metric("max_sensitivity", better="lower", needs_method=True)
def max_sensitivity(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    attributions: Tensor,
    explain_fn: ExplainFn | None = None,
    n_samples: int = 10,
    radius: float = 0.2,
    noise: Tensor | None = None,
    batch_size: int | None = None,
    seed: int = 0,
) -> Tensor:
    """Max-sensitivity (Yeh et al. 2019): the largest relative change of the map over ``n_samples`` uniform
    input perturbations of ``radius`` (see ``sensitivities``). Lower is better. ``[B]``"""
    return sensitivities(
        model, inputs, targets, attributions, explain_fn, n_samples, radius, noise, batch_size, seed
    ).amax(1)


@register_metric("avg_sensitivity", better="lower", needs_method=True)
def avg_sensitivity(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    attributions: Tensor,
    explain_fn: ExplainFn | None = None,
    n_samples: int = 10,
    radius: float = 0.2,
    noise: Tensor | None = None,
    batch_size: int | None = None,
    seed: int = 0,
) -> Tensor:
    """Average sensitivity (Yeh et al. 2019): the mean relative change of the map over ``n_samples`` uniform
    input perturbations of ``radius`` (see ``sensitivities``). Lower is better. ``[B]``"""
    return sensitivities(
        model, inputs, targets, attributions, explain_fn, n_samples, radius, noise, batch_size, seed
    ).mean(1)
