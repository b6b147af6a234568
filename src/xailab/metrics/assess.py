"""Assessing the explanations of one model: every method scored by every metric on the same images, with the
curves and figures behind the numbers.

``assess_explanations`` works on a model and a batch of inputs; ``xailab.api.assess_run`` feeds it a run's
test images. Outputs in ``out_dir``:

- ``scores.csv`` / ``scores.json``: per (model, method, metric) the mean, 95% bootstrap CI, number of images
  and whether higher or lower is better; ``scores.json`` also has the sanity-check curves per layer, the
  mean deletion/insertion curves and the agreement matrix;
- ``per_image.csv``: every image's score for every method and metric;
- ``deletion_insertion.png``, ``sanity_check.png`` (Spearman and SSIM per randomised layer),
  ``sanity_maps_<method>.png`` (the example images' maps after each randomisation stage) and
  ``agreement.png`` (Spearman and top-k IoU between methods).

Figures are ``matplotlib.figure.Figure`` objects without pyplot, as ``xailab.explain.figures``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from xailab.explain.base import preserved_state, resolve_target
from xailab.explain.figures import normalise_map, save_figure
from xailab.io import write_json, write_text
from xailab.metrics.agreement import agreement_matrix
from xailab.metrics.base import (
    DEFAULT_METRICS,
    METRICS,
    check_request,
    chunked_explain,
    method_explainer,
    score_explanations,
    summarise,
)
from xailab.metrics.faithfulness import removal_curve, trapezoid
from xailab.metrics.randomisation import RandomisationResult, model_randomisation

CURVE_METRICS = {"deletion_auc": "deletion", "insertion_auc": "insertion"}  # computed from their curves


def _curve_params(mode: str, params: dict) -> dict:
    """The ``removal_curve`` arguments for ``mode`` out of the metric parameters."""
    keys = ("n_steps", "segments", "grid", "softmax", "batch_size")
    chosen = {k: params[k] for k in keys if k in params}
    baseline_key = "baseline" if mode == "deletion" else "insertion_baseline"
    chosen["baseline"] = params.get(baseline_key, "zero" if mode == "deletion" else "blur")
    return chosen


def assess_explanations(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor | None,
    methods: Sequence[str],
    out_dir: str | Path,
    metrics: Sequence[str] = (*DEFAULT_METRICS, "model_randomisation"),
    model_name: str = "model",
    batch_size: int = 64,
    seed: int = 0,
    method_params: dict[str, dict] | None = None,
    n_examples: int = 4,
    **params,
) -> dict:
    """Score ``methods`` on ``inputs`` ``[N, C, H, W]`` (normalised as the model expects) for ``targets``
    ``[N]`` (None: the predicted classes) by ``metrics`` and write tables and figures to ``out_dir`` (see
    the module docstring). ``model_randomisation`` also draws the sanity-check curves and example maps;
    ``deletion_auc`` / ``insertion_auc`` also draw their curves. Returns what ``scores.json`` holds.
    """
    out = Path(out_dir)
    method_params = method_params or {}
    check_request(metrics, params, can_explain=True)
    other = [m for m in metrics if m not in CURVE_METRICS and m != "model_randomisation"]
    device = next(model.parameters()).device
    inputs = inputs.to(device=device, dtype=torch.float32)
    with preserved_state(model):
        target_t = resolve_target(model, inputs, targets)
    per_image: dict[str, dict[str, Tensor]] = {}
    curves: dict[str, dict[str, list[float]]] = {}
    sanity: dict[str, RandomisationResult] = {}
    maps: dict[str, Tensor] = {}
    for method in methods:
        explain_fn = method_explainer(method, **method_params.get(method, {}))
        with preserved_state(model):
            attributions = chunked_explain(explain_fn, model, inputs, target_t, batch_size)
        maps[method] = attributions.cpu()
        scores: dict[str, Tensor] = {}
        curves[method] = {}
        for name, mode in CURVE_METRICS.items():
            if name in metrics:
                kwargs = _curve_params(mode, params)
                with preserved_state(model):
                    curve = removal_curve(model, inputs, target_t, attributions, mode, **kwargs)
                scores[name] = trapezoid(curve, 1.0 / (curve.shape[1] - 1)).float().cpu()
                curves[method][mode] = curve.mean(0).tolist()
        if other:
            kwargs = {k: v for k, v in params.items() if any(METRICS.get(m).accepts(k) for m in other)}
            with preserved_state(model):
                scores.update(
                    score_explanations(
                        model, inputs, target_t, attributions, other, explain_fn, seed, **kwargs
                    )
                )
        if "model_randomisation" in metrics:
            result = model_randomisation(
                model,
                inputs,
                target_t,
                explain_fn=explain_fn,
                attributions=attributions,
                order=params.get("order", "top_down"),
                batch_size=batch_size,
                n_examples=n_examples,
            )
            sanity[method] = result
            scores["model_randomisation"] = result.spearman.nanmean(0)
        per_image[method] = {m: scores[m] for m in metrics}
    agreement = agreement_matrix(maps) if len(maps) > 1 else None
    report = build_report(model_name, per_image, curves, sanity, agreement, seed)
    write_tables(out, model_name, per_image, report)
    write_figures(out, curves, sanity, agreement)
    return report


def build_report(
    model_name: str,
    per_image: dict[str, dict[str, Tensor]],
    curves: dict[str, dict[str, list[float]]],
    sanity: dict[str, RandomisationResult],
    agreement: dict | None,
    seed: int,
) -> dict:
    """The JSON-ready summary written to ``scores.json``."""
    rows = []
    for method, scores in per_image.items():
        for metric, stats in summarise(scores, seed=seed).items():
            rows.append(
                {"model": model_name, "method": method, "metric": metric, **stats,
                 "better": METRICS.get(metric).better}
            )  # fmt: skip
    return {
        "model": model_name,
        "scores": rows,
        "curves": curves,
        "sanity_check": {m: r.as_dict() for m, r in sanity.items()},
        "agreement": None
        if agreement is None
        else {
            "methods": agreement["methods"],
            "spearman": agreement["spearman"].tolist(),
            "topk_iou": agreement["topk_iou"].tolist(),
            "k_fraction": agreement["k_fraction"],
        },
    }


def write_tables(out: Path, model_name: str, per_image: dict[str, dict[str, Tensor]], report: dict) -> None:
    """``scores.csv``, ``scores.json`` and ``per_image.csv`` (atomic writes)."""
    buf = io.StringIO()
    fields = ["model", "method", "metric", "mean", "ci_low", "ci_high", "n", "better"]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for row in report["scores"]:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    write_text(out / "scores.csv", buf.getvalue())
    write_json(out / "scores.json", report)
    buf = io.StringIO()
    writer_rows = csv.writer(buf)
    metric_names = sorted({m for scores in per_image.values() for m in scores})
    writer_rows.writerow(["model", "method", "image", *metric_names])
    for method, scores in per_image.items():
        n = len(next(iter(scores.values()))) if scores else 0
        for i in range(n):
            values = [f"{float(scores[m][i]):.6g}" if m in scores else "" for m in metric_names]
            writer_rows.writerow([model_name, method, i, *values])
    write_text(out / "per_image.csv", buf.getvalue())


# ---------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------


def curves_figure(curves: dict[str, dict[str, list[float]]]) -> Figure:
    """Mean deletion and insertion curves of every method (target probability vs fraction of pixels)."""
    modes = [m for m in ("deletion", "insertion") if any(m in c for c in curves.values())]
    fig = Figure(figsize=(5.0 * max(1, len(modes)), 3.6))
    axes = fig.subplots(1, max(1, len(modes)), squeeze=False)[0]
    for ax, mode in zip(axes, modes, strict=False):
        for method, by_mode in curves.items():
            if mode in by_mode:
                y = np.asarray(by_mode[mode])
                ax.plot(np.linspace(0, 1, len(y)), y, label=method)
        ax.set_xlabel(f"fraction of pixels {'removed' if mode == 'deletion' else 'inserted'}")
        ax.set_ylabel("target score")
        ax.set_title(f"{mode} (mean over images)", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def sanity_figure(sanity: dict[str, RandomisationResult]) -> Figure:
    """Mean Spearman and SSIM between original and randomised maps after each layer, per method."""
    fig = Figure(figsize=(11.0, 4.0))
    axes = fig.subplots(1, 2)
    for ax, key in zip(axes, ("mean_spearman", "mean_ssim"), strict=True):
        lowest = -0.2
        for method, result in sanity.items():
            values = [1.0, *getattr(result, key).tolist()]
            ax.plot(range(len(values)), values, marker="o", label=method)
            lowest = min(lowest, min(values) - 0.05)
        layers = next(iter(sanity.values())).layers
        names = ["original", *layers]
        step = -(-len(names) // 24)  # deep models (resnet18: 41 layers) get every k-th name, readable
        ax.set_xticks(range(len(names)), [n if i % step == 0 else "" for i, n in enumerate(names)])
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
        ax.set_ylim(lowest, 1.05)  # anti-correlated maps (below -0.2) must stay visible
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_ylabel("Spearman (|maps|)" if key == "mean_spearman" else "SSIM")
        ax.set_title("cascading randomisation, top layer first", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def sanity_maps_figure(method: str, result: RandomisationResult) -> Figure:
    """The example images' maps (rows) originally and after each randomisation stage (columns), tiled into
    one image (one axes instead of one per map keeps drawing fast for deep models)."""
    stages, n = result.maps.shape[:2]
    h, w = result.maps.shape[-2:]
    gap = max(1, h // 8)
    tiles = np.full((n * (h + gap) - gap, stages * (w + gap) - gap), np.nan)
    for i in range(n):
        for j in range(stages):
            tiles[i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = normalise_map(
                result.maps[j, i]
            ).numpy()
    fig = Figure(figsize=(min(18.0, 0.9 * stages + 1.0), 0.9 * max(1, n) + 1.4))
    ax = fig.subplots()
    ax.imshow(np.ma.masked_invalid(tiles), cmap="jet", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([j * (w + gap) + w / 2 for j in range(stages)], ["original", *result.layers], rotation=60)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_yticks([])
    ax.set_title(f"{method}: maps as layers are randomised (top layer first)", fontsize=9)
    fig.tight_layout()
    return fig


def agreement_figure(agreement: dict) -> Figure:
    """Heatmaps of the Spearman correlation and top-k IoU between methods."""
    names = agreement["methods"]
    fig = Figure(figsize=(4.5 + 0.5 * len(names), 2.6 + 0.25 * len(names)))
    axes = fig.subplots(1, 2)
    for ax, key in zip(axes, ("spearman", "topk_iou"), strict=True):
        matrix = agreement[key].numpy()
        im = ax.imshow(matrix, vmin=-1 if key == "spearman" else 0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=6, color="white")
        title = "Spearman (|maps|)" if key == "spearman" else f"top-{agreement['k_fraction']:.0%} IoU"
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def write_figures(
    out: Path,
    curves: dict[str, dict[str, list[float]]],
    sanity: dict[str, RandomisationResult],
    agreement: dict | None,
) -> None:
    """The PNG figures described in the module docstring (only those whose data was computed)."""
    if any(curves.values()):
        save_figure(curves_figure(curves), out / "deletion_insertion.png")
    if sanity:
        save_figure(sanity_figure(sanity), out / "sanity_check.png")
        for method, result in sanity.items():
            if result.maps.shape[1] > 0:
                safe = method.replace(":", "_")
                save_figure(sanity_maps_figure(method, result), out / f"sanity_maps_{safe}.png")
    if agreement is not None:
        save_figure(agreement_figure(agreement), out / "agreement.png")
