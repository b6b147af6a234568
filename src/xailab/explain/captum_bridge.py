"""Any ``captum.attr`` attribution class as an xailab method: ``explain(model, x, "captum:DeepLift")``.

Captum is optional (the ``dev`` extra); it is imported only when a ``captum:<Name>`` method is asked for.
The class is constructed with the model, plus the model's Grad-CAM layer (``cam_layer``, a
``get_submodule`` path; override with the ``layer`` param) where its constructor takes a layer
(``Layer*``, ``Neuron*``, ``GuidedGradCam``), and called as ``.attribute(inputs, target=target, **params)``.
"""

from __future__ import annotations

import inspect
from types import MappingProxyType, ModuleType
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from xailab.errors import ConfigError, UnknownNameError, did_you_mean
from xailab.explain.base import CONTRACT_ARGS, MethodSpec, ParamSpec, declared_params
from xailab.explain.gradients import relu_module_coverage

# Abstract bases in captum.attr.__all__: constructible, but their attribute() is not implemented
ABSTRACT_BASES = frozenset(
    {"Attribution", "GradientAttribution", "PerturbationAttribution", "LayerAttribution", "NeuronAttribution"}
)
# Captum classes that modify the backward pass of nn.ReLU modules only, and xailab's method covering every ReLU
RELU_MODULE_CLASSES = MappingProxyType(
    {"GuidedBackprop": "guided_backprop", "Deconvolution": "deconvnet", "GuidedGradCam": "guided_backprop"}
)
# The constructor arguments the bridge can supply: the model (under either name) and a layer
SUPPLIED_ARGS = frozenset({"forward_func", "model", "layer"})


def _captum_attr() -> ModuleType:
    try:
        import captum.attr
    except ImportError as error:
        raise ConfigError(
            "captum:<Name> methods need Captum, which is not installed: pip install captum "
            "(or install xailab's dev extra: pip install -e '.[dev]')"
        ) from error
    return captum.attr


