"""The model registry: ``create_model(name, in_channels, num_classes, **options)`` and ``list_models()``.

Contract of every model: an ``nn.Module`` mapping float ``[B, C, H, W]`` to logits ``[B, K]``, with a
``cam_layer`` attribute naming the module (a ``get_submodule`` path) Grad-CAM explains by default.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from xailab.config import check_type
from xailab.errors import ConfigError
from xailab.registry import Registry


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its factory and the input size it is meant for (``(H, W)``)."""

    name: str
    factory: Callable[..., nn.Module]
    input_size: tuple[int, int]
    description: str = ""


MODELS: Registry[ModelSpec] = Registry("model")


def register_model(name: str, input_size: tuple[int, int] = (32, 32), description: str = ""):
    """Decorator registering ``factory(in_channels, num_classes, **options) -> nn.Module`` as ``name``."""

    def add(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS.register(name)(
            ModelSpec(name, factory, input_size, description or (factory.__doc__ or "").split("\n")[0])
        )
        return factory

    return add


def create_model(name: str, in_channels: int = 3, num_classes: int = 10, **options) -> nn.Module:
    """Build the registered model ``name`` for ``in_channels``-channel inputs and ``num_classes`` outputs.

    Unknown options raise an error that lists the ones the model accepts.
    """
    spec = MODELS.get(name)
    accepted = [
        p for p in inspect.signature(spec.factory).parameters if p not in ("in_channels", "num_classes")
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"model {name!r} has no option {', '.join(unknown)}; its options are: {', '.join(accepted) or 'none'}"
        )
    try:
        hints = typing.get_type_hints(spec.factory)
    except Exception:  # an annotation that does not resolve: the factory's own checks remain
        hints = {}
    options = {  # "dropout=abc" is named here, not deep inside torch
        k: check_type(f"model {name!r}: option {k}", v, hints[k]) if k in hints else v
        for k, v in options.items()
    }
    try:
        model = spec.factory(in_channels=in_channels, num_classes=num_classes, **options)
    except (ValueError, TypeError) as e:  # a value the layers refuse (dropout=5): say which model and options
        raise ConfigError(f"model {name!r}: options {options} are invalid: {e}") from None
    # torch types Module.__setattr__'s value as Tensor | Module, though any value is stored as a plain attribute
    model.model_name = name  # type: ignore[assignment]
    return model


def list_models() -> list[str]:
    """Names of all registered models."""
    return MODELS.names()


def model_input_size(name: str) -> tuple[int, int]:
    """The ``(H, W)`` input size model ``name`` is designed for."""
    return MODELS.get(name).input_size


def random_init_options(name: str) -> dict:
    """Options that build ``name`` with random weights: ``False`` for each option that loads weights
    (``pretrained`` and any ``*_weights``, e.g. the ensemble's per-backbone ones), else ``{}``. Rebuilding a
    run's model before loading its own weights uses it, so the files it started from need not exist."""
    return {
        p: False
        for p in inspect.signature(MODELS.get(name).factory).parameters
        if p == "pretrained" or p.endswith("_weights")
    }


def size_options(name: str, image_size: tuple[int, int]) -> dict:
    """``{"image_size": H}`` for models whose layers depend on the input size (e.g. ``keras_cnn``'s dense
    layer), else ``{}``: lets a run at a non-default size build the model that fits its images."""
    return (
        {"image_size": image_size[0]}
        if "image_size" in inspect.signature(MODELS.get(name).factory).parameters
        else {}
    )
