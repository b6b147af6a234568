"""The rest of the class-activation-map family over the shared CAM base of ``cam``: XGrad-CAM, LayerCAM,
Smooth Grad-CAM++, SS-CAM and IS-CAM.

Each is ``fn(model, inputs[B, C, H, W], target[B], layer=None, ...) -> [B, 1, H, W]``: ``ReLU(sum_k w_k A_k)``
at the layer's resolution, upsampled bilinearly to the input size, with the weights (per channel, or per
pixel for LayerCAM) of its paper. Definitions and defaults follow torchcam 0.5.0, which the tests compare
against; where torchcam departs from its paper that is said at the method.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xailab.errors import ConfigError
from xailab.explain.base import register_method
from xailab.explain.batching import chunk_size, chunks, seeded_generator
from xailab.explain.cam import activation_and_gradient, capture_activation, resolve_layer, weighted_map
from xailab.explain.tokens import token_grid

# torchcam's guard against division by zero in the weights and in the min-max normalisation of masks
CAM_EPS = 1e-8


@register_method("xgradcam")
def xgradcam(model: nn.Module, inputs: Tensor, target: Tensor, layer: str | None = None) -> Tensor:
    """XGrad-CAM (Fu et al. 2020): weights ``w_k = sum_ij g_kij A_kij / sum_ij A_kij`` (the axioms'
    solution), ``[B, 1, H, W]``."""
    activation, grad = activation_and_gradient(model, inputs, target, resolve_layer(model, inputs, layer))
    weights = (grad * activation).sum(dim=(2, 3)) / (activation.sum(dim=(2, 3)) + CAM_EPS)
    return weighted_map(activation, weights, inputs.shape[-2:])


@register_method("layercam")
def layercam(model: nn.Module, inputs: Tensor, target: Tensor, layer: str | None = None) -> Tensor:
    """LayerCAM (Jiang et al. 2021): ``ReLU(sum_k ReLU(g_kij) A_kij)``, a weight per pixel, ``[B, 1, H, W]``."""
    activation, grad = activation_and_gradient(model, inputs, target, resolve_layer(model, inputs, layer))
    cam = F.relu((F.relu(grad) * activation).sum(1, keepdim=True))
    return F.interpolate(cam, size=inputs.shape[-2:], mode="bilinear", align_corners=False)


@register_method("smooth_gradcam_plus_plus")
def smooth_gradcam_plus_plus(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor,
    layer: str | None = None,
    n_samples: int = 4,
    std: float = 0.3,
    seed: int = 0,
    noise: Tensor | None = None,
    internal_batch_size: int | None = None,
) -> Tensor:
    """Smooth Grad-CAM++ (Omeiza et al. 2019): Grad-CAM++ with the gradient's powers averaged over
    ``n_samples`` noisy copies of each image: ``alpha = D2 / (2 D2 + sum_ij A_kij D3)``,
    ``w_k = sum_ij alpha_kij ReLU(D1_kij)``, ``[B, 1, H, W]``; ``A`` is the clean image's activation.

    Noise: Gaussian of std ``std`` in input units (torchcam's 0.3), from a generator seeded with ``seed``, or
    ``noise`` ``[n_samples, B, C, H, W]`` as given. torchcam 0.5.0 takes ``D1`` and ``A`` from its last noisy
    sample instead of the mean and the clean image; with one sample and no noise both agree exactly.
    """
    layer_path = resolve_layer(model, inputs, layer)
    b = inputs.shape[0]
    if noise is not None:
        n_samples = noise.shape[0]
        noise = noise.to(inputs).reshape(n_samples * b, *inputs.shape[1:])
    if n_samples < 1:
        raise ConfigError(f"n_samples={n_samples} must be at least 1")
    with torch.no_grad(), capture_activation(model, layer_path, token_grid(model, inputs)) as captured:
        model(inputs)
    activation = captured.activation.detach()
    d1, d2, d3 = (torch.zeros_like(activation) for _ in range(3))
    generator = seeded_generator(inputs, seed)
    # noisy copy ``i`` is image ``i % b`` with sample ``i // b`` of the noise
    for index in chunks(n_samples * b, chunk_size(inputs, internal_batch_size, grad=True), inputs.device):
        image = index % b
        if noise is None:
            draw = torch.randn((len(index), *inputs.shape[1:]), generator=generator, device=inputs.device)
            chunk_noise = draw * std
        else:
            chunk_noise = noise[index]
        _, grad = activation_and_gradient(model, inputs[image] + chunk_noise, target[image], layer_path)
        grad = grad.float()
        d1.index_add_(0, image, grad)
        d2.index_add_(0, image, grad.pow(2))
        d3.index_add_(0, image, grad.pow(3))
    d1, d2, d3 = d1 / n_samples, d2 / n_samples, d3 / n_samples
    alpha = d2 / (2 * d2 + (d3 * activation).sum(dim=(2, 3), keepdim=True) + CAM_EPS)
    weights = (alpha * F.relu(d1)).sum(dim=(2, 3))
    return weighted_map(activation, weights, inputs.shape[-2:])


def _score_weights(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor,
    layer: str | None,
    n_samples: int,
    mask_fn,
    internal_batch_size: int | None,
) -> tuple[Tensor, Tensor]:
    """The layer's activation ``[B, K, h, w]`` and torchcam's Score-CAM weights ``[B, K]`` over ``n_samples``
    mask draws: ``softmax_k(mean_s(logit(x * M_sk) - logit(x)))``, with ``M_sk = mask_fn(s, idx, masks)``
    built from the min-max normalised channel maps upsampled to the input size.

    The ``n_samples * B * K`` masked inputs (copy ``i``: sample ``i // (B K)``, image ``(i % (B K)) // K``,
    channel ``i % K``) are scored in chunks of ``internal_batch_size``, without gradients.
    """
    layer_path = resolve_layer(model, inputs, layer)
    if n_samples < 1:
        raise ConfigError(f"n_samples={n_samples} must be at least 1")
    size = inputs.shape[-2:]
    with torch.no_grad():
        with capture_activation(model, layer_path, token_grid(model, inputs)) as captured:
            logits = model(inputs)
        activation = captured.activation.float()
        baseline = logits.float().gather(1, target[:, None]).squeeze(1)
        b, k = activation.shape[:2]
        # torchcam's normalisation: shift to min 0, divide by the shifted max (+ eps)
        maps = activation - activation.amin(dim=(2, 3), keepdim=True)
        maps = (maps / (maps.amax(dim=(2, 3), keepdim=True) + CAM_EPS)).flatten(0, 1)[:, None]
        totals = torch.zeros(b * k, device=inputs.device)
        for index in chunks(n_samples * b * k, chunk_size(inputs, internal_batch_size), inputs.device):
            sample, flat = index // (b * k), index % (b * k)
            image = flat // k
            masks = F.interpolate(maps[flat], size=size, mode="bilinear", align_corners=False)
            masked = inputs[image] * mask_fn(sample, flat, masks)
            scores = model(masked).float().gather(1, target[image, None]).squeeze(1)
            totals.index_add_(0, flat, scores - baseline[image])
    return activation, torch.softmax((totals / n_samples).view(b, k), dim=1)


@register_method("ss_cam")
def ss_cam(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor,
    layer: str | None = None,
    n_samples: int = 35,
    std: float = 2.0,
    seed: int = 0,
    noise: Tensor | None = None,
    internal_batch_size: int | None = None,
) -> Tensor:
    """SS-CAM (Wang et al. 2020, smoothed Score-CAM): Score-CAM weights averaged over ``n_samples`` masks
    with Gaussian noise of std ``std`` added to each normalised, upsampled channel map (torchcam's 35 and
    2.0); ``[B, 1, H, W]``. Weights: ``softmax_k`` of the mean rise of the target logit over the unmasked
    input. ``noise`` ``[n_samples, B, K, H, W]`` is used instead of a draw seeded with ``seed``."""
    if noise is not None:
        n_samples = noise.shape[0]
    generator = seeded_generator(inputs, seed)

    def noisy(sample: Tensor, flat: Tensor, masks: Tensor) -> Tensor:
        if noise is not None:
            k = noise.shape[2]
            return masks + noise.to(masks)[sample, flat // k, flat % k][:, None]
        return masks + std * torch.randn(masks.shape, generator=generator, device=masks.device)

    activation, weights = _score_weights(model, inputs, target, layer, n_samples, noisy, internal_batch_size)
    return weighted_map(activation, weights, inputs.shape[-2:])


@register_method("is_cam")
def is_cam(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor,
    layer: str | None = None,
    n_samples: int = 10,
    internal_batch_size: int | None = None,
) -> Tensor:
    """IS-CAM (Naidu et al. 2020, integrated Score-CAM): Score-CAM weights averaged over ``n_samples`` scaled
    masks, ``[B, 1, H, W]``. The scales are torchcam's (and the authors' code's) running sum
    ``c_s = sum_{i <= s} i / n_samples`` for ``s = 1..n_samples``, not a uniform path from 0 to 1."""
    scales = torch.cumsum(torch.arange(1, n_samples + 1, dtype=torch.float64) / n_samples, 0)
    scales = scales.to(device=inputs.device, dtype=torch.float32)

    def scaled(sample: Tensor, flat: Tensor, masks: Tensor) -> Tensor:
        return masks * scales[sample].view(-1, 1, 1, 1)

    activation, weights = _score_weights(model, inputs, target, layer, n_samples, scaled, internal_batch_size)
    return weighted_map(activation, weights, inputs.shape[-2:])
