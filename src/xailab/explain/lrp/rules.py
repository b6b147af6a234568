"""LRP rules as modified gradients: each rule says how a layer's relevance goes back to its input.

Relevance travels through autograd as a gradient ``c`` with ``R = a * c`` at every tensor ``a`` (so the
relevance at the output of the target logit is the logit itself, ``c = 1``). Under this convention the
plain gradient is already the right propagation for everything without weights: a ReLU or max-pool passes
relevance to the winners, and an addition, a concatenation, an average or a channel repeat splits it in
proportion to the contributions (``R_a = a * c``, ``R_b = b * c``, ``R_a + R_b = (a + b) * c``). Only layers
with weights (and saturating activations such as ReLU6) need a rule.

A rule turns layer ``z = f(x)`` into one or more terms ``(coef_k, z_k(x))``; the layer's output keeps the
value ``z`` exactly but its gradient becomes ``sum_k coef_k J_k^T (c * z / stab(z_k))``, so that
``R_in = x * c_in = sum_k coef_k x * J_k^T (R_out / stab(z_k))`` — the z-rule of Bach et al. 2015 with the
rule's ``z_k``. For an input-layer rule whose relevance does not scale with ``x`` (flat, w-square, z-B), the
terms see ``u = x / x`` (value 1, gradient ``1 / x``), so ``x * c_in`` is that rule's relevance.

Cost: ``RuleLayer`` computes each term's factor ``z / stab(z_k)`` once in the forward pass and hands the layer's
output to autograd through one custom function (``RuleGradient``) whose backward is one multiplication per
term; an epsilon or LRP-0 layer reuses its own output as the term (no second forward), so it costs its forward,
one stabilised division and its plain backward: about what the layer's input gradient costs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xailab.errors import ConfigError

# The affine layer types every rule applies to, and the saturating activations the pass rule applies to
# (unannotated so that isinstance narrows to the concrete classes and their typed attributes)
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LINEAR_TYPES = (nn.Linear,)
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.ReLU)
AFFINE_TYPES = CONV_TYPES + LINEAR_TYPES + NORM_TYPES

Terms = list[tuple[float, Tensor]]


def affine_params(layer: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The layer's weight and bias; a batch norm (eval mode) as the per-channel ``a x + b`` it computes:
    ``a = gamma / sqrt(var + eps)``, ``b = beta - a * mean``."""
    if isinstance(layer, NORM_TYPES):
        var = layer.running_var if layer.running_var is not None else torch.ones(layer.num_features)
        mean = layer.running_mean if layer.running_mean is not None else torch.zeros(layer.num_features)
        scale = torch.rsqrt(var + layer.eps)
        if layer.weight is not None:
            scale = scale * layer.weight
        shift = -mean * scale
        if layer.bias is not None:
            shift = shift + layer.bias
        return scale, shift
    # every layer a rule is attached to is an AFFINE_TYPES layer: a tensor weight, an optional tensor bias
    return cast(Tensor, layer.weight), cast("Tensor | None", layer.bias)


