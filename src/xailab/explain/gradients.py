"""Gradient attributions: saliency, input x gradient, guided backprop, deconvnet, integrated gradients and
SmoothGrad.

Each method is ``fn(model, inputs[B, C, H, W], target[B], **params) -> [B, C, H, W]`` (a per-channel map that
``explain`` reduces as the method's paper does). Methods that evaluate many copies of the inputs (integrated
gradients, SmoothGrad) feed them to the model in chunks of at most ``internal_batch_size`` images, one
forward and one backward pass per chunk, like Captum's ``internal_batch_size``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

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


def target_gradients(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor,
    forward_context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> Tensor:
    """Gradient of each image's ``target`` logit w.r.t. the image: ``[N, C, H, W] -> [N, C, H, W]``.

    One backward pass of the summed logits serves the whole batch, since image ``i``'s logit depends on
    image ``i`` only (the model is in eval mode). A detached copy of the inputs requires grad, so gradients
    reach it also through frozen parameters. ``forward_context``: entered around the forward pass only (a
    modified backward rule such as guided backprop's records itself in the graph there).
    """
    x = inputs.detach().requires_grad_(True)
    with torch.enable_grad():
        with forward_context():
            logits = model(x)
        score = logits.gather(1, target[:, None]).sum()
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


class _RectifiedBackward(torch.autograd.Function):
    """``clamp(x, 0, upper)`` (ReLU, or ReLU6 with ``upper=6``) whose backward passes only positive gradients:
    times the forward's local derivative (``forward_mask``: guided backprop) or not (deconvnet)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, upper: float | None, forward_mask: bool) -> Tensor:
        ctx.forward_mask = forward_mask
        if forward_mask:
            ctx.save_for_backward((x > 0) if upper is None else (x > 0) & (x < upper))
        return x.clamp(min=0) if upper is None else x.clamp(0, upper)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        out = grad.clamp(min=0)
        if ctx.forward_mask:
            (mask,) = ctx.saved_tensors
            out = out * mask
        return out, None, None


# every way a network applies a ReLU: module (nn.ReLU calls F.relu), functional, tensor method, in place
RELU_FUNCTIONS = frozenset({F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_})
# nn.ReLU6 calls F.hardtanh(x, 0, 6): a hardtanh clipping at 0 is a capped ReLU
HARDTANH_FUNCTIONS = frozenset({F.hardtanh, F.hardtanh_, F.relu6})
# activations no positive-gradient rule is defined for (Springenberg et al. 2015 define it for ReLUs)
OTHER_ACTIVATIONS = frozenset(
    {F.gelu, F.silu, F.hardswish, F.elu, F.leaky_relu, F.selu, F.celu, F.mish, F.softplus, F.prelu, F.rrelu}
)


def _hardtanh_bounds(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[float, float]:
    if func is F.relu6:
        return 0.0, 6.0
    low = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
    high = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
    return float(low), float(high)


class RectifiedBackward(TorchFunctionMode):
    """While active, every ReLU and ReLU6 the forward pass applies — as a module, a function, a tensor method
    or in place — is replaced by ``_RectifiedBackward`` (``forward_mask``: guided backprop, else deconvnet).

    Hooks on ``nn.ReLU`` modules (Captum's GuidedBackprop) miss functional ReLUs and ``nn.ReLU6``; a function
    mode sees them all. An in-place ReLU returns a new tensor here (the callers use the returned value, as
    ``nn.ReLU(inplace=True)`` inside ``nn.Sequential`` does). ``relus`` counts the replaced calls and
    ``others`` names the other activations met, for ``check``.
    """

    def __init__(self, forward_mask: bool | None, method: str) -> None:
        super().__init__()
        self.forward_mask = forward_mask
        self.method = method
        self.relus = 0
        self.others: set[str] = set()

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func in RELU_FUNCTIONS:
            self.relus += 1
            if self.forward_mask is not None:
                return _RectifiedBackward.apply(args[0], None, self.forward_mask)
        elif func in HARDTANH_FUNCTIONS:
            low, high = _hardtanh_bounds(func, args, kwargs)
            if low == 0.0:
                self.relus += 1
                if self.forward_mask is not None:
                    return _RectifiedBackward.apply(args[0], high, self.forward_mask)
            else:
                self.others.add(f"hardtanh({low:g}, {high:g})")
        elif func in OTHER_ACTIVATIONS:
            self.others.add(func.__name__)
        return func(*args, **kwargs)

    def check(self, model: nn.Module) -> None:
        """ConfigError when the forward pass met an activation the rule does not cover, or no ReLU at all
        (the result would silently be the plain gradient, or half of each)."""
        name = type(model).__name__
        if self.others:
            raise ConfigError(
                f"{self.method} is defined for ReLU networks; {name} also applies {', '.join(sorted(self.others))}, "
                "where no rule exists (use saliency, integrated_gradients or input_x_gradient)"
            )
        if self.relus == 0:
            raise ConfigError(
                f"{self.method}: {name} applies no ReLU, so the result would be the plain gradient (use saliency)"
            )


def relu_module_coverage(model: nn.Module, inputs: Tensor) -> tuple[int, int, set[str]]:
    """One forward pass of ``inputs`` ``[B, C, H, W]``: how many ReLUs it applies (``RectifiedBackward``'s
    count, ReLU6 included), how many of them are ``nn.ReLU`` modules, and the other activations it met.

    What hooks on ``nn.ReLU`` modules (Captum's GuidedBackprop, Deconvolution, GuidedGradCam) cover is the
    second count; the rest pass the plain gradient.
    """
    calls = [0]

    def count(*_: Any) -> None:
        calls[0] += 1

    # isinstance, as Captum checks: a subclass of nn.ReLU is hooked too (nn.ReLU6 is not one)
    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.ReLU)]
    mode = RectifiedBackward(None, "count")
    try:
        with torch.no_grad(), mode:
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return mode.relus, calls[0], mode.others


