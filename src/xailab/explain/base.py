"""The explanation contract: ``explain(model, inputs, method, target=None, **params) -> Tensor[B, 1, H, W]``.

A method is a registered function ``fn(model, inputs[B, C, H, W], target[B], **params) -> Tensor`` that
returns either a per-channel map ``[B, C, H, W]`` or a single map ``[B, 1, H, W]``. ``explain`` resolves
the target, runs the method with the model's train/eval mode and ``requires_grad`` flags restored
afterwards (also after an exception), and reduces channels the way the method's paper does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from xailab.errors import ConfigError
from xailab.registry import Registry

Reduction = Literal["sum", "max_abs", "mean", "none"]


@dataclass(frozen=True)
class MethodSpec:
    """A registered explanation method.

    ``reduce``: how a per-channel map becomes ``[B, 1, H, W]`` (``sum`` keeps completeness for integrated
    gradients and input x gradient; ``max_abs`` is saliency's max |grad| over channels; ``none`` for methods
    that already return one map per image, e.g. Grad-CAM).
    """

    name: str
    fn: Callable[..., Tensor]
    reduce: Reduction | Callable[[dict], Reduction]
    description: str = ""
    # Capabilities the model must declare for the method to apply (see ``model_capabilities``), e.g.
    # ``{"attention"}`` for attention rollout. Empty: any differentiable image classifier.
    needs: frozenset[str] = frozenset()

    def reduction(self, params: dict) -> Reduction:
        """The default reduction for a call with ``params`` (a wrapper such as SmoothGrad reduces as its base)."""
        return self.reduce(params) if callable(self.reduce) else self.reduce


METHODS: Registry[MethodSpec] = Registry("method")  # type: ignore[type-var]


def register_method(
    name: str,
    reduce: Reduction | Callable[[dict], Reduction] = "none",
    description: str = "",
    needs: frozenset[str] | set[str] = frozenset(),
):
    """Decorator registering ``fn(model, inputs, target, **params) -> Tensor`` as method ``name``.

    ``reduce`` is the channel reduction, or a function of the call's params returning it; ``needs`` the
    model capabilities the method requires (``model_capabilities``).
    """

    def add(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        doc = description or (fn.__doc__ or "").split("\n")[0]
        METHODS.register(name)(MethodSpec(name, fn, reduce, doc, frozenset(needs)))
        return fn

    return add


# Images per chunk, as (pixel budget, cap). On a CPU the throughput of a batch falls once its activations
# outgrow the caches (measured on a 2-core AVX2 EPYC: mnist_cnn forwards 1,981 img/s at 64, 904 at 512), so
# CPU chunks are moderate; accelerators want large batches to hide per-call overhead. Backward passes keep
# every activation, so with gradients the budget counts fewer pixels per image. A 224x224 DenseNet-169 gets
# 2 images per no-grad chunk on a CPU and 41 on a GPU, which keeps lime with n_samples=1000 far from OOM.
_CHUNK_BUDGETS = {
    ("cpu", False): (128 * 32 * 32, 128),
    ("cpu", True): (256 * 64 * 64, 256),
    ("accelerator", False): (2048 * 32 * 32, 2048),
    ("accelerator", True): (512 * 64 * 64, 512),
}


def default_batch_size(inputs: Tensor, grad: bool) -> int:
    """Images per chunk of perturbed or interpolated copies of ``inputs`` ``[B, C, H, W]`` sent through the
    model at once: forward only (``grad=False``) or forward and backward (``grad=True``).

    Scaled by the image size so that a chunk's memory stays roughly constant, larger on accelerators. Every
    method takes ``internal_batch_size`` to override it.
    """
    kind = "cpu" if inputs.device.type == "cpu" else "accelerator"
    pixels, cap = _CHUNK_BUDGETS[(kind, grad)]
    return max(1, min(cap, pixels // (inputs.shape[-2] * inputs.shape[-1])))


def list_methods() -> list[str]:
    """Names of every registered explanation method."""
    return METHODS.names()


def model_capabilities(model: nn.Module) -> frozenset[str]:
    """What ``model`` offers to explanation methods: ``"conv"`` when it has a ``Conv2d``, plus whatever it
    declares in a ``capabilities`` attribute (a ViT declares e.g. ``{"attention", "tokens"}``)."""
    caps = set(getattr(model, "capabilities", ()))
    if any(isinstance(m, nn.Conv2d) for m in model.modules()):
        caps.add("conv")
    return frozenset(caps)


def applicable_methods(model: nn.Module) -> list[str]:
    """Names of the registered methods whose ``needs`` ``model`` meets (what a face should offer for it)."""
    caps = model_capabilities(model)
    return [name for name in METHODS.names() if METHODS.get(name).needs <= caps]


def check_applicable(spec: MethodSpec, model: nn.Module) -> None:
    """ConfigError naming what ``model`` lacks if it does not offer the capabilities ``spec`` needs, listing
    the methods that would work on it (a transformer method asked of a CNN, a CNN-only one of a ViT)."""
    caps = model_capabilities(model)
    missing = spec.needs - caps
    if missing:
        raise ConfigError(
            f"method {spec.name!r} needs a model with {', '.join(sorted(missing))} (this model offers: "
            f"{', '.join(sorted(caps)) or 'none'}); methods that apply to it: {', '.join(applicable_methods(model))}"
        )


def reduce_channels(attribution: Tensor, how: Reduction) -> Tensor:
    """``[B, C, H, W] -> [B, 1, H, W]`` by ``sum``, ``mean`` or ``max_abs``; ``none`` returns it unchanged."""
    if how == "none" or (attribution.shape[1] == 1 and how != "max_abs"):
        return attribution
    if how == "sum":
        return attribution.sum(1, keepdim=True)
    if how == "mean":
        return attribution.mean(1, keepdim=True)
    if how == "max_abs":
        return attribution.abs().amax(1, keepdim=True)
    raise ConfigError(f"unknown channel reduction {how!r}; valid: sum, mean, max_abs, none")


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block, then restore every module's mode and every parameter's
    ``requires_grad`` flag, also when the block raises."""
    modes = {m: m.training for m in model.modules()}
    flags = {p: p.requires_grad for p in model.parameters()}
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode
        for p, flag in flags.items():
            p.requires_grad_(flag)


@contextlib.contextmanager
def autocast_forward(model: nn.Module, dtype: torch.dtype) -> Iterator[nn.Module]:
    """Run ``model``'s forward under ``dtype`` autocast for the block, its logits returned as float32.

    Only the model is autocast, not the method's own arithmetic (kernels, regressions, normalisation), which
    stays float32. The instance's ``forward`` is swapped for the block, so hooks on submodules and module
    paths (Grad-CAM layers) are unchanged; the original is restored also when the block raises.
    """
    device_type = next(model.parameters()).device.type
    had_own = "forward" in vars(model)
    original = model.forward

    def forward(*args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            return original(*args, **kwargs).float()

    model.forward = forward
    try:
        yield model
    finally:
        if had_own:
            model.forward = original
        else:
            del model.forward


def resolve_target(model: nn.Module, inputs: Tensor, target: int | Tensor | None) -> Tensor:
    """``target`` as a ``[B]`` long tensor on the inputs' device; None means the predicted class."""
    b = inputs.shape[0]
    if target is None:
        with torch.no_grad():
            return model(inputs).argmax(1)
    if isinstance(target, int):
        return torch.full((b,), target, dtype=torch.long, device=inputs.device)
    target = torch.as_tensor(target, device=inputs.device).long().reshape(-1)
    if target.shape[0] != b:
        raise ConfigError(f"target has {target.shape[0]} entries for {b} inputs; give one class per image")
    return target


def captum_method(name: str) -> MethodSpec:
    """A ``MethodSpec`` running Captum's attribution class ``name`` (``captum:<Name>``) under this contract."""
    from xailab.explain.captum_bridge import captum_spec  # Captum is optional: imported only when asked for

    return captum_spec(name)


def explain(
    model: nn.Module,
    inputs: Tensor,
    method: str,
    target: int | Tensor | None = None,
    reduce: Reduction | Literal["default"] | None = "default",
    precision: Literal["fp32", "bf16"] = "fp32",
    **params,
) -> Tensor:
    """Attribution maps of ``model``'s ``target`` logit for ``inputs`` ``[B, C, H, W]`` (already normalised as
    the model expects) by ``method`` (see ``list_methods()``).

    Returns float32 ``[B, 1, H, W]`` on the model's device (``reduce=None`` returns the per-channel
    ``[B, C, H, W]`` map of methods that have one). ``params`` go to the method; unknown names raise an
    error suggesting the nearest method.

    ``precision="bf16"`` runs the model under bfloat16 autocast (the fast mode on GPUs and on CPUs with
    native bf16; the inputs, their gradients and the returned maps stay float32). The target class is
    always chosen in float32, so both precisions explain the same class.
    """
    spec = captum_method(method.split(":", 1)[1]) if method.startswith("captum:") else METHODS.get(method)
    check_applicable(spec, model)
    if inputs.ndim != 4:
        raise ConfigError(f"inputs must be [B, C, H, W], got shape {tuple(inputs.shape)}")
    device = next(model.parameters()).device
    inputs = inputs.to(device=device, dtype=torch.float32)
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"precision={precision!r} is not one of: fp32, bf16")
    with preserved_state(model):
        target_t = resolve_target(model, inputs, target)
        with autocast_forward(model, torch.bfloat16) if precision == "bf16" else contextlib.nullcontext():
            attribution = spec.fn(model, inputs, target_t, **params)
    how: Reduction = "none" if reduce is None else (spec.reduction(params) if reduce == "default" else reduce)
    return reduce_channels(attribution.float(), how).detach()