def affine(layer: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``layer``'s forward with ``weight`` and ``bias`` in place of its own (``[B, C_in, ...] -> [B, C_out, ...]``)."""
    if isinstance(layer, CONV_TYPES):
        return layer._conv_forward(x, weight, bias)  # the layer's own padding modes included
    if isinstance(layer, LINEAR_TYPES):
        return F.linear(x, weight, bias)
    if isinstance(layer, NORM_TYPES):
        shape = (1, -1) + (1,) * (x.ndim - 2)
        out = x * weight.view(shape)
        return out if bias is None else out + bias.view(shape)
    raise ConfigError(f"layer type {type(layer).__name__} has no weights an LRP rule can modify")


def stabilize(z: Tensor, epsilon: float) -> Tensor:
    """``z + epsilon * sign(z)`` with ``sign(0) = +1`` (Zennit's and Captum's convention)."""
    return z + epsilon * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def safe_divide(numerator: Tensor, denominator: Tensor, epsilon: float) -> Tensor:
    """``numerator / stabilize(denominator, epsilon)``, and 0 where that denominator is exactly 0."""
    den = stabilize(denominator, epsilon)
    nonzero = den != 0
    return torch.where(nonzero, numerator / torch.where(nonzero, den, torch.ones_like(den)), 0.0)


def stabilized_ratio(numerator: Tensor, denominator: Tensor, epsilon: float) -> Tensor:
    """``safe_divide(numerator, denominator, epsilon)`` in fewer passes over the tensors (same values; the
    sign of a zero result may differ). Without grad: the factor ``RuleLayer`` multiplies gradients by."""
    with torch.no_grad():
        if epsilon > 0 and epsilon >= torch.finfo(denominator.dtype).tiny:
            # |den| >= epsilon > 0 everywhere (epsilon is a normal number in den's dtype): no zero to mask
            sign = torch.where(denominator >= 0, epsilon, -epsilon).to(denominator.dtype)
            return numerator / (denominator + sign)
        # where den == 0 the division gives inf or nan, which the mask replaces
        return torch.where(denominator != 0, numerator / denominator, 0.0)


def output_ratio(z: Tensor, epsilon: float) -> Tensor:
    """``safe_divide(z, z, epsilon)``, the epsilon rule's factor ``z / (z + epsilon sign z)``, as
    ``|z| / (|z| + epsilon)`` (the same floats: IEEE rounding is symmetric in sign), 0 where ``z == 0``."""
    with torch.no_grad():
        if epsilon > 0 and epsilon >= torch.finfo(z.dtype).tiny:
            magnitude = z.abs()
            return magnitude.div_(magnitude + epsilon)
        return (z != 0).to(z.dtype)


def unit(x: Tensor) -> Tensor:
    """A tensor of ones (zeros where ``x == 0``) whose gradient is ``1 / x``: an input rule built on it gets
    relevance ``x * c_in`` independent of ``x`` (flat, w-square) or of the bounds it multiplies (z-B)."""
    d = x.detach()
    nonzero = d != 0
    return x / torch.where(nonzero, d, torch.ones_like(d)) * nonzero


def split_signs(x: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(max(x, 0), min(x, 0))``; where ``x`` has no negative entry, ``(x, None)``: the negative part's
    terms are then 0 and are skipped (one convolution less each). Their gradient would only reach inputs
    exactly 0, which carry no relevance (``R = x c``) and pass none back (the ReLU, rule layer or pooling
    that made a 0 gives it no gradient)."""
    if bool((x < 0).any()):
        return x.clamp(min=0), x.clamp(max=0)
    return x, None


def _pos(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.clamp(min=0)


def _neg(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.clamp(max=0)


@dataclass(frozen=True)
class Rule:
    """Base rule. ``stabilizer``: the ``epsilon`` added to every denominator's magnitude (Zennit's 1e-6);
    ``reuses_output``: the rule's only term is the layer's own output (no second forward)."""

    stabilizer: float = 1e-6

    reuses_output = False
    name = "rule"

    def terms(self, layer: nn.Module, x: Tensor, z: Tensor) -> Terms:
        """The ``(coef, z_k)`` terms for layer input ``x`` and output ``z`` (see the module docstring)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Epsilon(Rule):
    """LRP-epsilon: ``R_i = sum_j x_i w_ij / (z_j + eps sign z_j) R_j``; the bias keeps its share."""

    stabilizer: float = 1e-6
    reuses_output = True
    name = "epsilon"

    def terms(self, layer: nn.Module, x: Tensor, z: Tensor) -> Terms:
        return [(1.0, z)]


@dataclass(frozen=True)
class Zero(Epsilon):
    """LRP-0 (Bach et al. 2015): epsilon = 0 (a zero output passes no relevance instead of dividing by 0)."""

    stabilizer: float = 0.0
    name = "zero"


@dataclass(frozen=True)
class Gamma(Rule):
    """LRP-gamma (Montavon et al. 2019), for inputs of either sign as in Zennit: contributions of the
    output's sign are favoured, with weights (and bias, unless ``zero_bias``) ``w + gamma * max(w, 0)`` on
    positive inputs and ``w + gamma * min(w, 0)`` on negative ones where ``z > 0`` (the other way round where
    ``z < 0``). For non-negative inputs and ``z > 0`` this is the paper's ``w + gamma w+``."""

    gamma: float = 0.25
    zero_bias: bool = False
    name = "gamma"

    def terms(self, layer: nn.Module, x: Tensor, z: Tensor) -> Terms:
        w, b = affine_params(layer)
        up, down = w + self.gamma * w.clamp(min=0), w + self.gamma * w.clamp(max=0)
        b_up = b_down = None
        if b is not None and not self.zero_bias:
            b_up, b_down = b + self.gamma * b.clamp(min=0), b + self.gamma * b.clamp(max=0)
        xp, xn = split_signs(x)
        positive, negative = affine(layer, xp, up, b_up), affine(layer, xp, down, b_down)
        if xn is not None:
            positive, negative = (
                positive + affine(layer, xn, down, None),
                negative + affine(layer, xn, up, None),
            )
        return [(1.0, torch.where(z.detach() >= 0, positive, negative))]


@dataclass(frozen=True)
class AlphaBeta(Rule):
    """LRP-alpha-beta (Bach et al. 2015): ``R = alpha R+ - beta R-``, the positive contributions
    ``(x w)+`` (``x+ w+ + x- w-``, plus ``b+``) and negative ones normalised separately; ``alpha - beta = 1``."""

    alpha: float = 2.0
    beta: float = 1.0
    zero_bias: bool = False
    name = "alpha_beta"

    def __post_init__(self) -> None:
        if abs(self.alpha - self.beta - 1) > 1e-9:
            raise ConfigError(
                f"alpha-beta rule: alpha - beta must be 1, got alpha={self.alpha}, beta={self.beta}"
            )

    def terms(self, layer: nn.Module, x: Tensor, z: Tensor) -> Terms:
        w, b = affine_params(layer)
        b = None if self.zero_bias else b
        xp, xn = split_signs(x)
        wp, wn = w.clamp(min=0), w.clamp(max=0)
        positive = affine(layer, xp, wp, _pos(b))
        if xn is not None:
            positive = positive + affine(layer, xn, wn, None)
        terms = [(self.alpha, positive)]
        if self.beta:
            negative = affine(layer, xp, wn, _neg(b))
            if xn is not None:
                negative = negative + affine(layer, xn, wp, None)
            terms.append((-self.beta, negative))
        return terms


@dataclass(frozen=True)
class ZPlus(Rule):
    """LRP-z+ (Montavon et al. 2017): only positive contributions ``x+ w+ + x- w-``, no bias (alpha 1,
    beta 0 without bias)."""

    name = "z_plus"

    def terms(self, layer: nn.Module, x: Tensor, z: Tensor) -> Terms:
        w, _ = affine_params(layer)
        xp, xn = split_signs(x)
        z = affine(layer, xp, w.clamp(min=0), None)
        if xn is not None:
            z = z + affine(layer, xn, w.clamp(max=0), None)
        return [(1.0, z)]


@dataclass(frozen=True)
class Flat(Rule):
    """Flat input rule (Lapuschkin et al. 2019): every input of an output's receptive field gets an equal
    share, ``R_i = sum_j R_j / n_j``, whatever the input values and weights."""

    name = "flat"

    def terms(self, layer: nn.Module, x: Tensor, z: Tensor) -> Terms:
        w, _ = affine_params(layer)
        return [(1.0, affine(layer, unit(x), torch.ones_like(w), None))]


@dataclass(frozen=True)
class WSquare(Rule):
    """w-square input rule (Montavon et al. 2017): ``R_i = sum_j w_ij^2 / sum_i' w_i'j^2 R_j``."""

    name = "w_square"

    def terms(self, layer: nn.Module, x: Tensor, z: Tensor) -> Terms:
        w, _ = affine_params(layer)
        return [(1.0, affine(layer, unit(x), w * w, None))]


@dataclass(frozen=True)
class ZBox(Rule):
    """z-B input rule (Montavon et al. 2017) for inputs bounded by ``low <= x <= high`` (the normalised data
    range): ``R_i = sum_j (x_i w_ij - l_i w+_ij - h_i w-_ij) / z^B_j R_j``. ``low``/``high``: scalars or
    per-channel tensors broadcastable to the layer input (``[C]`` is read as one value per channel)."""

    low: float | Tensor = -3.0
    high: float | Tensor = 3.0
    name = "z_box"

    def bound(self, value: float | Tensor, x: Tensor) -> Tensor:
        t = torch.as_tensor(value, dtype=x.dtype, device=x.device)
        if t.ndim == 1 and x.ndim > 2:  # one value per channel
            t = t.view(1, -1, *([1] * (x.ndim - 2)))
        elif (
            t.ndim == 1 and x.ndim == 2 and t.numel() > 1
        ):  # per channel, read by a dense layer: flattened C, H, W
            t = t.repeat_interleave(x.shape[1] // t.numel())
        return t.expand_as(x)

    def terms(self, layer: nn.Module, x: Tensor, z: Tensor) -> Terms:
        w, _ = affine_params(layer)
        u = unit(x)
        low, high = self.bound(self.low, x), self.bound(self.high, x)
        z_box = (
            affine(layer, x, w, None)
            - affine(layer, u * low, w.clamp(min=0), None)
            - affine(layer, u * high, w.clamp(max=0), None)
        )
        return [(1.0, z_box)]


@dataclass(frozen=True)
class Pass(Rule):
    """Relevance passes unchanged, ``R_in = R_out`` (for element-wise layers: ReLU6's clipped part or an
    unmerged batch norm keep no relevance)."""

    stabilizer: float = 0.0
    name = "pass"

    def terms(self, layer: nn.Module, x: Tensor, z: Tensor) -> Terms:
        if x.shape != z.shape:
            raise ConfigError(
                f"the pass rule needs an element-wise layer; {type(layer).__name__} changes the shape"
            )
        return [(1.0, x)]


def shrinks_toward_zero(module: nn.Module) -> bool:
    """Whether ``module`` is an activation with ``|f(x)| <= |x|`` and the sign of ``x`` kept (ReLU, ReLU6, a
    hardtanh around 0, a leaky ReLU with slope in [0, 1]): the pass rule's ``f(x) / x`` is then in [0, 1]."""
    if isinstance(module, nn.ReLU):
        return True
    if isinstance(module, nn.Hardtanh):
        return module.min_val <= 0 <= module.max_val
    if isinstance(module, nn.LeakyReLU):
        return 0 <= module.negative_slope <= 1
    return False


class RuleGradient(torch.autograd.Function):
    """``value`` (a layer's output, computed without grad) as the output of a node whose backward sends
    ``coef_k * grad * scale_k`` to each term ``z_k``: the rule's modified gradient in one node.

    ``value`` is handed back itself, marked as changed in place (so it is neither copied nor a view: a later
    in-place operation on it, e.g. ``ReLU(inplace=True)``, is allowed); it must be a tensor no autograd node
    saved. The factors ``scale_k`` are computed beforehand, so the backward reads nothing ``value``'s later
    users may change.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        value: Tensor,
        coefs: tuple[float, ...],
        scales: tuple[Tensor, ...],
        *terms: Tensor,
    ) -> Tensor:
        ctx.mark_dirty(value)
        ctx.coefs = coefs  # type: ignore[attr-defined]
        ctx.save_for_backward(*scales)
        return value

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        scales = ctx.saved_tensors  # type: ignore[attr-defined]
        coefs: tuple[float, ...] = ctx.coefs  # type: ignore[attr-defined]
        # (coef * grad) * scale: the unfused form's order of rounding
        grads = [(grad if coef == 1.0 else grad * coef) * s for coef, s in zip(coefs, scales, strict=True)]
        return (None, None, None, *grads)


class RuleLayer(nn.Module):
    """``module`` whose output keeps its value but whose gradient follows ``rule`` (see the module docstring).

    Path names are kept: the wrapped module is ``.module``, so ``RuleLayer`` shows in error messages only.
    """

    def __init__(self, module: nn.Module, rule: Rule) -> None:
        super().__init__()
        if getattr(module, "inplace", False):
            # the rule reads the layer's input after the layer ran: an in-place activation would overwrite it
            module = copy.copy(module)
            setattr(module, "inplace", False)  # noqa: B010 (an attribute of some module types only)
        self.module = module
        self.rule = rule

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():  # no gradient wanted: the layer's value is all there is
            return self.module(x)
        eps = self.rule.stabilizer
        if isinstance(self.rule, Pass) and eps == 0 and shrinks_toward_zero(self.module):
            if isinstance(self.module, nn.ReLU):  # f(x) / x is 1 or 0: the plain gradient is the pass rule
                return self.module(x)
            with torch.no_grad():
                value = self.module(x)
                # |f(x) / x| <= 1, so the only non-finite ratio is 0 / 0 at x == 0, which safe_divide sets to 0
                scale = (value / x).nan_to_num_(0.0)
            return RuleGradient.apply(value, (1.0,), (scale,), x)
        if self.rule.reuses_output and isinstance(self.module, AFFINE_TYPES):
            # the only term is the output itself, whose backward (an affine layer's) saved no output tensor:
            # its storage can be handed on as the value without a copy
            z = self.module(x)
            return RuleGradient.apply(z.detach(), (1.0,), (output_ratio(z, eps),), z)
        with torch.set_grad_enabled(self.rule.reuses_output):
            z = self.module(x)
        terms = self.rule.terms(self.module, x, z)
        # RuleGradient hands on a tensor of the layer's own: not the graph's output z, not the input or a view
        # of it (an identity, flatten or dropout layer given a rule explicitly)
        shares_input = z.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
        value = z.detach().clone() if self.rule.reuses_output or shares_input else z
        coefs = tuple(coef for coef, _ in terms)
        scales = tuple(stabilized_ratio(value, z_k.detach(), eps) for _, z_k in terms)
        return RuleGradient.apply(value, coefs, scales, *(z_k for _, z_k in terms))

    def extra_repr(self) -> str:
        return repr(self.rule)
