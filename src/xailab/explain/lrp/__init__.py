"""Layer-wise relevance propagation (Bach et al. 2015) for any model of the zoo, as one registered method.

``lrp(model, inputs[B, C, H, W], target[B], composite=...) -> [B, C, H, W]`` relevance, summed over channels
by ``explain``. How it works, in three parts after Zennit's design (without importing Zennit):

- ``rules``: each rule is a modified gradient of one layer, so relevance ``R = a * c`` travels through
  autograd; additions, concatenations, pooling and the like need no rule at all.
- ``composites``: which rule each layer gets — a named composite (``COMPOSITES``) or the user's mapping
  from module path, ``"first"``, layer type or category to rule.
- ``canonizers``: a copy of the model's modules (sharing its tensors) with batch norms merged, built after
  one probe pass of one image on the user's model.

The relevance of each image starts as its ``target`` logit and, with LRP-0 on a network without biases, sums
back to it exactly (conservation); biases, epsilon and the batch norms that cannot be merged absorb a share.
Images are explained in chunks of ``internal_batch_size``, one forward and one backward pass per chunk; a
rule layer adds a few element-wise passes over its output (``rules``), about what the batch norms merged
away cost input x gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from xailab.errors import ConfigError
from xailab.explain.base import register_method
from xailab.explain.batching import default_batch_size
from xailab.explain.lrp.canonizers import (
    PASS_THROUGH_TYPES,
    Probe,
    canonical_copy,
    canonize,
    probe,
    replace_module,
)
from xailab.explain.lrp.composites import COMPOSITES, RULES, Composite, RuleParams, composite_map, rule_for
from xailab.explain.lrp.rules import (
    AlphaBeta,
    Epsilon,
    Flat,
    Gamma,
    Pass,
    Rule,
    RuleLayer,
    WSquare,
    ZBox,
    Zero,
    ZPlus,
)

Bound = float | tuple[float, ...] | Tensor | None
# The named composites as a type, so that faces list them and a wrong name is refused before any work;
# spelt out (a type checker cannot read a Literal built from COMPOSITES) and checked against it on import
CompositeName = Literal[
    "zero",
    "epsilon",
    "gamma",
    "alpha1_beta0",
    "alpha2_beta1",
    "z_plus",
    "epsilon_plus",
    "epsilon_plus_flat",
    "epsilon_gamma_box",
    "epsilon_alpha2_beta1",
    "epsilon_alpha2_beta1_flat",
    "epsilon_w_square",
]
if get_args(CompositeName) != tuple(COMPOSITES):
    raise ImportError("xailab.explain.lrp.CompositeName must list COMPOSITES' names in their order")

# How far the rule-carrying copy's logits may be from the model's before canonisation counts as broken
# (a merged batch norm whose layer output is also used elsewhere): relative to the logits' scale.
LOGIT_TOLERANCE = {None: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}


def box_bounds(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    """The z-B rule's per-channel bounds ``[C]`` for images in [0, 1] normalised by ``mean`` and ``std``:
    ``(0 - mean) / std`` and ``(1 - mean) / std``."""
    m, s = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
    return -m / s, (1 - m) / s


def lrp_model(
    model: nn.Module, example: Tensor, composite: Composite, params: RuleParams, canonize: bool = True
) -> tuple[nn.Module, Probe]:
    """A copy of ``model`` (canonised when ``canonize``) whose layers carry the composite's rules, and the
    probe of ``model`` on ``example`` ``[B, C, H, W]``. ``model`` itself is unchanged."""
    mapping = composite_map(composite)
    found = probe(model, example)
    if not canonize:
        found.merges = []
    twin = canonical_copy(model, found)
    merged = {norm for _, norm, _ in found.merges}
    for path, module in list(twin.named_modules()):
        if path in merged or next(module.children(), None) is not None:
            continue
        explicit = path in mapping or type(module) in mapping or type(module).__name__ in mapping
        if isinstance(module, PASS_THROUGH_TYPES) and not explicit:
            continue
        rule = rule_for(mapping, path, module, path in found.first, params)
        if rule is not None:
            replace_module(twin, path, RuleLayer(module, rule))
    return twin, found


def check_logits(found: Probe, logits: Tensor) -> None:
    """ConfigError when the rule-carrying copy's logits ``[1, K]`` differ from the model's (``found``)."""
    reference = found.logits
    if reference is None:  # probe() always records them; a hand-made Probe may not
        raise ConfigError("check_logits needs the Probe returned by probe(): its logits are None")
    error = (logits.float() - reference).abs().max().item()
    scale = reference.abs().max().item() + 1.0
    if error > LOGIT_TOLERANCE.get(found.autocast, 5e-2) * scale:
        raise ConfigError(
            f"LRP canonisation changed the model's output (max logit difference {error:.3g}); a merged batch "
            "norm's layer output may be used elsewhere: pass canonize=False"
        )


# The zoo's transformers have layers without a rule (token embedding, layer norm, attention): LRP is offered
# for convolutional models; any other model with unsupported layers gets an error naming their type.
@register_method("lrp", reduce="sum", needs={"conv"})
def lrp(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor,
    composite: CompositeName | Mapping = "epsilon_plus_flat",
    epsilon: float = 1e-6,
    gamma: float = 0.25,
    low: Bound = None,
    high: Bound = None,
    canonize: bool = True,
    internal_batch_size: int | None = None,
) -> Tensor:
    """Layer-wise relevance propagation: relevance ``[B, C, H, W]`` of each image's ``target`` logit.

    ``composite``: a name of ``COMPOSITES`` (``epsilon_plus_flat``: z+ on convolutions, epsilon on dense
    layers, flat at the input) or a mapping from module path, ``"first"``, layer type (or its name) or
    category (``conv``, ``linear``, ``norm``, ``activation``) to a rule name of ``RULES`` or a ``Rule``.
    ``epsilon``/``gamma``: the epsilon and gamma rules' parameters. ``low``/``high``: the z-B rule's input
    bounds, scalars or one value per channel (``box_bounds(mean, std)`` for [0, 1] images normalised by the
    dataset's statistics); None: the minimum/maximum of ``inputs`` per channel. ``canonize``: merge batch
    norms into adjacent layers first (a copy; the model is unchanged). Layers without a rule raise a
    ConfigError naming their type. Runs under ``explain``'s bf16 autocast too (the relevance stays float32).
    """
    reduce_dims = [0, *range(2, inputs.ndim)]
    low = inputs.amin(dim=reduce_dims) if low is None else low
    high = inputs.amax(dim=reduce_dims) if high is None else high
    params = RuleParams(epsilon=epsilon, gamma=gamma, low=_bound(low, inputs), high=_bound(high, inputs))
    twin, found = lrp_model(model, inputs, composite, params, canonize)
    device_type = inputs.device.type
    autocast = (
        torch.autocast(device_type, dtype=found.autocast)
        if found.autocast is not None
        else contextlib.nullcontext()
    )
    size = internal_batch_size or default_batch_size(inputs, grad=True, model=model)  # as input x gradient
    if size < 1:
        raise ConfigError(f"internal_batch_size={size} must be positive")
    relevance = torch.empty_like(inputs)
    for start in range(0, inputs.shape[0], size):
        x = inputs[start : start + size].detach().requires_grad_(True)
        with torch.enable_grad(), autocast:
            logits = twin(x)
        if start == 0:
            check_logits(found, logits[:1].detach())
        score = logits.float().gather(1, target[start : start + size, None]).sum()
        (grad,) = torch.autograd.grad(score, x)
        relevance[start : start + size] = (x * grad).detach()
    return relevance


def _bound(value: Bound, inputs: Tensor) -> float | Tensor:
    """A z-B bound as a float or a float32 tensor on the inputs' device."""
    if isinstance(value, int | float):
        return float(value)
    return torch.as_tensor(value, dtype=torch.float32, device=inputs.device)


__all__ = [
    "COMPOSITES",
    "RULES",
    "AlphaBeta",
    "Epsilon",
    "Flat",
    "Gamma",
    "Pass",
    "Rule",
    "RuleLayer",
    "RuleParams",
    "WSquare",
    "ZBox",
    "ZPlus",
    "Zero",
    "box_bounds",
    "canonize",
    "lrp",
    "lrp_model",
    "probe",
]