def _required_args(cls: type[Any]) -> set[str]:
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return {
        p.name for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def captum_classes() -> dict[str, type[Any]]:
    """Captum attribution classes the bridge can build from a model (and a layer), by name."""
    attr = _captum_attr()
    classes = {}
    for name in attr.__all__:
        cls = getattr(attr, name)
        if (
            inspect.isclass(cls)
            and issubclass(cls, attr.Attribution)
            and name not in ABSTRACT_BASES
            and _required_args(cls) <= SUPPLIED_ARGS
        ):
            classes[name] = cls
    return classes


def _unknown(name: str, valid: list[str], all_names: list[str]) -> Exception:
    if name in all_names:
        return ConfigError(
            f"captum.attr.{name} cannot be built from a model alone, so it is not available as 'captum:{name}'. "
            f"Available: {', '.join(valid)}."
        )
    hint = did_you_mean(name, valid)
    return UnknownNameError(f"unknown Captum attribution {name!r}.{hint} Available: {', '.join(valid)}.")


def _layer(model: nn.Module, layer: str | nn.Module | None, name: str) -> nn.Module:
    if isinstance(layer, nn.Module):
        return layer
    path = layer if layer is not None else getattr(model, "cam_layer", None)
    if path is None:
        raise ConfigError(
            f"captum:{name} needs a layer and {type(model).__name__} declares no cam_layer; "
            "pass layer='<submodule path>'"
        )
    try:
        return model.get_submodule(path)
    except AttributeError as error:
        raise ConfigError(f"captum:{name}: {type(model).__name__} has no submodule {path!r}") from error


def check_relu_modules(model: nn.Module, inputs: Tensor, name: str) -> None:
    """ConfigError when ``captum:<name>`` (a ``RELU_MODULE_CLASSES`` class) would silently return the plain
    gradient through some ReLUs of ``model``: those applied as ``nn.ReLU6`` or functionally (``F.relu``), or
    another activation. One forward pass of the first image."""
    relus, modules, others = relu_module_coverage(model, inputs[:1])
    if relus == modules and not others:
        return
    parts = []
    if relus > modules:
        parts.append(f"{relus - modules} of its {relus} ReLUs are ReLU6 or functional, not nn.ReLU modules")
    if others:
        parts.append(f"it applies {', '.join(sorted(others))}, for which guided backprop has no rule")
    remedy = (
        "use saliency or integrated_gradients"
        if others
        else f"use xailab's {RELU_MODULE_CLASSES[name]!r}, which covers every ReLU and ReLU6"
    )
    raise ConfigError(
        f"captum:{name} changes the backward pass of nn.ReLU modules only and silently passes the plain gradient "
        f"elsewhere: in {type(model).__name__}, {'; '.join(parts)}. {remedy[0].upper() + remedy[1:]}."
    )


def _input_shaped(attribution: Tensor | tuple[Tensor, ...], inputs: Tensor, name: str) -> Tensor:
    """Captum's output as ``[B, C, H, W]`` (input-shaped) or ``[B, 1, H, W]``.

    A layer attribution ``[B, K, h, w]`` is summed over its K channels and upsampled bilinearly to the
    input size, as Captum's ``LayerAttribution.interpolate`` does for Grad-CAM.
    """
    if isinstance(attribution, tuple):  # (attribution, convergence delta) or one tensor per input
        attribution = attribution[0]
    if attribution.shape == inputs.shape:
        return attribution
    if attribution.ndim != 4 or attribution.shape[0] != inputs.shape[0]:
        raise ConfigError(
            f"captum:{name} returned shape {tuple(attribution.shape)}, not a [B, K, h, w] map for inputs "
            f"{tuple(inputs.shape)}"
        )
    summed = attribution.sum(1, keepdim=True)
    if summed.shape[-2:] == inputs.shape[-2:]:
        return summed
    return F.interpolate(summed.float(), size=inputs.shape[-2:], mode="bilinear", align_corners=False)


def captum_spec(name: str) -> MethodSpec:
    """A ``MethodSpec`` running ``captum.attr.<name>`` under xailab's contract (``reduce="sum"``).

    The method returns the per-channel map Captum computes (``[B, C, H, W]``) or, for layer attributions,
    ``[B, 1, H, W]``. Its params go to ``.attribute`` except ``layer`` (a submodule path or module for the
    classes that take one; default the model's ``cam_layer``). Unknown names raise an error suggesting the
    closest Captum classes; a missing Captum install raises ``ConfigError`` saying how to install it.
    """
    attr = _captum_attr()
    classes = captum_classes()
    if name not in classes:
        raise _unknown(name, sorted(classes), list(attr.__all__))
    cls = classes[name]
    needs_layer = "layer" in inspect.signature(cls.__init__).parameters
    takes_target = "target" in inspect.signature(cls.attribute).parameters

    def run(
        model: nn.Module,
        inputs: Tensor,
        target: Tensor,
        layer: str | nn.Module | None = None,
        **params: object,
    ) -> Tensor:
        if name in RELU_MODULE_CLASSES:
            check_relu_modules(model, inputs, name)
        method = cls(model, _layer(model, layer, name)) if needs_layer else cls(model)
        if takes_target:  # Neuron* classes attribute a neuron (neuron_selector), not a class
            params["target"] = target
        return _input_shaped(method.attribute(inputs, **params), inputs, name).float().detach()

    doc = (inspect.getdoc(cls) or "").strip().split("\n")[0]
    # .attribute(self, inputs, ...): its keywords, less those the bridge supplies (target) or that explain()
    # owns, are the method's parameters
    params = {
        k: v for k, v in declared_params(cls.attribute, skip=2).items() if k not in CONTRACT_ARGS - {"method"}
    }
    if needs_layer:
        params["layer"] = ParamSpec("layer", str | nn.Module | None, None)
    return MethodSpec(
        f"captum:{name}", run, "sum", f"Captum's {name}: {doc}", params=MappingProxyType(params)
    )
