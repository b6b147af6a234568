"""Randomisation sanity checks: a map that does not change when the model's weights (Adebayo et al. 2018) or
the explained class (Sixt et al. 2020) are randomised cannot be explaining the model.

The caller's model is never modified: randomisation happens on a deep copy, and the global RNG state is
restored after each layer's re-initialisation.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xailab.errors import ConfigError
from xailab.explain.base import preserved_state, resolve_target
from xailab.explain.batching import seeded_generator
from xailab.metrics.base import (
    ExplainFn,
    check_attributions,
    chunked_explain,
    method_explainer,
    register_metric,
    spearman,
)

Order = Literal["top_down", "bottom_up", "independent"]


def ssim(a: Tensor, b: Tensor, win_size: int = 7, data_range: Tensor | float | None = None) -> Tensor:
    """Structural similarity of each pair of maps ``[B, 1, H, W]``: ``[B]``, as scikit-image's
    ``structural_similarity`` with its defaults (a ``win_size`` uniform window, sample covariance, K1 = 0.01,
    K2 = 0.03, the mean over the windows that fit in the image). ``data_range`` defaults to each pair's
    max - min over both maps, as Quantus's ``ssim``."""
    a, b = a.double(), b.double()
    if min(a.shape[-2:]) < win_size:
        raise ConfigError(f"maps of {tuple(a.shape[-2:])} are smaller than the SSIM window {win_size}")
    if data_range is None:
        both = torch.cat([a.flatten(1), b.flatten(1)], 1)
        data_range = (both.amax(1) - both.amin(1)).view(-1, 1, 1, 1)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    n = win_size * win_size
    cov_norm = n / (n - 1)

    def mean(x: Tensor) -> Tensor:
        return F.avg_pool2d(x, win_size, stride=1)

    ux, uy = mean(a), mean(b)
    vx = cov_norm * (mean(a * a) - ux * ux)
    vy = cov_norm * (mean(b * b) - uy * uy)
    vxy = cov_norm * (mean(a * b) - ux * uy)
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def max_normalised(maps: Tensor) -> Tensor:
    """Each map ``[B, 1, H, W]`` divided by its largest absolute value (all-zero maps left as they are)."""
    scale = maps.flatten(1).abs().amax(1).view(-1, 1, 1, 1)
    return maps / torch.where(scale > 0, scale, torch.ones_like(scale))


def randomisable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules that have parameters to re-initialise (``reset_parameters``: convolutions, linear and
    normalisation layers), from the input side up, as Quantus's ``get_random_layer_generator``."""
    return [(name, m) for name, m in model.named_modules() if name and hasattr(m, "reset_parameters")]


