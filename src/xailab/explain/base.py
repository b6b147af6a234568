"""The explanation contract: ``explain(model, inputs, method, /, target=None, **params) -> Tensor[B, 1, H, W]``.

A method is a registered function ``fn(model, inputs[B, C, H, W], target[B], **params) -> Tensor`` that
returns either a per-channel map ``[B, C, H, W]`` or a single map ``[B, 1, H, W]``. Its keyword parameters
(with defaults and type annotations) are its declared parameters (``MethodSpec.params``), validated and
coerced by ``validate_method_params`` before any work. ``resolve_method`` is the one place a name becomes a
spec (``captum:<Name>`` included). ``explain`` resolves the target, runs the method with the model's
train/eval mode and ``requires_grad`` flags restored afterwards (also after an exception), and reduces
channels the way the method's paper does.
"""

from __future__ import annotations

import contextlib
import inspect
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, NoneType, UnionType
from typing import Any, Literal

import torch
from torch import Tensor, nn

from xailab.autotune import explain_precision
from xailab.config import Bounds
from xailab.device import AUTOCAST_DTYPE
from xailab.errors import ConfigError, did_you_mean
from xailab.registry import Registry

Reduction = Literal["sum", "max_abs", "mean", "none"]
# The contract's own arguments: a method parameter of the same name could never reach the method
CONTRACT_ARGS = frozenset({"model", "inputs", "method", "target", "reduce", "precision"})
_TRUE, _FALSE = frozenset({"true", "yes", "on", "1"}), frozenset({"false", "no", "off", "0"})
_MAX_EVALS = (
    1_000_000  # samples / masks / steps per image: beyond it a typo, not a study (and hours per image)
)
# The valid range of every numeric method parameter, by name: a name means the same thing in every method
# (n_samples of LIME, SmoothGrad and SS-CAM are all "how many perturbed copies per image"). Every int / float
# parameter a method declares must be listed here (a registry-wide test checks it), so no value reaches a
# method unbounded; numbers must be finite in any case.
PARAM_BOUNDS: Mapping[str, Bounds] = MappingProxyType(
    {
        "n_steps": Bounds(1, _MAX_EVALS),
        "n_samples": Bounds(1, _MAX_EVALS),
        "n_masks": Bounds(1, _MAX_EVALS),
        "n_segments": Bounds(1, 100_000),
        "grid": Bounds(1, 4096),
        "cells": Bounds(1, 4096),
        "window": Bounds(1, 4096),
        "stride": Bounds(1, 4096),
        "layers": Bounds(1, 1000),
        "internal_batch_size": Bounds(1, 1 << 20),
        "seed": Bounds(0, 2**63 - 1),
        "p": Bounds(0, 1, low_open=True),  # RISE's keep probability: p = 0 keeps nothing
        "discard_ratio": Bounds(0, 1, high_open=True),  # discarding every attention weight leaves no map
        "noise_level": Bounds(0, 100),
        "std": Bounds(0, 100),
        "blur_sigma": Bounds(0, 1000, low_open=True),
        "kernel_width": Bounds(0, None, low_open=True),
        "compactness": Bounds(0, None, low_open=True),
        "alpha": Bounds(0, None),
        "epsilon": Bounds(0, None),
        "gamma": Bounds(0, None),
        "baseline": Bounds(),  # a fill value: any finite number
        "low": Bounds(),
        "high": Bounds(),
    }
)


@dataclass(frozen=True)
class ParamSpec:
    """A declared method parameter: ``name``, its annotation ``type`` (``Any`` when unannotated) and default.

    ``coerce`` checks a value against the type and converts text (CLI options, form fields) to it: ``int``,
    ``float``, ``bool`` (true/false/yes/no/on/off/1/0), ``None`` (none/null), a ``Literal``'s choices, unions
    of these; other types (tensors, modules, tuples) are accepted when the value is an instance.
    """

    name: str
    type: Any
    default: Any
    bounds: Bounds | None = None

    def members(self) -> tuple[Any, ...]:
        """The annotation's union members (``Literal`` kept whole)."""
        kind = typing.get_origin(self.type)
        return typing.get_args(self.type) if kind in (typing.Union, UnionType) else (self.type,)

    def describe(self) -> str:
        """``name: type = default`` for help texts and error messages."""
        names = []
        for member in self.members():
            if typing.get_origin(member) is Literal:
                names.append(" | ".join(repr(c) for c in typing.get_args(member)))
            else:
                names.append("None" if member is NoneType else getattr(member, "__name__", str(member)))
        return f"{self.name}: {' | '.join(names)} = {self.default!r}"

    def coerce(self, value: Any, method: str) -> Any:
        """``value`` as this parameter's type, or a ConfigError naming the method, parameter and value."""
        if self.type is Any:
            return value
        # None first: the text "none" means None wherever None is allowed (a layer path is never "none")
        for member in sorted(self.members(), key=lambda m: m is not NoneType):
            ok, converted = _match(member, value)
            if ok:
                numeric = isinstance(converted, int | float | tuple | list) and not isinstance(
                    converted, bool
                )
                if numeric and self.bounds is not None and not self.bounds.contains(converted):
                    raise ConfigError(
                        f"method {method!r}: parameter {self.name}={value!r} is out of range; valid: "
                        f"{self.bounds.describe()}"
                    )
                return converted
        raise ConfigError(f"method {method!r}: parameter {self.describe()} cannot take {value!r}")


