"""Composites: which LRP rule each layer of a model gets, by module path, by layer type or by category.

A composite maps keys to rules. A key is a module path (``"features.0"``), ``"first"`` (the layers that read
the model input, directly or through parameter-free operations), a layer type or its name (``nn.Conv2d``,
``"Conv2d"``), or a category: ``"conv"``, ``"linear"``, ``"norm"`` (a batch norm canonisation could not
merge), ``"activation"`` (ReLU6 and other clipping activations). The most specific key wins, in that order.
A rule is a ``Rule`` or a rule name (``RULES``) built with the call's ``epsilon``/``gamma``/bounds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from xailab.errors import ConfigError, did_you_mean
from xailab.explain.lrp.rules import (
    ACTIVATION_TYPES,
    CONV_TYPES,
    LINEAR_TYPES,
    NORM_TYPES,
    AlphaBeta,
    Epsilon,
    Flat,
    Gamma,
    Pass,
    Rule,
    WSquare,
    ZBox,
    Zero,
    ZPlus,
)

CATEGORIES: dict[str, tuple[type[nn.Module], ...]] = {
    "conv": CONV_TYPES,
    "linear": LINEAR_TYPES,
    "norm": NORM_TYPES,
    "activation": ACTIVATION_TYPES,
}
SPECIAL_KEYS = ("first", *CATEGORIES)


@dataclass(frozen=True)
class RuleParams:
    """The numbers rule names are built with: ``epsilon`` (epsilon rule), ``gamma`` (gamma rule), ``low`` /
    ``high`` (z-B bounds, scalars or per-channel tensors)."""

    epsilon: float = 1e-6
    gamma: float = 0.25
    low: object = -3.0
    high: object = 3.0


RULES: dict[str, Callable[[RuleParams], Rule]] = {
    "zero": lambda p: Zero(),
    "epsilon": lambda p: Epsilon(p.epsilon),
    "gamma": lambda p: Gamma(gamma=p.gamma),
    "alpha1_beta0": lambda p: AlphaBeta(alpha=1.0, beta=0.0),
    "alpha2_beta1": lambda p: AlphaBeta(alpha=2.0, beta=1.0),
    "z_plus": lambda p: ZPlus(),
    "flat": lambda p: Flat(),
    "w_square": lambda p: WSquare(),
    "z_box": lambda p: ZBox(low=p.low, high=p.high),  # type: ignore[arg-type]
    "pass": lambda p: Pass(),
}

# Layers without an explicit rule in a named composite: an unmerged batch norm is a diagonal linear layer
# (epsilon), and ReLU6's clipped part keeps no relevance (pass).
_BASE = {"norm": "epsilon", "activation": "pass"}

COMPOSITES: dict[str, dict[str, str]] = {
    # one rule everywhere
    "zero": {"conv": "zero", "linear": "zero", "norm": "zero", "activation": "pass"},
    "epsilon": {"conv": "epsilon", "linear": "epsilon", **_BASE},
    "gamma": {"conv": "gamma", "linear": "gamma", **_BASE},
    "alpha1_beta0": {"conv": "alpha1_beta0", "linear": "alpha1_beta0", **_BASE},
    "alpha2_beta1": {"conv": "alpha2_beta1", "linear": "alpha2_beta1", **_BASE},
    "z_plus": {"conv": "z_plus", "linear": "z_plus", **_BASE},
    # the literature's composites (Kohlbrenner et al. 2020; Zennit's names): epsilon on dense layers, a
    # positive rule on convolutions, an input rule at the first layer
    "epsilon_plus": {"conv": "z_plus", "linear": "epsilon", **_BASE},
    "epsilon_plus_flat": {"first": "flat", "conv": "z_plus", "linear": "epsilon", **_BASE},
    "epsilon_gamma_box": {"first": "z_box", "conv": "gamma", "linear": "epsilon", **_BASE},
    "epsilon_alpha2_beta1": {"conv": "alpha2_beta1", "linear": "epsilon", **_BASE},
    "epsilon_alpha2_beta1_flat": {"first": "flat", "conv": "alpha2_beta1", "linear": "epsilon", **_BASE},
    "epsilon_w_square": {"first": "w_square", "conv": "epsilon", "linear": "epsilon", **_BASE},
}

# keys of any type (path, "first", layer type, type name, category): Any, so a user's dict[str, str] fits
Composite = str | Mapping[Any, Rule | str]


def build_rule(rule: Rule | str, params: RuleParams) -> Rule:
    """``rule`` itself, or the rule named ``rule`` built with ``params``."""
    if isinstance(rule, Rule):
        return rule
    if rule not in RULES:
        hint = did_you_mean(str(rule), RULES, n=1, cutoff=0.6)  # difflib's default, as before
        raise ConfigError(f"unknown LRP rule {rule!r}.{hint} Valid: {', '.join(RULES)} or a Rule object")
    return RULES[rule](params)


def composite_map(composite: Composite) -> Mapping[Any, Rule | str]:
    """The key -> rule mapping of a named composite, or the user's mapping itself."""
    if isinstance(composite, str):
        if composite not in COMPOSITES:
            hint = did_you_mean(composite, COMPOSITES, n=1, cutoff=0.6)
            raise ConfigError(
                f"unknown LRP composite {composite!r}.{hint} Valid: {', '.join(COMPOSITES)} or a mapping"
            )
        return COMPOSITES[composite]
    if not isinstance(composite, Mapping):
        raise ConfigError(f"composite must be a name or a mapping of layer keys to rules, got {composite!r}")
    return composite


