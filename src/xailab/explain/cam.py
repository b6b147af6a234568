"""Class activation maps: Grad-CAM, Grad-CAM++ and Score-CAM of one convolutional layer.

Each method is ``fn(model, inputs[B, C, H, W], target[B], layer=None, ...) -> [B, 1, H, W]``: a map at the
layer's resolution, ReLU'd as in the papers, then upsampled bilinearly to the input size. The layer is
``layer`` (a ``get_submodule`` path) if given, else the model's ``cam_layer``, else the last ``Conv2d`` whose
output is wider than one pixel (``find_cam_layer``). Activations are captured by a forward hook that lives
only inside ``capture_activation``; gradients come from ``torch.autograd.grad`` on the captured tensor, so no
backward hook is needed and none can be left behind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xailab.errors import ConfigError, did_you_mean
from xailab.explain.base import register_method
from xailab.explain.batching import chunk_size, chunks
from xailab.explain.tokens import TokenGrid, token_grid

# pytorch-grad-cam's guard against 0/0 in Grad-CAM++'s alpha where the gradient vanishes
GRADCAM_PP_EPS = 1e-6


class Captured:
    """The output of the hooked layer ``layer_path`` in the latest forward pass."""

    def __init__(self, layer_path: str) -> None:
        self.layer_path = layer_path
        self.output: object = None

    @property
    def activation(self) -> Tensor:
        """The captured output, ``[B, K, h, w]``; ConfigError if the layer did not run or is not a map."""
        if not isinstance(self.output, Tensor) or self.output.ndim != 4:
            raise ConfigError(
                f"layer {self.layer_path!r} must output a [B, K, h, w] tensor for a class activation map"
            )
        return self.output


def get_layer(model: nn.Module, layer_path: str) -> nn.Module:
    """``model.get_submodule(layer_path)``; a bad path raises ConfigError suggesting the nearest names."""
    try:
        return model.get_submodule(layer_path)
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name]
        hint = did_you_mean(layer_path, names)
        raise ConfigError(f"the model has no layer {layer_path!r}.{hint}") from None


@contextlib.contextmanager
def capture_activation(
    model: nn.Module, layer_path: str, grid: TokenGrid | None = None
) -> Iterator[Captured]:
    """Within the block, every forward pass stores the output of ``model``'s layer ``layer_path`` in the
    yielded ``Captured``; the hook is removed on leaving the block, also when the forward pass raises.

    With a token ``grid`` (``xailab.explain.tokens``), a token output ``[B, P + h * w, D]`` is stored as its
    map ``[B, D, h, w]`` and the layer returns the same tokens rebuilt from that map, so gradients reach it."""
    captured = Captured(layer_path)

    def keep(_module: nn.Module, _inputs: tuple, output: object) -> object:
        if grid is not None and grid.fits(output):
            captured.output = grid.to_grid(output)  # type: ignore[arg-type]
            return grid.to_tokens(captured.output, output)  # type: ignore[arg-type]
        captured.output = output
        return None

    handle = get_layer(model, layer_path).register_forward_hook(keep)
    try:
        yield captured
    finally:
        handle.remove()


def find_cam_layer(model: nn.Module, inputs: Tensor) -> str:
    """The path of the last ``Conv2d`` (in execution order) whose output on ``inputs[:1]`` has more than one
    pixel, found by a forward pass with a hook on every ``Conv2d`` (all removed afterwards)."""
    names = {module: name for name, module in model.named_modules()}
    executed: list[str] = []

    def record(module: nn.Module, _inputs: tuple, output: Tensor) -> None:
        if output.shape[-2] * output.shape[-1] > 1:
            executed.append(names[module])

    handles = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model(inputs[:1])
    finally:
        for handle in handles:
            handle.remove()
    if not executed:
        raise ConfigError("the model has no Conv2d with a spatial output; pass layer='module.path'")
    return executed[-1]


def resolve_layer(model: nn.Module, inputs: Tensor, layer: str | None) -> str:
    """``layer`` if given, else the model's ``cam_layer``, else ``find_cam_layer``."""
    return layer or getattr(model, "cam_layer", None) or find_cam_layer(model, inputs)


