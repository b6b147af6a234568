"""Tables and figures of one assessment, drawn from its record (``xailab.metrics.assessment.Assessment``).

``write_assessment(record, out_dir)`` writes what ``xailab assess`` leaves in its folder:

- ``scores.csv`` / ``scores.json``: per (model, method, metric) the mean, 95% bootstrap CI, number of images
  and whether higher or lower is better; ``scores.json`` is the whole record (``Assessment.to_json``): also
  the per-image scores, the sanity-check curves per layer, the mean deletion/insertion curves and the
  agreement matrix;
- ``per_image.csv``: every image's score for every method and metric;
- ``deletion_insertion.png``, ``sanity_check.png`` (Spearman and SSIM per randomised layer),
  ``sanity_maps_<method>.png`` (the example images' maps after each randomisation stage) and
  ``agreement.png`` (Spearman and top-k IoU between methods).

``sanity_overlay_figure`` is a study cell's ``sanity.png``. Figures are ``matplotlib.figure.Figure`` objects
without pyplot, as ``xailab.explain.figures``. Maps and images are arrays: numpy arrays or anything
``numpy.asarray`` reads (the record's CPU tensors); this layer never imports torch (ARCHITECTURE.md), so the
map normalisation of ``xailab.explain.figures`` is redone here in numpy, bit for bit.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from xailab.io import write_json, write_text
from xailab.metrics.assessment import CHANCE_LABEL
from xailab.report.charts import save

if TYPE_CHECKING:  # the record's types only: report/ never runs the metrics' (torch) code
    from xailab.metrics.assessment import Agreement, Assessment, SanityCurves

SCORE_FIELDS = ("model", "method", "metric", "mean", "ci_low", "ci_high", "n", "better")
CMAP = "jet"  # as xailab.explain.figures
PERCENTILE = 99.0  # maps are scaled by this percentile (xailab.explain.figures.normalise_map's default)
DPI = 110  # xailab.explain.figures.save_figure's


def _quantile(values: np.ndarray, q: float) -> np.float32:
    """``torch.quantile(values, q)`` (linear interpolation) of a float32 array, with the same float32
    arithmetic (the interpolation as one fused multiply-add, as torch's CPU kernel), so figures stay
    byte-identical to those drawn from tensors."""
    flat = np.sort(values.ravel())
    if np.isnan(flat).any():
        return np.float32(np.nan)
    rank = np.float32(q) * np.float32(flat.size - 1)
    below, above = flat[int(rank)], flat[int(np.ceil(rank))]
    weight = np.float32(rank - np.float32(int(rank)))
    diff = np.float64(np.float32(above - below))
    if abs(weight) < 0.5:  # float64 holds weight * diff exactly: one rounding to float32, as an FMA
        return np.float32(np.float64(below) + np.float64(weight) * diff)
    return np.float32(np.float64(above) - diff * np.float64(np.float32(1) - weight))


def normalise_map(attribution: Any, percentile: float = PERCENTILE) -> np.ndarray:
    """``[H, W]`` (or ``[1, H, W]``) map -> float32 ``[H, W]`` in [0, 1], as
    ``xailab.explain.figures.normalise_map``: magnitude (non-negative maps shifted to start at 0) scaled by
    its ``percentile``-th percentile, else by its maximum."""
    m = np.asarray(attribution, dtype=np.float32)
    m = m.reshape(m.shape[-2:])
    m = m - m.min() if m.min() >= 0 else np.abs(m)
    scale = _quantile(m, percentile / 100.0)
    if scale <= 0:
        scale = m.max()
    return np.clip(m / scale, 0, 1) if scale > 0 else np.zeros_like(m)


def overlay(image: Any, attribution: Any, alpha: float = 0.5) -> np.ndarray:
    """The uint8 image ``[H, W, C]`` blended with the colour-mapped, normalised map: float ``[H, W, 3]``
    (``xailab.explain.figures.overlay``)."""
    rgb = np.asarray(image, dtype=np.float32) / 255.0
    if rgb.shape[-1] == 1:
        rgb = np.broadcast_to(rgb, (*rgb.shape[:2], 3))
    heat = matplotlib.colormaps[CMAP](normalise_map(attribution))[..., :3]
    return (1 - alpha) * rgb + alpha * heat


def scores_csv(record: Assessment) -> str:
    """``scores.csv``: one row per (model, method, metric), floats with 6 significant digits."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SCORE_FIELDS)
    writer.writeheader()
    for row in record.scores:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in vars(row).items()})
    for metric, stats in record.chance.items():  # the level a method must beat, under its own label
        better = record.metric_info[metric].better if metric in record.metric_info else ""
        values = {"model": record.model, "method": CHANCE_LABEL, "metric": metric, **stats, "better": better}
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in values.items()})
    return buf.getvalue()