def rectified_gradients(
    model: nn.Module, inputs: Tensor, target: Tensor, forward_mask: bool, method: str
) -> Tensor:
    """``target_gradients`` with every ReLU's backward rectified (``RectifiedBackward``): ``[B, C, H, W]``."""
    mode = RectifiedBackward(forward_mask, method)
    grad = target_gradients(model, inputs, target, forward_context=lambda: mode)
    mode.check(model)
    return grad


@register_method("guided_backprop", reduce="max_abs", needs={"relu"})
def guided_backprop(model: nn.Module, inputs: Tensor, target: Tensor) -> Tensor:
    """Guided backpropagation (Springenberg et al. 2015): the gradient with each ReLU passing back only
    positive gradients where its input was positive; ``[B, C, H, W]``, reduced by max |value| like saliency.

    Every ReLU and ReLU6 of the forward pass counts, also functional ones (``RectifiedBackward``): Captum's
    GuidedBackprop hooks ``nn.ReLU`` modules only and silently returns the plain gradient through the rest
    (all of MobileNetV2's ReLU6). Equal to Captum's on networks whose ReLUs are all ``nn.ReLU`` modules.
    A network with other activations (GELU, SiLU, ...) is refused.
    """
    return rectified_gradients(model, inputs, target, forward_mask=True, method="guided_backprop")


@register_method("deconvnet", reduce="max_abs", needs={"relu"})
def deconvnet(model: nn.Module, inputs: Tensor, target: Tensor) -> Tensor:
    """Deconvnet (Zeiler & Fergus 2014, as Springenberg et al. 2015 write it): each ReLU passes back the
    positive part of the gradient whatever its input was; ``[B, C, H, W]``, reduced by max |value|.

    Same ReLU coverage as ``guided_backprop``; equal to Captum's Deconvolution on ``nn.ReLU`` networks.
    """
    return rectified_gradients(model, inputs, target, forward_mask=False, method="deconvnet")


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
