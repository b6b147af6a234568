"""The one assessment engine: every method scored by every metric on the same images, with the curves,
sanity checks and agreement behind the numbers, returned as data (an ``Assessment`` record).

``xailab assess`` (``api.assess_run``) and a study's cells (``study.runner.assess_cell``) both call
``assess``; the tables and figures are drawn from the record by ``xailab.report.assessment``. The record is
frozen dataclasses with a versioned JSON form (``Assessment.to_json`` / ``Assessment.from_json``, what
``scores.json`` holds); the maps themselves travel with it as tensors, outside the JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from xailab.config import from_dict
from xailab.errors import ConfigError
from xailab.explain.base import preserved_state, resolve_target
from xailab.io import atomic_write, read_json, tensor_digest, write_json
from xailab.metrics.agreement import agreement_matrix
from xailab.metrics.base import (
    DEFAULT_METRICS,
    METRICS,
    Direction,
    ForwardMode,
    MetricPrecision,
    check_request,
    chunked_explain,
    forward_mode,
    method_explainer,
    score_explanations,
    summarise,
)
from xailab.metrics.faithfulness import removal_curve, trapezoid
from xailab.metrics.randomisation import RandomisationResult, model_randomisation

ASSESSMENT_VERSION = 1
PART_VERSION = 1  # of the per-method parts a resumable assessment keeps (``MethodPart``)
# computed from their curves
CURVE_METRICS: dict[str, Literal["deletion", "insertion"]] = {
    "deletion_auc": "deletion",
    "insertion_auc": "insertion",
}
RANDOMISATION_SEED = 42  # model_randomisation's default seed (Quantus's MPRT)
# The chance level of the quality metrics: the same metrics on maps of uniform noise, seeded with the
# assessment's seed plus this (a map that knows nothing of the model or the image: a method must beat it).
CHANCE_SEED_OFFSET = 7919
CHANCE_LABEL = "chance (random maps)"


@dataclass(frozen=True)
class ScoreRow:
    """One (model, method, metric): the mean of the per-image scores, its seeded 95% bootstrap interval,
    the number of finite scores and whether ``higher`` or ``lower`` is better."""

    model: str
    method: str
    metric: str
    mean: float
    ci_low: float
    ci_high: float
    n: int
    better: Direction


@dataclass(frozen=True)
class SanityCurves:
    """Adebayo et al.'s cascading randomisation of ``method`` on ``images`` images: the randomised layers in
    order and the mean Spearman and SSIM between the original and the randomised maps after each."""

    method: str
    images: int
    layers: tuple[str, ...]
    mean_spearman: tuple[float, ...]
    mean_ssim: tuple[float, ...]


@dataclass(frozen=True)
class Agreement:
    """Mean Spearman correlation and top-``k_fraction`` IoU between every pair of methods' maps."""

    methods: tuple[str, ...]
    spearman: tuple[tuple[float, ...], ...]
    topk_iou: tuple[tuple[float, ...], ...]
    k_fraction: float


@dataclass(frozen=True)
class MetricInfo:
    """Whether ``higher`` or ``lower`` is better, and the first sentence of the metric's docstring."""

    better: Direction
    description: str