def activation_and_gradient(
    model: nn.Module, inputs: Tensor, target: Tensor, layer_path: str
) -> tuple[Tensor, Tensor]:
    """The layer's activation ``A`` ``[B, K, h, w]`` and the gradient of each image's ``target`` logit
    w.r.t. it. The inputs require grad (a detached copy) so the gradient reaches layers of frozen models."""
    x = inputs.detach().requires_grad_(True)
    grid = token_grid(model, inputs)
    with capture_activation(model, layer_path, grid) as captured, torch.enable_grad():
        score = model(x).gather(1, target[:, None]).sum()
        activation = captured.activation
        (grad,) = torch.autograd.grad(score, activation, allow_unused=True)
    if grad is None:
        raise ConfigError(f"the model's output does not depend on layer {layer_path!r}; choose another layer")
    return activation.detach(), grad


def weighted_map(activation: Tensor, weights: Tensor, size: tuple[int, ...]) -> Tensor:
    """``ReLU(sum_k w_k A_k)`` ``[B, 1, h, w]`` for weights ``[B, K]``, upsampled to ``size`` ``(H, W)``
    (bilinear; ``inputs.shape[-2:]`` fits)."""
    cam = F.relu((weights[:, :, None, None] * activation).sum(1, keepdim=True))
    return F.interpolate(cam, size=size, mode="bilinear", align_corners=False)


@register_method("gradcam")
def gradcam(model: nn.Module, inputs: Tensor, target: Tensor, layer: str | None = None) -> Tensor:
    """Grad-CAM (Selvaraju et al. 2017): ``ReLU(sum_k w_k A_k)`` with ``w_k`` the spatial mean of the target
    logit's gradient w.r.t. activation map ``A_k``; ``[B, 1, H, W]``."""
    activation, grad = activation_and_gradient(model, inputs, target, resolve_layer(model, inputs, layer))
    return weighted_map(activation, grad.mean(dim=(2, 3)), inputs.shape[-2:])


@register_method("gradcam_plus_plus")
def gradcam_plus_plus(model: nn.Module, inputs: Tensor, target: Tensor, layer: str | None = None) -> Tensor:
    """Grad-CAM++ (Chattopadhay et al. 2018): weights ``w_k = sum_ij alpha_kij ReLU(g_kij)`` with
    ``alpha = g^2 / (2 g^2 + sum_ij(A_k) g^3)``, the closed form for an exponential output that
    pytorch-grad-cam uses with the logit's gradient ``g``; ``[B, 1, H, W]``."""
    activation, grad = activation_and_gradient(model, inputs, target, resolve_layer(model, inputs, layer))
    grad_2 = grad.pow(2)
    denominator = 2 * grad_2 + activation.sum(dim=(2, 3), keepdim=True) * grad_2 * grad
    alpha = torch.where(grad != 0, grad_2 / (denominator + GRADCAM_PP_EPS), torch.zeros_like(grad))
    weights = (alpha * F.relu(grad)).sum(dim=(2, 3))
    return weighted_map(activation, weights, inputs.shape[-2:])


@register_method("score_cam")
def score_cam(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor,
    layer: str | None = None,
    internal_batch_size: int | None = None,
) -> Tensor:
    """Score-CAM (Wang et al. 2020): ``ReLU(sum_k w_k A_k)`` with ``w_k`` the softmax probability of the
    target for the input masked by ``A_k`` (upsampled to the input size, min-max normalised to [0, 1]);
    ``[B, 1, H, W]``. Constant maps carry no location and get weight 0, as in the authors' code.

    The ``B * K`` masked inputs are evaluated in chunks of ``internal_batch_size`` (default:
    ``default_batch_size``), without gradients.
    """
    layer_path = resolve_layer(model, inputs, layer)
    size = inputs.shape[-2:]
    with torch.no_grad():
        with capture_activation(model, layer_path, token_grid(model, inputs)) as captured:
            model(inputs)
        activation = captured.activation
        b, k = activation.shape[:2]
        # map ``i`` of ``[B * K, 1, h, w]`` is channel ``i % k`` of image ``i // k``
        maps = activation.flatten(0, 1)[:, None]
        weights = torch.zeros(b * k, device=inputs.device, dtype=inputs.dtype)
        for index in chunks(b * k, chunk_size(inputs, internal_batch_size, model=model), inputs.device):
            image = index // k
            masks = F.interpolate(maps[index], size=size, mode="bilinear", align_corners=False)
            low, high = masks.amin(dim=(2, 3), keepdim=True), masks.amax(dim=(2, 3), keepdim=True)
            spread = high - low
            masks = (masks - low) / spread.clamp_min(torch.finfo(masks.dtype).tiny)
            probabilities = model(inputs[image] * masks).softmax(dim=1)
            score = probabilities.gather(1, target[image, None]).squeeze(1)
            weights[index] = torch.where(spread.flatten() > 0, score, torch.zeros_like(score))
        return weighted_map(activation, weights.view(b, k), size)