def _reset(module: nn.Module, seed: int, device: torch.device) -> None:
    """Re-initialise ``module``'s parameters from ``torch.manual_seed(seed)`` without touching the caller's
    RNG state (Quantus seeds the global RNG the same way but leaves it changed)."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        module.reset_parameters()  # type: ignore[operator]


@dataclass(frozen=True)
class RandomisationResult:
    """The cascading model-randomisation sanity check.

    ``layers``: the randomised layers in the order randomised; ``spearman`` and ``ssim`` ``[L, B]``: each
    image's similarity between the original map and the map after randomising up to that layer;
    ``maps`` ``[L + 1, E, 1, H, W]``: the first ``E`` images' original maps then their maps after each stage.
    """

    layers: list[str]
    spearman: Tensor
    ssim: Tensor
    maps: Tensor

    @property
    def mean_spearman(self) -> Tensor:
        """Mean over images of the Spearman correlation after each layer: ``[L]``."""
        return self.spearman.nanmean(1)

    @property
    def mean_ssim(self) -> Tensor:
        """Mean over images of the SSIM after each layer: ``[L]``."""
        return self.ssim.nanmean(1)


def model_randomisation(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor | int | None,
    method: str | None = None,
    explain_fn: ExplainFn | None = None,
    attributions: Tensor | None = None,
    order: Order = "top_down",
    layers: Sequence[str] | None = None,
    abs: bool = True,
    n_examples: int = 4,
    batch_size: int | None = None,
    seed: int = 42,
    method_params: dict | None = None,
) -> RandomisationResult:
    """Adebayo et al.'s model parameter randomisation test on ``inputs`` ``[B, C, H, W]``.

    On a deep copy of ``model``, the layers (``layers``, default: every module with parameters,
    ``randomisable_layers``) are re-initialised one by one from the output side down (``top_down``, the
    cascade), from the input side up (``bottom_up``) or one at a time on an otherwise intact copy
    (``independent``); after each, the inputs are explained again (``method`` with ``method_params``, or
    ``explain_fn``) and compared with the original maps (``attributions``, else explained now) by Spearman
    rank correlation (of absolute values with ``abs``, Quantus's default) and by SSIM of the maps scaled to
    max |value| 1. A faithful method's similarities fall towards 0. Each layer is re-initialised after
    ``torch.manual_seed(seed + 1)``, as Quantus's MPRT does, so the randomised weights are Quantus's.
    """
    if (method is None) == (explain_fn is None):
        raise ConfigError("model_randomisation needs exactly one of method=<name> or explain_fn")
    if order not in ("top_down", "bottom_up", "independent"):
        raise ConfigError(f"order={order!r} is invalid; valid: top_down, bottom_up, independent")
    explain_fn = explain_fn or method_explainer(method, **(method_params or {}))  # type: ignore[arg-type]
    device = next(model.parameters()).device
    inputs = inputs.to(device=device, dtype=torch.float32)
    with preserved_state(model):
        target_t = resolve_target(model, inputs, targets)
        if attributions is None:
            attributions = chunked_explain(explain_fn, model, inputs, target_t, batch_size)
        attributions = check_attributions(inputs, attributions)
    randomised = copy.deepcopy(model).eval()
    candidates = randomisable_layers(randomised)
    if layers is not None:
        known = {name for name, _ in candidates}
        unknown = [name for name in layers if name not in known]
        if unknown:
            raise ConfigError(f"layers {unknown} have no parameters to randomise; valid: {sorted(known)}")
        candidates = [(name, m) for name, m in candidates if name in set(layers)]
    if order == "top_down":
        candidates = candidates[::-1]
    original_state = copy.deepcopy(randomised.state_dict()) if order == "independent" else None

    def prepare(maps: Tensor) -> Tensor:
        return maps.abs() if abs else maps

    reference = prepare(attributions)
    names, rank_scores, ssim_scores = [], [], []
    examples = [attributions[:n_examples].cpu()]
    for name, module in candidates:
        if original_state is not None:
            randomised.load_state_dict(original_state)
        _reset(module, seed + 1, device)
        maps = prepare(chunked_explain(explain_fn, randomised, inputs, target_t, batch_size))
        names.append(name)
        rank_scores.append(spearman(reference.flatten(1), maps.flatten(1)).float().cpu())
        ssim_scores.append(ssim(max_normalised(reference), max_normalised(maps)).float().cpu())
        examples.append(maps[:n_examples].cpu())
    if not names:
        raise ConfigError("the model has no layers with parameters to randomise")
    return RandomisationResult(
        names, torch.stack(rank_scores), torch.stack(ssim_scores), torch.stack(examples)
    )


@register_metric("model_randomisation", better="lower", needs_method=True)
def model_randomisation_score(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    attributions: Tensor,
    explain_fn: ExplainFn | None = None,
    order: Order = "top_down",
    batch_size: int | None = None,
) -> Tensor:
    """Model parameter randomisation (Adebayo et al. 2018): each image's Spearman correlation between its
    map and the maps of the cascading randomised models, averaged over the layers (``model_randomisation``
    has the per-layer curves). Lower is better. ``[B]``"""
    if explain_fn is None:
        raise ConfigError("model_randomisation re-explains randomised models: pass method=<name>")
    result = model_randomisation(
        model, inputs, targets, explain_fn=explain_fn, attributions=attributions, order=order,
        batch_size=batch_size, n_examples=0,
    )  # fmt: skip
    return result.spearman.nanmean(0)


def random_off_targets(targets: Tensor, num_classes: int, seed: int) -> Tensor:
    """A uniformly random class other than each target ``[B]``, seeded: ``[B]``."""
    if num_classes < 2:
        raise ConfigError("random_logit needs a model with at least 2 classes")
    generator = seeded_generator(targets, seed)
    draw = torch.randint(0, num_classes - 1, targets.shape, generator=generator, device=targets.device)
    return draw + (draw >= targets).long()  # skip the target: the draw indexes the other classes in order


@register_metric("random_logit", better="lower", needs_method=True)
def random_logit(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    attributions: Tensor,
    explain_fn: ExplainFn | None = None,
    off_targets: Tensor | None = None,
    similarity: Literal["ssim", "spearman"] = "ssim",
    batch_size: int | None = None,
    seed: int = 0,
) -> Tensor:
    """Random logit test (Sixt et al. 2020): similarity between the map of the target class and the map of
    a random other class (``off_targets`` ``[B]`` to choose them), by SSIM of the maps scaled to max
    |value| 1 (Sixt et al. and Quantus, here on the 2-D maps) or Spearman correlation. A class-sensitive
    method scores low. ``[B]``"""
    if explain_fn is None:
        raise ConfigError("random_logit re-explains other classes: pass method=<name>")
    if off_targets is None:
        with torch.no_grad():
            num_classes = model(inputs[:1]).shape[1]
        off_targets = random_off_targets(targets, num_classes, seed)
    off_targets = off_targets.to(targets)
    other = chunked_explain(explain_fn, model, inputs, off_targets, batch_size)
    if similarity == "ssim":
        return ssim(max_normalised(attributions), max_normalised(other)).float()
    if similarity == "spearman":
        return spearman(attributions.flatten(1), other.flatten(1)).float()
    raise ConfigError(f"similarity={similarity!r} is invalid; valid: 'ssim', 'spearman'")