@dataclass(frozen=True)
class Assessment:
    """Everything an assessment found (see the module docstring).

    ``per_image``: method -> metric -> one score per image; ``curves``: method -> ``deletion`` /
    ``insertion`` -> the mean curve; ``sanity``: method -> its randomisation curves; ``seconds_per_image``:
    method -> explanation time. ``maps`` (method -> ``[N, 1, H, W]``) and ``sanity_maps`` (method ->
    ``[L + 1, E, 1, H, W]``: the first ``E`` images' maps originally and after each randomised layer) are
    CPU tensors, not part of the JSON form.
    """

    model: str
    methods: tuple[str, ...]
    metrics: tuple[str, ...]
    scores: tuple[ScoreRow, ...]
    per_image: dict[str, dict[str, tuple[float, ...]]]
    curves: dict[str, dict[str, tuple[float, ...]]]
    sanity: dict[str, SanityCurves]
    agreement: Agreement | None
    metric_info: dict[str, MetricInfo]
    seconds_per_image: dict[str, float]
    seed: int
    version: int = ASSESSMENT_VERSION
    method_labels: dict[str, str] = field(default_factory=dict)
    # metric -> {"mean", "ci_low", "ci_high", "n"} of seeded uniform-noise maps (``chance_metrics``), and
    # their mean deletion / insertion curves: the level a method must beat (empty in older records)
    chance: dict[str, dict[str, float]] = field(default_factory=dict)
    chance_curves: dict[str, tuple[float, ...]] = field(default_factory=dict)
    # the images' indices in the split they came from, when the caller sampled them (empty: 0 .. N-1)
    image_ids: tuple[int, ...] = ()
    maps: Mapping[str, Tensor] = field(default_factory=dict, compare=False, repr=False)
    sanity_maps: Mapping[str, Tensor] = field(default_factory=dict, compare=False, repr=False)

    def quality(self) -> dict[str, dict[str, dict[str, float]]]:
        """method -> metric -> ``{"mean", "ci_low", "ci_high", "n"}`` (methods with scores only)."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for row in self.scores:
            out.setdefault(row.method, {})[row.metric] = {
                "mean": row.mean, "ci_low": row.ci_low, "ci_high": row.ci_high, "n": row.n
            }  # fmt: skip
        return out

    def to_json(self) -> dict[str, Any]:
        """The JSON form (``scores.json``): every field but the tensors, tuples as lists."""
        data = dataclasses.asdict(dataclasses.replace(self, maps={}, sanity_maps={}))
        del data["maps"], data["sanity_maps"]
        data["sanity_check"] = data.pop("sanity")  # the key's name in scores.json before the record existed
        return json.loads(json.dumps(data))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Assessment:
        """The record back from ``to_json``'s form, every field checked; another version raises ConfigError."""
        if data.get("version") != ASSESSMENT_VERSION:
            raise ConfigError(
                f"assessment record version {data.get('version')!r} is not {ASSESSMENT_VERSION}; "
                "assess again with this version of xailab"
            )
        fields = {("sanity" if k == "sanity_check" else k): v for k, v in data.items()}
        return from_dict(cls, fields, where="assessment record")


def chance_metrics(metrics: Sequence[str]) -> list[str]:
    """The metrics of ``metrics`` that have a chance level: they score given maps (no re-explaining) against
    the model (perturbed copies: deletion, insertion, faithfulness correlation, ...) or a ground-truth mask
    (localisation). Sparseness and complexity look at the map alone: noise's value says nothing of a method."""
    return [
        m
        for m in metrics
        if not METRICS.get(m).needs_method
        and (METRICS.get(m).scores_copies or METRICS.get(m).accepts("mask"))
    ]


def chance_maps(inputs: Tensor, seed: int) -> Tensor:
    """Uniform noise maps ``[N, 1, H, W]`` for ``inputs`` ``[N, C, H, W]``, seeded (the same on any device)."""
    generator = torch.Generator().manual_seed(seed + CHANCE_SEED_OFFSET)
    n, _c, h, w = inputs.shape
    return torch.rand(n, 1, h, w, generator=generator).to(inputs.device)


def method_label(method: str, params: Mapping[str, Any]) -> str:
    """``method`` with the parameters the user set, for legends: ``lrp (composite=epsilon)`` (an assessment
    of one method under two settings must not read as one curve twice)."""
    if not params:
        return method
    shown = ", ".join(f"{k}={v}" for k, v in sorted(params.items()) if isinstance(v, (str, int, float, bool)))
    return f"{method} ({shown})" if shown else method


def first_sentence(fn: Any) -> str:
    """The first sentence of ``fn``'s docstring, on one line and without reStructuredText backticks."""
    paragraph = (fn.__doc__ or "").strip().split("\n\n")[0]
    text = " ".join(line.strip() for line in paragraph.splitlines()).replace("``", "")
    end = re.search(r"(?<!\bal)(?<!e\.g)(?<!i\.e)\.(\s|$)", text)  # "Petsiuk et al. 2018" is no sentence end
    return text if end is None else text[: end.start() + 1]


