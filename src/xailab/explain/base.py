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

    def reduction(self, params: dict) -> Reduction:
        """The default reduction for a call with ``params`` (a wrapper such as SmoothGrad reduces as its base)."""
        return self.reduce(params) if callable(self.reduce) else self.reduce


METHODS: Registry[MethodSpec] = Registry("method")  # type: ignore[type-var]


def register_method(
    name: str, reduce: Reduction | Callable[[dict], Reduction] = "none", description: str = ""
):
    """Decorator registering ``fn(model, inputs, target, **params) -> Tensor`` as method ``name``.

    ``reduce`` is the channel reduction, or a function of the call's params returning it.
    """

    def add(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        METHODS.register(name)(MethodSpec(name, fn, reduce, description or (fn.__doc__ or "").split("\n")[0]))
        return fn

    return add


def list_methods() -> list[str]:
    """Names of every registered explanation method."""
    return METHODS.names()


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
    **params,
) -> Tensor:
    """Attribution maps of ``model``'s ``target`` logit for ``inputs`` ``[B, C, H, W]`` (already normalised as
    the model expects) by ``method`` (see ``list_methods()``).

    Returns float32 ``[B, 1, H, W]`` on the model's device (``reduce=None`` returns the per-channel
    ``[B, C, H, W]`` map of methods that have one). ``params`` go to the method; unknown names raise an
    error suggesting the nearest method.
    """
    spec = captum_method(method.split(":", 1)[1]) if method.startswith("captum:") else METHODS.get(method)
    if inputs.ndim != 4:
        raise ConfigError(f"inputs must be [B, C, H, W], got shape {tuple(inputs.shape)}")
    device = next(model.parameters()).device
    inputs = inputs.to(device=device, dtype=torch.float32)
    with preserved_state(model):
        target_t = resolve_target(model, inputs, target)
        attribution = spec.fn(model, inputs, target_t, **params)
    how: Reduction = "none" if reduce is None else (spec.reduction(params) if reduce == "default" else reduce)
    return reduce_channels(attribution.float(), how).detach()
