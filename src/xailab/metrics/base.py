"""The metric contract: ``fn(model, inputs[B, C, H, W], targets[B], attributions[B, 1, H, W], **params) ->
Tensor[B]`` (one score per image), registered in ``METRICS``; ``evaluate_explanations`` runs several of them
on one batch and ``summarise`` turns per-image scores into a mean with a seeded 95% bootstrap interval.

Metrics that re-explain (sensitivity, randomisation, random logit) receive ``explain_fn(model, inputs,
targets) -> [B, 1, H, W]``, built by ``evaluate_explanations`` from the ``method`` name.

Precision: metrics are exact (fp32) by default. ``precision="auto"`` is the fast mode of the metrics that
score perturbed copies (faithfulness metrics): their forward passes run under bf16 autocast only where
``xailab.autotune`` measured bf16 faster for this model, input shape and device (and its accuracy guard
held), in chunks of the size measured fastest at that precision (``forward_mode``); ``precision="bf16"``
forces it. Targets are always chosen in fp32, and explanations (also those a metric re-computes) run at the
precision of ``method_params``. On a test model, fast-mode values stay within ``FAST_MODE_TOLERANCE`` of the
exact ones (``tests/test_metrics_fast_mode.py``).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from xailab import autotune
from xailab.errors import ConfigError
from xailab.explain.base import (
    autocast_forward,
    explain,
    preserved_state,
    resolve_target,
    validate_method_params,
)
from xailab.explain.batching import chunk_size, map_chunks, scores_from_logits
from xailab.registry import Registry

ExplainFn = Callable[[nn.Module, Tensor, Tensor], Tensor]
Direction = Literal["higher", "lower", "none"]

DEFAULT_METRICS = ("deletion_auc", "insertion_auc", "faithfulness_correlation", "sparseness", "complexity")
MetricPrecision = Literal["fp32", "bf16", "auto"]
# How far fast-mode (bf16) values may lie from exact ones, per metric, as (atol, rtol) of
# ``torch.testing.assert_close``: |fast - exact| <= atol + rtol * |exact| per image. Checked on the tests'
# calibrated tiny CNN (``tests/test_metrics_fast_mode.py``), whose largest deviations over ten seeded
# models were 3-10x smaller.
# bf16 keeps 8 significant bits: probabilities and their areas move by ~1e-3; a correlation of small score
# changes moves more; ROAD's accuracy may flip for a copy at a near-tie (0.1: one percentage in ten).
FAST_MODE_TOLERANCE: dict[str, tuple[float, float]] = {
    "deletion_auc": (0.005, 0.01),
    "insertion_auc": (0.005, 0.01),
    "pixel_flipping": (0.05, 0.02),
    "faithfulness_correlation": (0.1, 0.0),
    "road": (0.1, 0.0),
    "infidelity": (0.02, 0.05),
}


@dataclass(frozen=True)
class MetricSpec:
    """A registered metric.

    ``needs_method``: it re-explains (perturbed inputs, randomised models, other classes), so it needs an
    explanation method, not only attributions. ``better``: whether a ``higher`` or ``lower`` score means a
    better explanation (``none`` when it is a property, e.g. sparseness, rather than a quality).
    """

    name: str
    fn: Callable[..., Tensor]
    needs_method: bool
    better: Direction
    description: str = ""

    def accepts(self, param: str) -> bool:
        """Whether the metric's function takes the keyword ``param``."""
        return param in inspect.signature(self.fn).parameters

    @property
    def scores_copies(self) -> bool:
        """Whether the metric scores perturbed copies by forward passes (chunked by ``batch_size``) without
        re-explaining: the metrics a fast mode (``forward_mode``) applies to."""
        return not self.needs_method and self.accepts("batch_size")