def _match(member: Any, value: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits one union member, and the value converted to it."""
    text = value.strip() if isinstance(value, str) else None
    if member is Any:
        return True, value
    if member is NoneType:
        return (value is None or (text or "").lower() in ("none", "null")), None
    if typing.get_origin(member) is Literal:
        hashable = isinstance(value, str | int | float | bool | NoneType)
        return (hashable and value in typing.get_args(member)), value
    if member is bool:
        if isinstance(value, bool):
            return True, value
        lowered = (text or "").lower()
        return (lowered in _TRUE | _FALSE), lowered in _TRUE
    if member is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return True, value
        if text is not None and text.lstrip("+-").isdecimal() and text.lstrip("+-").isascii():
            return True, int(text)
        return False, None
    if member is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return True, float(value)
        try:
            return text is not None, float(text)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return False, None
    if member is str:
        return isinstance(value, str), value
    origin = typing.get_origin(member) or member
    if origin is tuple and isinstance(value, list):
        value = tuple(value)  # JSON and YAML have no tuples
    return (isinstance(origin, type) and isinstance(value, origin)), value


def declared_params(fn: Callable[..., Any], skip: int = 3) -> dict[str, ParamSpec]:
    """The keyword parameters of ``fn`` after its first ``skip`` positional ones (model, inputs, target),
    with their resolved annotations (``Any`` when missing or unresolvable) and defaults."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # third-party annotations may not resolve; the names still count
        hints = {}
    params = list(inspect.signature(fn).parameters.values())[skip:]
    return {
        p.name: ParamSpec(
            p.name,
            hints.get(p.name, Any),
            None if p.default is p.empty else p.default,
            PARAM_BOUNDS.get(p.name),
        )
        for p in params
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


# Options of ``explain`` itself that a face may set per method like a parameter (``--method-option``)
CONTRACT_OPTIONS = MappingProxyType({"precision": ParamSpec("precision", Literal["fp32", "bf16"], "fp32")})


@dataclass(frozen=True)
class MethodSpec:
    """A registered explanation method.

    ``reduce``: how a per-channel map becomes ``[B, 1, H, W]`` (``sum`` keeps completeness for integrated
    gradients and input x gradient; ``max_abs`` is saliency's max |grad| over channels; ``none`` for methods
    that already return one map per image, e.g. Grad-CAM). ``params``: the declared parameters (from the
    function's keyword parameters). ``extra_params``: for a wrapper that passes unknown parameters on (e.g.
    SmoothGrad to its base), the parameters those may be, given the call's params.
    """

    name: str
    fn: Callable[..., Tensor]
    reduce: Reduction | Callable[[dict], Reduction]
    description: str = ""
    # Capabilities the model must declare for the method to apply (see ``model_capabilities``), e.g.
    # ``{"attention"}`` for attention rollout. Empty: any differentiable image classifier.
    needs: frozenset[str] = frozenset()
    params: Mapping[str, ParamSpec] = field(default_factory=lambda: MappingProxyType({}))
    extra_params: Callable[[Mapping[str, Any]], Mapping[str, ParamSpec]] | None = None

    def reduction(self, params: dict) -> Reduction:
        """The default reduction for a call with ``params`` (a wrapper such as SmoothGrad reduces as its base)."""
        return self.reduce(params) if callable(self.reduce) else self.reduce


METHODS: Registry[MethodSpec] = Registry("method")


def register_method(
    name: str,
    reduce: Reduction | Callable[[dict], Reduction] = "none",
    description: str = "",
    needs: frozenset[str] | set[str] = frozenset(),
    extra_params: Callable[[Mapping[str, Any]], Mapping[str, ParamSpec]] | None = None,
):
    """Decorator registering ``fn(model, inputs, target, **params) -> Tensor`` as method ``name``.

    ``reduce`` is the channel reduction, or a function of the call's params returning it; ``needs`` the
    model capabilities the method requires (``model_capabilities``). The parameters are ``fn``'s keyword
    parameters; none may be named as an argument of ``explain`` itself (``CONTRACT_ARGS``).
    """

    def add(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        doc = description or (fn.__doc__ or "").split("\n")[0]
        params = declared_params(fn)
        clash = sorted(CONTRACT_ARGS & (params.keys() - {"method"}))  # ``method`` is positional-only
        if clash:
            raise ValueError(f"method {name!r}: parameters {clash} clash with explain()'s own arguments")
        spec = MethodSpec(name, fn, reduce, doc, frozenset(needs), MappingProxyType(params), extra_params)
        METHODS.register(name)(spec)
        return fn

    return add


def resolve_method(name: str) -> MethodSpec:
    """The spec of method ``name``: a registered name, or ``captum:<Name>`` for Captum's attribution class
    ``<Name>`` (Captum imported only then). Unknown names raise an error suggesting the nearest."""
    if not isinstance(name, str):
        raise ConfigError(f"a method name must be a string, got {name!r}")
    if name.startswith("captum:"):
        from xailab.explain.captum_bridge import captum_spec  # Captum is optional: imported only when asked

        return captum_spec(name.split(":", 1)[1])
    return METHODS.get(name)


def validate_method_params(method: str, params: Mapping[str, object]) -> dict[str, Any]:
    """``params`` for ``method`` checked against its declared parameters (plus ``CONTRACT_OPTIONS``: the
    ``precision`` every method runs at) and coerced to their types.

    An unknown name raises a ConfigError naming the method and the parameter, suggesting the nearest and
    listing the valid ones; a value of the wrong type names the parameter, its type and the value.
    """
    spec = resolve_method(method)
    declared = {**dict(spec.params), **CONTRACT_OPTIONS}
    if spec.extra_params is not None:
        base = {k: v for k, v in params.items() if k in declared}
        declared.update({k: v for k, v in spec.extra_params(base).items() if k not in declared})
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key not in declared:
            hint = did_you_mean(str(key), declared, n=1)
            valid = ", ".join(declared) or "none"
            raise ConfigError(f"method {method!r} has no parameter {key!r}.{hint} Valid: {valid}.")
        out[key] = declared[key].coerce(value, method)
    return out


def list_methods() -> list[str]:
    """Names of every registered explanation method."""
    return METHODS.names()


def model_capabilities(model: nn.Module) -> frozenset[str]:
    """What ``model`` offers to explanation methods: ``"conv"`` when it has a ``Conv2d``, ``"relu"`` when it
    has ``nn.ReLU`` / ``nn.ReLU6`` modules (guided backprop, deconvnet: they also check the forward pass met
    no other activation), plus whatever it declares in a ``capabilities`` attribute (a ViT declares e.g.
    ``{"attention", "tokens"}``)."""
    caps = set(getattr(model, "capabilities", ()))
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            caps.add("conv")
        elif isinstance(m, nn.ReLU | nn.ReLU6):
            caps.add("relu")
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

    setattr(forward, AUTOCAST_DTYPE, dtype)  # chunk sizes chosen in the block: those measured at dtype
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


def explain(
    model: nn.Module,
    inputs: Tensor,
    method: str,
    /,
    target: int | Tensor | None = None,
    reduce: Reduction | Literal["default"] | None = "default",
    precision: Literal["fp32", "bf16", "auto"] = "fp32",
    **params: Any,
) -> Tensor:
    """Attribution maps of ``model``'s ``target`` logit for ``inputs`` ``[B, C, H, W]`` (already normalised as
    the model expects) by ``method`` (see ``list_methods()``; ``captum:<Name>`` for Captum's classes).

    Returns float32 ``[B, 1, H, W]`` on the model's device (``reduce=None`` returns the per-channel
    ``[B, C, H, W]`` map of methods that have one). ``params`` go to the method after
    ``validate_method_params``; the first three arguments are positional-only, so a method parameter may be
    called ``method`` (integrated gradients' integration rule).

    ``precision="bf16"`` runs the model under bfloat16 autocast (the fast mode on GPUs and on CPUs with
    native bf16; the inputs, their gradients and the returned maps stay float32). The target class is
    always chosen in float32, so both precisions explain the same class. ``precision="auto"`` is the fast
    mode: bf16 only where ``xailab.autotune`` measured it faster for this model on this device and its maps
    kept a rank correlation >= 0.99 with fp32 ones, else fp32 (``XAILAB_AUTOTUNE=0``: bf16 where the device
    has native bf16).
    """
    spec = resolve_method(method)
    params = validate_method_params(method, params)
    check_applicable(spec, model)
    if inputs.ndim != 4:
        raise ConfigError(f"inputs must be [B, C, H, W], got shape {tuple(inputs.shape)}")
    device = next(model.parameters()).device
    inputs = inputs.to(device=device, dtype=torch.float32)
    if precision not in ("fp32", "bf16", "auto"):
        raise ConfigError(f"precision={precision!r} is not one of: fp32, bf16, auto")
    with preserved_state(model):
        target_t = resolve_target(model, inputs, target)
        precision = explain_precision(model, inputs, precision)  # "auto": measured (cached) per model
        with autocast_forward(model, torch.bfloat16) if precision == "bf16" else contextlib.nullcontext():
            attribution = spec.fn(model, inputs, target_t, **params)
    how: Reduction = "none" if reduce is None else (spec.reduction(params) if reduce == "default" else reduce)
    return reduce_channels(attribution.float(), how).detach()
