"""Gradient attributions: saliency, input x gradient, integrated gradients and SmoothGrad.

Each method is ``fn(model, inputs[B, C, H, W], target[B], **params) -> [B, C, H, W]`` (a per-channel map that
``explain`` reduces as the method's paper does). Methods that evaluate many copies of the inputs (integrated
gradients, SmoothGrad) feed them to the model in chunks of at most ``internal_batch_size`` images, one
forward and one backward pass per chunk, like Captum's ``internal_batch_size``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from xailab.errors import ConfigError
from xailab.explain.base import METHODS, ParamSpec, declared_params, register_method
from xailab.explain.batching import (
    Baseline,
    baseline_images,
    chunk_size,
    chunks,
    in_layout,
    inputs_channels_last,
    seeded_generator,
)

IGRule = Literal["riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre"]
IG_METHODS: tuple[str, ...] = IGRule.__args__  # type: ignore[attr-defined]


def target_gradients(model: nn.Module, inputs: Tensor, target: Tensor) -> Tensor:
    """Gradient of each image's ``target`` logit w.r.t. the image: ``[N, C, H, W] -> [N, C, H, W]``.

    One backward pass of the summed logits serves the whole batch, since image ``i``'s logit depends on
    image ``i`` only (the model is in eval mode). A detached copy of the inputs requires grad, so gradients
    reach it also through frozen parameters.
    """
    x = inputs.detach().requires_grad_(True)
    with torch.enable_grad():
        score = model(x).gather(1, target[:, None]).sum()
        (grad,) = torch.autograd.grad(score, x)
    return grad


@register_method("saliency", reduce="max_abs")
def saliency(model: nn.Module, inputs: Tensor, target: Tensor, abs: bool = True) -> Tensor:
    """Vanilla gradient (Simonyan et al. 2014): ``|d logit_target / d x|``, ``[B, C, H, W]``.

    ``abs=False`` keeps the sign. Reduced over channels by max |grad|, as in the paper.
    """
    grad = target_gradients(model, inputs, target)
    return grad.abs() if abs else grad


@register_method("input_x_gradient", reduce="sum")
def input_x_gradient(model: nn.Module, inputs: Tensor, target: Tensor) -> Tensor:
    """Input x gradient (Shrikumar et al. 2016): ``x * d logit_target / d x``, ``[B, C, H, W]``; summed over
    channels."""
    return inputs * target_gradients(model, inputs, target)


def ig_steps(method: str, n_steps: int) -> tuple[Tensor, Tensor]:
    """Quadrature points ``alphas`` in [0, 1] and their weights ``step_sizes`` (float64, ``[n_steps]``),
    with Captum's method names and points.

    The weights always sum to 1, so a linear model's attributions are exact. That is where
    ``riemann_trapezoid`` differs from Captum 0.9, whose trapezoid weighs its ``n`` points ``0, 1/(n-1),
    ..., 1`` with ``1/n`` (halved at the ends), which sums to ``(n - 1) / n``; here the spacing
    ``1/(n-1)`` is the weight, the trapezoid rule proper.
    """
    if method not in IG_METHODS:
        raise ConfigError(f"unknown integration method {method!r}; valid: {', '.join(IG_METHODS)}")
    if n_steps < (1 if method == "gausslegendre" else 2):
        raise ConfigError(f"n_steps={n_steps} is too small for {method!r}; use at least 2")
    if method == "gausslegendre":
        points, weights = np.polynomial.legendre.leggauss(n_steps)
        # Gauss-Legendre works on [-1, 1]; map to [0, 1]
        return torch.from_numpy(0.5 * (points + 1)), torch.from_numpy(0.5 * weights)
    n = n_steps
    alphas = {
        "riemann_left": torch.linspace(0, 1 - 1 / n, n, dtype=torch.float64),
        "riemann_right": torch.linspace(1 / n, 1, n, dtype=torch.float64),
        "riemann_middle": torch.linspace(1 / (2 * n), 1 - 1 / (2 * n), n, dtype=torch.float64),
        "riemann_trapezoid": torch.linspace(0, 1, n, dtype=torch.float64),
    }[method]
    if method != "riemann_trapezoid":
        return alphas, torch.full((n,), 1 / n, dtype=torch.float64)
    step_sizes = torch.full((n,), 1 / (n - 1), dtype=torch.float64)
    step_sizes[[0, -1]] /= 2
    return alphas, step_sizes


@register_method("integrated_gradients", reduce="sum")
def integrated_gradients(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor,
    baseline: Baseline = "zero",
    n_steps: int = 50,
    method: IGRule = "gausslegendre",
    blur_sigma: float | None = None,
    internal_batch_size: int | None = None,
) -> Tensor:
    """Integrated gradients (Sundararajan et al. 2017): ``(x - x') * integral_0^1 grad f(x' + a (x - x')) da``,
    ``[B, C, H, W]``; summed over channels, so the map adds up to ``f(x) - f(x')`` (completeness).

    ``baseline`` ``x'``: see ``baseline_images`` (``"blur"``: a Gaussian of ``blur_sigma`` pixels, default
    ``min(H, W) / 16``, Sturmfels et al. 2020). The integral is approximated by ``method`` (Captum's names
    and default) with ``n_steps`` points. All ``n_steps * B`` path points are evaluated in chunks of
    ``internal_batch_size`` (default: ``default_batch_size``); ``integrated_gradients_delta`` measures the
    completeness error.
    """
    alphas, step_sizes = (t.to(inputs) for t in ig_steps(method, n_steps))
    baselines = baseline_images(inputs, baseline, blur_sigma)
    difference = inputs - baselines
    b = inputs.shape[0]
    total = torch.zeros_like(inputs)
    channels_last = inputs_channels_last(inputs)  # path points stored as the inputs are (see ``in_layout``)
    # path point ``i`` is image ``i % b`` at step ``i // b`` (Captum's order)
    for index in chunks(
        n_steps * b, chunk_size(inputs, internal_batch_size, grad=True, model=model), inputs.device
    ):
        step, image = index // b, index % b
        points = in_layout(
            baselines[image] + alphas[step].view(-1, 1, 1, 1) * difference[image], channels_last
        )
        grads = target_gradients(model, points, target[image])
        total.index_add_(0, image, grads * step_sizes[step].view(-1, 1, 1, 1))
    return total * difference


def integrated_gradients_delta(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor,
    attributions: Tensor,
    baselines: Baseline = "zero",
    blur_sigma: float | None = None,
) -> Tensor:
    """Completeness error per image, ``[B]``: ``sum(attributions) - (f(x)[target] - f(x')[target])``.

    ``attributions``: integrated gradients of ``inputs`` (``[B, C, H, W]`` or summed to ``[B, 1, H, W]``)
    for the same ``baselines`` (as in ``baseline_images``). Call it with the model in eval mode.
    """
    baseline = baseline_images(inputs, baselines, blur_sigma)
    with torch.no_grad():
        logits = model(torch.cat([inputs, baseline]))
    scores = logits.gather(1, target.repeat(2)[:, None]).squeeze(1).view(2, -1)
    return attributions.sum(dim=(1, 2, 3)) - (scores[0] - scores[1])


SMOOTHGRAD_BASES: dict[str, Callable[..., Tensor]] = {
    "saliency": saliency,
    "input_x_gradient": input_x_gradient,
    "integrated_gradients": integrated_gradients,
}


def _smoothgrad_base_params(params: Mapping[str, object]) -> Mapping[str, ParamSpec]:
    """The parameters SmoothGrad passes on: those of its ``base`` (none for an unknown base, which the
    method itself rejects naming the valid ones)."""
    base = SMOOTHGRAD_BASES.get(str(params.get("base", "saliency")))
    return declared_params(base) if base is not None else {}


@register_method(
    "smoothgrad",
    reduce=lambda params: METHODS.get(params.get("base", "saliency")).reduction(params),
    extra_params=_smoothgrad_base_params,
)
def smoothgrad(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor,
    base: str = "saliency",
    n_samples: int = 50,
    noise_level: float = 0.15,
    seed: int = 0,
    noise: Tensor | None = None,
    internal_batch_size: int | None = None,
    **base_params,
) -> Tensor:
    """SmoothGrad (Smilkov et al. 2017): the mean of gradient method ``base``'s per-channel maps over
    ``n_samples`` noisy copies of each image, ``[B, C, H, W]``.

    The noise is Gaussian with standard deviation ``noise_level * (max(x) - min(x))`` per image (the paper's
    noise level, 10-20 % works best), drawn from a ``torch.Generator`` seeded with ``seed``, so a call is
    repeatable. ``noise`` ``[n_samples, B, C, H, W]`` is added instead of drawing any (to reproduce another
    library's draw). The ``n_samples * B`` noisy copies go to ``base`` in chunks of ``internal_batch_size``;
    ``base_params`` are passed on to it (e.g. ``n_steps`` for integrated gradients).

    ``explain`` reduces its channels as it reduces the base method's (max |grad| for saliency, a sum for
    input x gradient and integrated gradients).
    """
    if base not in SMOOTHGRAD_BASES:
        raise ConfigError(f"unknown SmoothGrad base {base!r}; valid: {', '.join(SMOOTHGRAD_BASES)}")
    base_fn = SMOOTHGRAD_BASES[base]
    b = inputs.shape[0]
    if noise is not None:
        n_samples = noise.shape[0]
        noise = noise.to(inputs).reshape(n_samples * b, *inputs.shape[1:])
    if n_samples < 1:
        raise ConfigError(f"n_samples={n_samples} must be at least 1")
    batch_size = chunk_size(inputs, internal_batch_size, grad=True, model=model)
    if base == "integrated_gradients":
        base_params["internal_batch_size"] = batch_size
    sigma = noise_level * (inputs.amax(dim=(1, 2, 3)) - inputs.amin(dim=(1, 2, 3)))
    generator = seeded_generator(inputs, seed)
    total = torch.zeros_like(inputs)
    channels_last = inputs_channels_last(inputs)  # noisy copies stored as the inputs are (see ``in_layout``)
    # noisy copy ``i`` is image ``i % b`` with sample ``i // b`` of the noise
    for index in chunks(n_samples * b, batch_size, inputs.device):
        image = index % b
        if noise is None:
            draw = torch.randn(
                (len(index), *inputs.shape[1:]), generator=generator, device=inputs.device, dtype=inputs.dtype
            )
            chunk_noise = draw * sigma[image].view(-1, 1, 1, 1)
        else:
            chunk_noise = noise[index]
        noisy = in_layout(inputs[image] + chunk_noise, channels_last)
        maps = base_fn(model, noisy, target[image], **base_params)
        total.index_add_(0, image, maps)
    return total / n_samples