@dataclass(frozen=True)
class ForwardMode:
    """How a metric runs its forward passes of perturbed copies: at ``precision`` (bf16: under autocast,
    logits returned as float32) in chunks of ``chunk`` images (None: autotuning off, the metric keeps its
    fixed rule)."""

    precision: autotune.Precision
    chunk: int | None

    def applied(self, model: nn.Module) -> AbstractContextManager[Any]:
        """A context running ``model``'s forward at this precision for the block."""
        if self.precision == "bf16":
            return autocast_forward(model, torch.bfloat16)
        return contextlib.nullcontext(model)


def forward_mode(model: nn.Module, inputs: Tensor, precision: MetricPrecision = "fp32") -> ForwardMode:
    """The precision and chunk size of a metric's forward passes of copies of ``inputs`` ``[B, C, H, W]``
    through ``model``: ``fp32`` (exact, the default) or ``bf16`` as given; ``auto`` (the fast mode) bf16
    only where ``xailab.autotune`` measured it faster here (``autotune.metric_precision``). The chunk is the
    one measured fastest at that precision (``autotune.chunk_size``)."""
    resolved = autotune.metric_precision(model, inputs, precision)
    return ForwardMode(resolved, autotune.chunk_size(model, inputs, grad=False, precision=resolved))


METRICS: Registry[MetricSpec] = Registry("metric")