def rule_for(
    mapping: Mapping[Any, Rule | str], path: str, module: nn.Module, first: bool, params: RuleParams
) -> Rule | None:
    """The rule of ``module`` at ``path`` (None: the module needs none, e.g. a plain ReLU): by path, then
    ``"first"`` for input layers, then by type or type name, then by category."""
    kind = type(module)
    keys: list[object] = [path]
    if first and not isinstance(module, ACTIVATION_TYPES + NORM_TYPES):
        keys.append("first")
    keys += [kind, kind.__name__]
    keys += [category for category, types in CATEGORIES.items() if isinstance(module, types)]
    for key in keys:
        if key in mapping:
            return build_rule(mapping[key], params)
    if isinstance(module, nn.ReLU):
        return None  # the plain gradient of a ReLU is the pass rule
    category = next((c for c, types in CATEGORIES.items() if isinstance(module, types)), None)
    names = ", ".join(repr(k) for k in (category, kind.__name__) if k is not None)
    raise ConfigError(
        f"the LRP composite has no rule for layer {path!r} of type {kind.__name__}; add a rule for "
        f"{names} or {path!r} to the composite"
    )


def uses_rule(composite: Composite, rule: str) -> bool:
    """Whether ``composite`` (a name of ``COMPOSITES`` or a mapping) gives some layer the rule named ``rule``
    (by name, or as a ``Rule`` of the class that name builds): e.g. whether it needs z-B bounds."""
    mapping = composite_map(composite)
    kind = type(RULES[rule](RuleParams()))
    return any(r == rule if isinstance(r, str) else type(r) is kind for r in mapping.values())


def with_dataset_bounds(
    method_params: Mapping[str, Mapping[str, Any]],
    methods: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
) -> dict[str, dict[str, Any]]:
    """``method_params`` with the z-B bounds of the dataset (``box_bounds(mean, std)``: the normalised range
    of images in [0, 1]) given to ``lrp`` wherever it is among ``methods`` and its composite uses ``z_box``,
    unless the user set ``low`` / ``high`` (explicit settings win). Without them the rule would take the
    batch's own minimum and maximum, which depend on the images explained together."""
    from xailab.explain.base import resolve_method  # lazy: the lrp package imports this module
    from xailab.explain.lrp import box_bounds

    out = {m: dict(p) for m, p in method_params.items()}
    if "lrp" not in methods:
        return out
    params = out.setdefault("lrp", {})
    composite = params.get("composite", resolve_method("lrp").params["composite"].default)
    if uses_rule(composite, "z_box"):
        low, high = box_bounds(tuple(mean), tuple(std))
        params.setdefault("low", tuple(low.tolist()))
        params.setdefault("high", tuple(high.tolist()))
    return {m: p for m, p in out.items() if p or m in method_params}