def _curve_params(mode: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The ``removal_curve`` arguments for ``mode`` out of the metric parameters."""
    keys = ("n_steps", "segments", "grid", "softmax", "batch_size")
    chosen = {k: params[k] for k in keys if k in params}
    baseline_key = "baseline" if mode == "deletion" else "insertion_baseline"
    chosen["baseline"] = params.get(baseline_key, "zero" if mode == "deletion" else "blur")
    return chosen


@dataclass(frozen=True)
class MethodPart:
    """What the assessment found for one method: its maps ``[N, 1, H, W]``, explanation seconds per image,
    mean removal curves, per-image scores, and (when checked) its sanity curves and maps ``[L + 1, E, 1, H, W]``.
    The unit a killed assessment resumes from (``assess(..., resume_dir=)``)."""

    seconds: float
    curves: dict[str, tuple[float, ...]]
    per_image: dict[str, tuple[float, ...]]
    sanity: SanityCurves | None
    map: Tensor
    sanity_maps: Tensor | None


def _part_key(request: Mapping[str, Any]) -> str:
    """The key of one method's part: everything that decides its numbers (tensors by digest)."""

    def encode(o: Any) -> Any:
        return tensor_digest(o) if isinstance(o, Tensor) else repr(o)

    blob = json.dumps({"version": PART_VERSION, **request}, sort_keys=True, default=encode)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _part_paths(folder: Path, method: str) -> tuple[Path, Path]:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", method)
    return folder / f"{safe}.json", folder / f"{safe}.safetensors"


def save_part(folder: Path, method: str, key: str, part: MethodPart) -> None:
    """Write ``part`` atomically: its tensors, then the JSON that marks it complete (keyed by ``key``)."""
    meta, tensors = _part_paths(folder, method)
    blobs = {"map": part.map.contiguous()}
    if part.sanity_maps is not None:
        blobs["sanity_maps"] = part.sanity_maps.contiguous()
    atomic_write(tensors, lambda p: save_file(blobs, str(p)))
    write_json(
        meta,
        {
            "version": PART_VERSION,
            "method": method,
            "key": key,
            "seconds": part.seconds,
            "curves": part.curves,
            "per_image": part.per_image,
            "sanity": dataclasses.asdict(part.sanity) if part.sanity is not None else None,
        },
    )


def load_part(folder: Path, method: str, key: str) -> MethodPart | None:
    """The part ``save_part`` wrote for ``method`` under ``key``, or None when there is none, it was written
    for another request, or it cannot be read (then it is computed again)."""
    meta, tensors = _part_paths(folder, method)
    try:
        d = read_json(meta)
        if d.get("key") != key or d.get("version") != PART_VERSION or d.get("method") != method:
            return None
        blobs = load_file(str(tensors))
        sanity = from_dict(SanityCurves, d["sanity"], where=str(meta)) if d["sanity"] is not None else None
        return MethodPart(
            seconds=float(d["seconds"]),
            curves={k: tuple(v) for k, v in d["curves"].items()},
            per_image={k: tuple(float(x) for x in v) for k, v in d["per_image"].items()},
            sanity=sanity,
            map=blobs["map"],
            sanity_maps=blobs.get("sanity_maps"),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ConfigError, SafetensorError):
        return None


def finished_parts(folder: str | Path) -> list[str]:
    """The methods (their own names, e.g. ``captum:Saliency``) whose parts a killed assessment left in
    ``folder``, sorted; unreadable files are skipped. Whether each part is used is decided by its key."""
    methods = []
    for meta in Path(folder).glob("*.json") if Path(folder).is_dir() else ():
        try:
            method = read_json(meta).get("method")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(method, str):
            methods.append(method)
    return sorted(methods)


def remove_parts(folder: str | Path) -> None:
    """Delete a resumable assessment's parts once its record is written."""
    shutil.rmtree(folder, ignore_errors=True)


def _sanity_curves(method: str, result: RandomisationResult) -> SanityCurves:
    return SanityCurves(
        method,
        int(result.spearman.shape[1]),
        tuple(result.layers),
        tuple(result.mean_spearman.tolist()),
        tuple(result.mean_ssim.tolist()),
    )


def assess(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor | int | None,
    methods: Sequence[str],
    metrics: Sequence[str] = (*DEFAULT_METRICS, "model_randomisation"),
    *,
    model_name: str = "model",
    method_params: Mapping[str, Mapping[str, Any]] | None = None,
    metric_params: Mapping[str, Any] | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    sanity_methods: Sequence[str] | None = None,
    sanity_images: int | None = None,
    sanity_seed: int = RANDOMISATION_SEED,
    n_examples: int = 4,
    agreement: bool | None = None,
    precision: MetricPrecision = "fp32",
    resume_dir: str | Path | None = None,
    with_chance: bool = True,
) -> Assessment:
    """Assess ``methods`` on ``inputs`` ``[N, C, H, W]`` (normalised as the model expects) for ``targets``
    ``[N]`` (None: the predicted classes) by ``metrics``; the record of what was found.

    ``method_params``: method -> its parameters (validated before anything runs); ``metric_params`` go to
    every metric that takes them (a name no chosen metric takes is a ConfigError). Maps are explained
    ``batch_size`` images at a time. ``deletion_auc`` / ``insertion_auc`` keep their mean curves.
    ``sanity_methods`` get the cascading randomisation check on the first ``sanity_images`` images (default:
    every method on every image when ``model_randomisation`` is a metric, whose scores then come from the
    same run), seeded with ``sanity_seed``, keeping ``n_examples`` images' maps. ``agreement`` between the
    methods' maps is computed when True (None: with two methods or more). ``precision``: of the metrics'
    forward passes of perturbed copies (``fp32`` exact; ``auto`` the fast mode; see ``xailab.metrics.base``).
    ``resume_dir``: a folder where each method's finished part is kept (``save_part``: tensors + JSON, written
    atomically, keyed by the model's weights, the inputs, targets and every setting that decides the part); a
    later call with the same request reads those parts instead of computing them, so a killed assessment
    restarts at the method it was on. The caller removes the folder once its record is written
    (``remove_parts``). ``with_chance``: also score seeded uniform-noise maps by the metrics that have a
    chance level (``chance_metrics``: deletion, insertion, faithfulness correlation, localisation...), the
    level a method has to beat (``Assessment.chance``); a method no better than noise on a model and data
    says little about them, whatever its rank among the methods.
    """
    method_params = dict(method_params or {})
    metric_params = dict(metric_params or {})
    explainers = {m: method_explainer(m, **method_params.get(m, {})) for m in methods}
    check_request(metrics, metric_params, can_explain=True)
    if sanity_methods is None:
        sanity_methods = list(methods) if "model_randomisation" in metrics else []
    device = next(model.parameters()).device
    inputs = inputs.to(device=device, dtype=torch.float32)
    with preserved_state(model):
        target_t = resolve_target(model, inputs, targets)
    k = inputs.shape[0] if sanity_images is None else min(sanity_images, inputs.shape[0])
    other = [m for m in metrics if m not in CURVE_METRICS]
    maps: dict[str, Tensor] = {}
    seconds: dict[str, float] = {}
    per_image: dict[str, dict[str, tuple[float, ...]]] = {}
    curves: dict[str, dict[str, tuple[float, ...]]] = {}
    sanity: dict[str, SanityCurves] = {}
    sanity_maps: dict[str, Tensor] = {}
    fast: ForwardMode | None = None  # how the removal curves run their forward passes

    def curve_scores(
        attributions: Tensor, names: Sequence[str]
    ) -> tuple[dict[str, Tensor], dict[str, tuple[float, ...]]]:
        """The removal-curve metrics among ``names`` of ``attributions``, and their mean curves."""
        nonlocal fast
        scores: dict[str, Tensor] = {}
        mean_curves: dict[str, tuple[float, ...]] = {}
        for name, mode in CURVE_METRICS.items():
            if name in names:
                fast = fast or forward_mode(model, inputs, precision)  # resolved once
                curve_kwargs = {"batch_size": fast.chunk, **_curve_params(mode, metric_params)}
                with preserved_state(model), fast.applied(model):
                    curve = removal_curve(model, inputs, target_t, attributions, mode, **curve_kwargs)
                scores[name] = trapezoid(curve, 1.0 / (curve.shape[1] - 1)).float().cpu()
                mean_curves[mode] = tuple(curve.mean(0).tolist())
        return scores, mean_curves

    def other_scores(attributions: Tensor, names: Sequence[str], explain_fn: Any | None) -> dict[str, Tensor]:
        """The other metrics among ``names`` (by ``score_explanations``, with the metric parameters they take)."""
        if not names:
            return {}
        kwargs = {p: v for p, v in metric_params.items() if any(METRICS.get(m).accepts(p) for m in names)}
        with preserved_state(model):
            return score_explanations(
                model, inputs, target_t, attributions, names, explain_fn, seed, precision, **kwargs
            )

    def run_method(method: str) -> MethodPart:
        explain_fn = explainers[method]
        start = time.perf_counter()
        with preserved_state(model):
            attributions = chunked_explain(explain_fn, model, inputs, target_t, batch_size)
        spent = (time.perf_counter() - start) / inputs.shape[0]
        scores, mean_curves = curve_scores(attributions, metrics)
        checked, checked_maps = None, None
        if method in sanity_methods:
            result = model_randomisation(
                model, inputs[:k], target_t[:k], explain_fn=explain_fn, attributions=attributions[:k],
                order=metric_params.get("order", "top_down"), batch_size=batch_size,
                n_examples=n_examples, seed=sanity_seed,
            )  # fmt: skip
            checked, checked_maps = _sanity_curves(method, result), result.maps
            if k == inputs.shape[0] and sanity_seed == RANDOMISATION_SEED:  # the metric's own run
                scores["model_randomisation"] = result.spearman.nanmean(0)
        scores.update(other_scores(attributions, [m for m in other if m not in scores], explain_fn))
        return MethodPart(
            spent,
            mean_curves,
            {m: tuple(scores[m].tolist()) for m in metrics},
            checked,
            attributions.cpu(),
            checked_maps,
        )

    parts_dir = Path(resume_dir) if resume_dir is not None else None
    common: dict[str, Any] = {}
    if parts_dir is not None:
        with torch.no_grad():
            weights = tensor_digest(*model.state_dict().values())
        common = dict(
            weights=weights, inputs=tensor_digest(inputs), targets=tensor_digest(target_t), metrics=list(metrics),
            metric_params=metric_params, seed=seed, sanity_images=k, sanity_seed=sanity_seed,
            n_examples=n_examples, precision=precision,
        )  # fmt: skip
    for method in methods:
        part, key = None, ""
        if parts_dir is not None:
            request = {**common, "method": method, "params": method_params.get(method, {})}
            key = _part_key({**request, "sanity": method in sanity_methods})
            part = load_part(parts_dir, method, key)
        if part is None:
            part = run_method(method)
            if parts_dir is not None:
                save_part(parts_dir, method, key, part)
        seconds[method], maps[method], curves[method] = part.seconds, part.map, part.curves
        per_image[method] = part.per_image
        if part.sanity is not None and part.sanity_maps is not None:
            sanity[method], sanity_maps[method] = part.sanity, part.sanity_maps
    chance: dict[str, dict[str, float]] = {}
    chance_curves: dict[str, tuple[float, ...]] = {}
    if with_chance and chance_metrics(metrics):
        noise = chance_maps(inputs, seed)  # cheap beside any method: no explaining, one set of metric passes
        names = chance_metrics(metrics)
        scores, chance_curves = curve_scores(noise, names)
        scores.update(other_scores(noise, [m for m in names if m not in scores], None))
        chance = summarise(scores, seed=seed)
    rows = tuple(
        ScoreRow(model_name, method, metric, **stats, better=METRICS.get(metric).better)
        for method in methods
        for metric, stats in summarise(
            {m: torch.tensor(v) for m, v in per_image[method].items()}, seed=seed
        ).items()
    )
    return Assessment(
        model=model_name,
        methods=tuple(methods),
        metrics=tuple(metrics),
        scores=rows,
        per_image=per_image,
        curves=curves,
        sanity=sanity,
        agreement=_agreement(maps) if (len(maps) > 1 if agreement is None else agreement) else None,
        metric_info={
            m: MetricInfo(METRICS.get(m).better, first_sentence(METRICS.get(m).fn)) for m in metrics
        },
        seconds_per_image=seconds,
        seed=seed,
        method_labels={m: method_label(m, method_params.get(m, {})) for m in methods},
        chance=chance,
        chance_curves=chance_curves,
        maps=maps,
        sanity_maps=sanity_maps,
    )


def _agreement(maps: Mapping[str, Tensor]) -> Agreement:
    found = agreement_matrix(maps)
    return Agreement(
        tuple(found["methods"]),
        tuple(tuple(r) for r in found["spearman"].tolist()),
        tuple(tuple(r) for r in found["topk_iou"].tolist()),
        found["k_fraction"],
    )