def register_metric(name: str, better: Direction, needs_method: bool = False, description: str = ""):
    """Decorator registering ``fn(model, inputs, targets, attributions, **params) -> Tensor[B]`` as ``name``."""

    def add(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        doc = description or (fn.__doc__ or "").strip().split("\n")[0]
        METRICS.register(name)(MetricSpec(name, fn, needs_method, better, doc))
        return fn

    return add


def list_metrics() -> list[str]:
    """Names of every registered explanation-quality metric."""
    return METRICS.names()


def method_explainer(method: str, /, **method_params: Any) -> ExplainFn:
    """``explain_fn(model, inputs, targets) -> [B, 1, H, W]`` running ``xailab.explain`` with ``method``
    (its parameters validated now, before any metric runs)."""
    method_params = validate_method_params(method, method_params)

    def explain_fn(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
        return explain(model, inputs, method, targets, **method_params)

    return explain_fn


def chunked_explain(
    explain_fn: ExplainFn, model: nn.Module, inputs: Tensor, targets: Tensor, batch_size: int | None = None
) -> Tensor:
    """``explain_fn`` over ``inputs`` ``[N, C, H, W]`` in chunks of ``batch_size`` images (default:
    ``default_batch_size``): ``[N, 1, H, W]``."""
    chunk = chunk_size(inputs, batch_size, grad=True, model=model)
    return map_chunks(
        lambda idx: explain_fn(model, inputs[idx], targets[idx]), inputs.shape[0], chunk, inputs.device
    )


def check_attributions(inputs: Tensor, attributions: Tensor) -> Tensor:
    """``attributions`` as float ``[B, 1, H, W]`` on the inputs' device, or a ConfigError naming the shapes."""
    b, _, h, w = inputs.shape
    if attributions.ndim == 3:
        attributions = attributions[:, None]
    if attributions.ndim != 4 or attributions.shape[0] != b or attributions.shape[-2:] != (h, w):
        raise ConfigError(
            f"attributions have shape {tuple(attributions.shape)} for inputs {tuple(inputs.shape)}; give one "
            f"[1, H, W] map per image, i.e. [{b}, 1, {h}, {w}]"
        )
    if attributions.shape[1] != 1:
        attributions = attributions.sum(1, keepdim=True)  # per-channel maps: sum, as xailab.explain does
    return attributions.to(device=inputs.device, dtype=torch.float32)


def check_request(metrics: Sequence[str], params: dict, can_explain: bool) -> list[MetricSpec]:
    """The specs of ``metrics``; a ConfigError when one needs a method and none is given, or when a
    parameter is taken by no chosen metric (a typo would otherwise be silently ignored)."""
    specs = [METRICS.get(name) for name in metrics]
    needing = [s.name for s in specs if s.needs_method]
    if needing and not can_explain:
        raise ConfigError(
            f"metrics {', '.join(needing)} re-explain perturbed inputs or models, so they need method=<name> "
            "instead of precomputed attributions"
        )
    unused = [p for p in params if not any(s.accepts(p) for s in specs)]
    if unused:
        raise ConfigError(
            f"no chosen metric takes the parameter(s) {', '.join(unused)}; chosen: {', '.join(metrics)}"
        )
    return specs


def evaluate_explanations(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor | int | None,
    attributions: Tensor | None = None,
    method: str | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    seed: int = 0,
    method_params: dict | None = None,
    precision: MetricPrecision = "fp32",
    **params,
) -> dict[str, Tensor]:
    """Scores of the explanations of ``model`` for ``inputs`` ``[B, C, H, W]`` (normalised as the model
    expects) and ``targets`` ``[B]`` (None: the predicted classes) by each metric in ``metrics``.

    Give exactly one of ``attributions`` ``[B, 1, H, W]`` (maps computed elsewhere) or ``method`` (a name of
    ``xailab.list_methods()``, run with ``method_params``). Metrics that re-explain need ``method``.
    ``params`` go to every metric that takes them (e.g. ``batch_size``, ``baseline``); a name no chosen
    metric takes raises a ConfigError. ``precision``: of the forward passes of metrics that score perturbed
    copies: ``fp32`` (exact), ``auto`` (fast mode: bf16 where measured faster) or ``bf16`` (see the module
    docstring); the targets are chosen and the maps computed first, at fp32 and ``method_params``'s
    precision. Returns metric -> float ``[B]`` on the CPU; the model's modes and ``requires_grad`` flags are
    restored afterwards.
    """
    if (attributions is None) == (method is None):
        raise ConfigError("give exactly one of attributions=[B, 1, H, W] maps or method=<name> (not both)")
    if inputs.ndim != 4:
        raise ConfigError(f"inputs must be [B, C, H, W], got shape {tuple(inputs.shape)}")
    check_request(metrics, params, can_explain=method is not None)
    device = next(model.parameters()).device
    inputs = inputs.to(device=device, dtype=torch.float32)
    explain_fn = method_explainer(method, **(method_params or {})) if method is not None else None
    with preserved_state(model):
        target_t = resolve_target(model, inputs, targets)
        if attributions is None:
            assert explain_fn is not None
            attributions = explain_fn(model, inputs, target_t)
        return score_explanations(
            model, inputs, target_t, attributions, metrics, explain_fn, seed, precision, **params
        )


def score_explanations(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    attributions: Tensor,
    metrics: Sequence[str],
    explain_fn: ExplainFn | None = None,
    seed: int = 0,
    precision: MetricPrecision = "fp32",
    **params,
) -> dict[str, Tensor]:
    """The core of ``evaluate_explanations`` for callers that already hold the maps ``[B, 1, H, W]``, the
    ``[B]`` long targets on the model's device and (for metrics that re-explain) ``explain_fn``.

    ``params`` go to every metric that takes them; a name no metric takes raises a ConfigError. Metrics
    that score perturbed copies run their forward passes as ``forward_mode(model, inputs, precision)``
    says, in its chunks unless ``batch_size`` is given. Returns metric -> float ``[B]`` on the CPU.
    """
    specs = check_request(metrics, params, can_explain=explain_fn is not None)
    attributions = check_attributions(inputs, attributions)
    # Resolved once, and only when some metric runs the model on copies (sparseness alone measures nothing).
    mode = forward_mode(model, inputs, precision) if any(s.scores_copies for s in specs) else None
    scores = {}
    for spec in specs:
        kwargs = {k: v for k, v in params.items() if spec.accepts(k)}
        if spec.accepts("seed"):
            kwargs["seed"] = seed
        if spec.needs_method:
            kwargs["explain_fn"] = explain_fn
        # Never around a re-explaining metric: its explanations run at their own precision, and copies of
        # the model (randomisation) must not inherit a swapped forward.
        fast = mode if mode is not None and spec.scores_copies else None
        if fast is not None and fast.chunk is not None and kwargs.get("batch_size") is None:
            kwargs["batch_size"] = fast.chunk  # an explicit batch_size wins
        with fast.applied(model) if fast is not None else contextlib.nullcontext():
            scores[spec.name] = spec.fn(model, inputs, targets, attributions, **kwargs).detach().float().cpu()
    return scores


def summarise(
    scores: dict[str, Tensor], n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> dict[str, dict]:
    """Mean and percentile bootstrap confidence interval of each metric's per-image scores ``[B]``.

    Returns metric -> ``{"mean", "ci_low", "ci_high", "n"}`` (``n``: the finite scores used; NaN scores,
    e.g. a correlation of a constant map, are left out). The resampling is seeded, so it repeats exactly.
    """
    generator = torch.Generator().manual_seed(seed)
    alpha = (1.0 - level) / 2
    summary = {}
    for name, values in scores.items():
        v = values.detach().double().cpu().flatten()
        v = v[torch.isfinite(v)]
        n = int(v.numel())
        if n == 0:
            summary[name] = {"mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
            continue
        idx = torch.randint(0, n, (n_boot, n), generator=generator)
        means = v[idx].mean(1)
        low, high = torch.quantile(means, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
        summary[name] = {"mean": float(v.mean()), "ci_low": low, "ci_high": high, "n": n}
    return summary


# ---------------------------------------------------------------------------------------------------------
# Small tensor helpers shared by the metric modules
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def target_scores(model: nn.Module, inputs: Tensor, targets: Tensor, softmax: bool = False) -> Tensor:
    """The ``targets`` logits (probabilities with ``softmax``) of ``inputs`` ``[B, C, H, W]``: ``[B]``."""
    return scores_from_logits(model(inputs), targets, "softmax" if softmax else "logit")


def descending_order(values: Tensor) -> Tensor:
    """Indices of each row of ``values`` (``[B, N]``, or maps ``[B, 1, H, W]`` flattened) from the highest
    value down: ``[B, N]``.

    Ties are ordered as ``numpy.argsort(-values)`` of the float32 values orders them (numpy's default,
    unstable introsort), the order of Quantus's pixel flipping and ROAD, so curves equal Quantus's also on
    maps with ties (a Grad-CAM map's ReLU zeros, flat borders). That order depends on the values only, so it
    is repeatable; it costs one copy of the maps to the host.
    """
    flat = values.flatten(1).detach().float().cpu().numpy()
    return torch.from_numpy(np.argsort(-flat, axis=1)).to(values.device)


def average_ranks(values: Tensor) -> Tensor:
    """Ranks ``1..N`` of each row of ``values`` ``[B, N]``, ties given their average rank (as scipy)."""
    ordered = values.sort(dim=1).values
    below = torch.searchsorted(ordered, values.contiguous(), right=False)
    up_to = torch.searchsorted(ordered, values.contiguous(), right=True)
    return (below + up_to + 1).double() / 2


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of the rows of ``a`` and ``b`` ``[B, N]`` in float64: ``[B]`` (NaN for a
    constant row, as scipy)."""
    a = a.double() - a.double().mean(1, keepdim=True)
    b = b.double() - b.double().mean(1, keepdim=True)
    denom = a.norm(dim=1) * b.norm(dim=1)
    r = (a * b).sum(1) / denom
    return torch.where(denom > 0, r.clamp(-1, 1), torch.full_like(r, float("nan")))


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of the rows of ``a`` and ``b`` ``[B, N]`` (ties averaged): ``[B]``."""
    return pearson(average_ranks(a.flatten(1)), average_ranks(b.flatten(1)))