def per_image_csv(record: Assessment) -> str:
    """``per_image.csv``: one row per (method, image) with every metric's score (sorted by metric name);
    ``image`` is the image's index in its split (``Assessment.image_ids``), else its position."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    metric_names = sorted({m for scores in record.per_image.values() for m in scores})
    writer.writerow(["model", "method", "image", *metric_names])
    for method, scores in record.per_image.items():
        n = len(next(iter(scores.values()))) if scores else 0
        for i in range(n):
            values = [f"{float(scores[m][i]):.6g}" if m in scores else "" for m in metric_names]
            image = record.image_ids[i] if record.image_ids else i  # its index in the split
            writer.writerow([record.model, method, image, *values])
    return buf.getvalue()


def write_assessment(record: Assessment, out_dir: str | Path) -> Path:
    """The tables and figures of the module docstring in ``out_dir`` (atomic writes; figures only for the
    data the record has)."""
    out = Path(out_dir)
    write_text(out / "scores.csv", scores_csv(record))
    write_json(out / "scores.json", record.to_json())
    write_text(out / "per_image.csv", per_image_csv(record))
    if any(record.curves.values()):
        figure = curves_figure(record.curves, record.method_labels, record.chance_curves)
        save(figure, out / "deletion_insertion.png", dpi=DPI)
    if record.sanity:
        save(sanity_figure(record.sanity, record.method_labels), out / "sanity_check.png", dpi=DPI)
        for method, maps in record.sanity_maps.items():
            if maps.shape[1] > 0:
                figure = sanity_maps_figure(method, maps, record.sanity[method].layers)
                save(figure, out / f"sanity_maps_{method.replace(':', '_')}.png", dpi=DPI)
    if record.agreement is not None:
        save(agreement_figure(record.agreement), out / "agreement.png", dpi=DPI)
    return out


def curves_figure(
    curves: Mapping[str, Mapping[str, Sequence[float]]],
    labels: Mapping[str, str] | None = None,
    chance: Mapping[str, Sequence[float]] | None = None,
) -> Figure:
    """Mean deletion and insertion curves of every method (target probability vs fraction of pixels);
    ``labels``: method -> its legend text (default the method's name); ``chance``: mode -> the mean curve of
    random maps, drawn dashed (the level a method must beat)."""
    labels = labels or {}
    modes = [m for m in ("deletion", "insertion") if any(m in c for c in curves.values())]
    fig = Figure(figsize=(5.0 * max(1, len(modes)), 3.6))
    axes = fig.subplots(1, max(1, len(modes)), squeeze=False)[0]
    for ax, mode in zip(axes, modes, strict=False):
        for method, by_mode in curves.items():
            if mode in by_mode:
                y = np.asarray(by_mode[mode])
                ax.plot(np.linspace(0, 1, len(y)), y, label=labels.get(method, method))
        if chance and mode in chance:
            y = np.asarray(chance[mode])
            ax.plot(np.linspace(0, 1, len(y)), y, "k--", linewidth=1, label=CHANCE_LABEL)
        ax.set_xlabel(f"fraction of pixels {'removed' if mode == 'deletion' else 'inserted'}")
        ax.set_ylabel("target score")
        ax.set_title(f"{mode} (mean over images)", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def sanity_figure(sanity: Mapping[str, SanityCurves], labels: Mapping[str, str] | None = None) -> Figure:
    """Mean Spearman and SSIM between original and randomised maps after each layer, per method;
    ``labels``: method -> its legend text (default the method's name)."""
    labels = labels or {}
    fig = Figure(figsize=(11.0, 4.0))
    axes = fig.subplots(1, 2)
    for ax, key in zip(axes, ("mean_spearman", "mean_ssim"), strict=True):
        lowest = -0.2
        for method, curves in sanity.items():
            values = [1.0, *getattr(curves, key)]
            ax.plot(range(len(values)), values, marker="o", label=labels.get(method, method))
            lowest = min(lowest, min(values) - 0.05)
        names = ["original", *next(iter(sanity.values())).layers]
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


def cascade_stages(stages: int, columns: int) -> list[int]:
    """At most ``columns`` indices of a cascade's ``stages`` (0: the trained model, ``stages - 1``: every
    layer random), spread evenly and always holding both ends."""
    return [int(j) for j in np.unique(np.linspace(0, stages - 1, min(columns, stages)).round().astype(int))]


def sanity_maps_figure(method: str, maps: Any, layers: Sequence[str], columns: int = 12) -> Figure:
    """The example images' maps (rows) originally and after the randomisation stages (columns) of ``maps``
    ``[L + 1, E, 1, H, W]``, at most ``columns`` stages spread over the cascade (a 105-layer MobileNetV2 drew
    106 columns too thin to see), tiled into one image (one axes instead of one per map keeps drawing fast)."""
    maps = np.asarray(maps)
    stages = cascade_stages(maps.shape[0], columns)
    n = maps.shape[1]
    h, w = maps.shape[-2:]
    gap = max(1, h // 8)
    tiles = np.full((n * (h + gap) - gap, len(stages) * (w + gap) - gap), np.nan)
    for i in range(n):
        for col, j in enumerate(stages):
            tiles[i * (h + gap) : i * (h + gap) + h, col * (w + gap) : col * (w + gap) + w] = normalise_map(
                maps[j, i]
            )
    fig = Figure(figsize=(min(18.0, 1.1 * len(stages) + 1.0), 1.1 * max(1, n) + 2.2))  # room for the names
    ax = fig.subplots()
    ax.imshow(np.ma.masked_invalid(tiles), cmap="jet", vmin=0, vmax=1, interpolation="nearest")
    names = ["original" if j == 0 else f"{j} random\n(to {layers[j - 1]})" for j in stages]
    ax.set_xticks([col * (w + gap) + w / 2 for col in range(len(stages))], names, rotation=45, ha="right")
    ax.tick_params(axis="x", labelsize=7)
    ax.set_yticks([])
    ax.set_title(f"{method}: maps as layers are randomised (top layer first)", fontsize=9)
    fig.tight_layout()
    return fig


def sanity_overlay_figure(
    image: Any, maps: Any, layers: Sequence[str], method: str, columns: int = 8
) -> Figure:
    """The cascading randomisation of one image ``[H, W, C]``: the trained model's map, then the maps after
    layers from the output down are re-initialised (``maps`` ``[L + 1, 1, H, W]``), at most ``columns``
    panels spread evenly over the cascade (always ending with every layer random)."""
    maps = np.asarray(maps)
    stages = cascade_stages(maps.shape[0], columns)
    fig = Figure(figsize=(1.45 * len(stages), 2.0))
    axes = fig.subplots(1, len(stages), squeeze=False)[0]
    for ax, j in zip(axes, stages, strict=True):
        ax.imshow(overlay(image, maps[j]), interpolation="nearest")
        title = "trained" if j == 0 else f"{j} layers random\n(to {layers[j - 1]})"
        ax.set_title(title if len(title) < 40 else title[:38] + "…", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{method} as the layers are randomised from the output down", fontsize=8)
    fig.tight_layout()
    return fig


def agreement_figure(agreement: Agreement) -> Figure:
    """Heatmaps of the Spearman correlation and top-k IoU between methods."""
    names = list(agreement.methods)
    fig = Figure(figsize=(4.5 + 0.5 * len(names), 2.6 + 0.25 * len(names)))
    axes = fig.subplots(1, 2)
    for ax, key in zip(axes, ("spearman", "topk_iou"), strict=True):
        matrix = np.asarray(getattr(agreement, key), dtype=float)
        im = ax.imshow(matrix, vmin=-1 if key == "spearman" else 0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=6, color="white")
        title = "Spearman (|maps|)" if key == "spearman" else f"top-{agreement.k_fraction:.0%} IoU"
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig
