"""The report's charts, drawn from result records (plain numbers), never from models or tensors.

Plain ``matplotlib.figure.Figure`` objects (no pyplot: no global figure registry, no GUI backend), as in
``xailab.explain.figures``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import NullFormatter

from xailab.io import atomic_write

Record = dict[str, Any]


def save(fig: Figure, path: Path, dpi: int = 100) -> str:
    """Write ``fig`` as PNG atomically; returns the file name."""
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=dpi))
    return path.name


def training_curves(records: Sequence[Record]) -> Figure:
    """Accuracy and loss per epoch of every cell, training (solid) and validation (dashed).

    The legend sits below both plots, one entry per cell (its colour) plus one per line style: a legend inside
    the axes covered the curves once a study had more than a few cells (two entries per cell).
    """
    columns = max(1, min(len(records), 4))
    legend_rows = math.ceil((len(records) + 2) / columns)
    fig = Figure(figsize=(11, 3.8 + 0.22 * legend_rows))
    ax_acc, ax_loss = fig.subplots(1, 2)
    for i, rec in enumerate(records):
        colour = f"C{i % 10}"
        epochs = [row["epoch"] for row in rec["history"]]
        for ax, key in ((ax_acc, "accuracy"), (ax_loss, "loss")):
            ax.plot(epochs, [row[f"train_{key}"] for row in rec["history"]], "-o", ms=3, color=colour)
            val = [row.get(f"val_{key}") for row in rec["history"]]
            if any(v is not None for v in val):
                ax.plot(epochs, [np.nan if v is None else v for v in val], "--s", ms=3, color=colour)
    for ax, title in ((ax_acc, "accuracy"), (ax_loss, "loss")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_loss.set_yscale("log")
    handles = [Line2D([], [], color=f"C{i % 10}", lw=2, label=rec["cell"]) for i, rec in enumerate(records)]
    handles += [
        Line2D([], [], color="grey", ls="-", marker="o", ms=3, label="training"),
        Line2D([], [], color="grey", ls="--", marker="s", ms=3, label="validation"),
    ]
    legend_height = (0.22 * legend_rows + 0.15) / fig.get_figheight()
    fig.tight_layout(rect=(0, legend_height, 1, 1))
    fig.legend(handles=handles, loc="lower center", ncol=columns, fontsize=7, frameon=False)
    return fig


def accuracy_scatter(records: Sequence[Record]) -> Figure:
    """Test accuracy against parameters (log scale) and against training time, one labelled point per cell.

    One row of the two panels per dataset (accuracies of different datasets share no scale: the cells of an
    easy dataset would crowd at its top, their labels on top of each other); within a row a point is named by
    its cell without the dataset (the row's title says it), and its colour is the cell's in the training
    curves. Labels that would collide are moved apart vertically (``_spread_labels``)."""
    datasets = list(dict.fromkeys(str(rec.get("dataset", "")) for rec in records))
    fig = Figure(figsize=(11, 3.8 * len(datasets) + 0.4))
    axes = fig.subplots(len(datasets), 2, squeeze=False)
    panels = (("parameters", "parameters", True), ("train_seconds", "training time (s)", False))
    for row, dataset in zip(axes, datasets, strict=True):
        for ax, (key, label, log) in zip(row, panels, strict=True):
            texts = []
            for i, rec in enumerate(records):
                x, y = rec.get(key), rec.get("test", {}).get("accuracy")
                if str(rec.get("dataset", "")) != dataset or x is None or y is None:
                    continue
                ax.scatter([x], [y], color=f"C{i % 10}", s=40, zorder=3)
                name = str(rec["cell"]).removesuffix(f"__{dataset}") if dataset else rec["cell"]
                texts.append(ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7))
            xs = [r[key] for r in records if r.get(key) and str(r.get("dataset", "")) == dataset]
            if log:
                ax.set_xscale("log")
                if xs:  # at least one decade either side, so the axis has labelled ticks
                    ax.set_xlim(min(xs) / 4, max(xs) * 4)
                ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide over a narrow range
            ax.set_xlabel(label)
            ax.set_ylabel("test accuracy")
            ax.set_title(f"{dataset}: accuracy vs {label}" if dataset else f"accuracy vs {label}")
            ax.grid(alpha=0.3)
            ax.margins(x=0 if log else 0.25, y=0.25)
            _spread_labels(fig, texts)
    fig.tight_layout()
    return fig


def _spread_labels(fig: Figure, texts: list[Any], gap_pt: float = 1.0) -> None:
    """Move annotation ``texts`` of one axes up or down (whole points) until no two bounding boxes overlap:
    a greedy pass from the lowest label upwards, each pushed above the ones below that it would touch."""
    if len(texts) < 2:
        return
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.tight_layout()  # place the axes as they will be saved before measuring the labels
    points_per_pixel = 72 / fig.dpi
    placed: list[Any] = []
    for text in sorted(texts, key=lambda t: t.get_window_extent(renderer).y0):
        box = text.get_window_extent(renderer)
        for _ in range(len(placed)):  # each push clears at least one placed label, which stays below
            hits = [other for other in placed if box.overlaps(other)]
            if not hits:
                break
            dy = (max(other.y1 for other in hits) - box.y0) * points_per_pixel + gap_pt
            x_off, y_off = text.get_position()
            text.set_position((x_off, y_off + dy))
            box = text.get_window_extent(renderer)
        placed.append(box)


def wrap_cell_name(cell: str, width: int = 22) -> str:
    """A cell's name for a narrow title: ``<model>__<dataset>`` broken after the ``__`` when longer than
    ``width`` characters (a confusion matrix is about 2 inches wide; a long name ran into its neighbour)."""
    model, sep, dataset = cell.partition("__")
    return f"{model}{sep}\n{dataset}" if sep and len(cell) > width else cell


def confusion_matrices(records: Sequence[Record], per_row: int = 3) -> Figure:
    """The test confusion matrices of cells on one dataset, row-normalised, counts written in.

    At most ``per_row`` side by side, further cells wrap onto new rows, so each matrix keeps a readable size
    however many cells the study has (six in a row were too small to read in a page-wide report).
    """
    n = len(records)
    k = len(records[0]["class_names"])
    size = min(3.4, 1.2 + 0.22 * k)
    cols = min(n, per_row)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(size * cols + 0.6, (size + 0.4) * rows))
    grid = fig.subplots(rows, cols, squeeze=False)
    axes = list(grid.flat)
    for ax in axes[n:]:
        ax.axis("off")
    for ax, rec in zip(axes, records, strict=False):  # spare axes hidden above
        cm = np.asarray(rec["test"]["confusion_matrix"], dtype=float)
        rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        if k <= 12:
            for (r, c), count in np.ndenumerate(cm):
                if count:
                    ax.text(
                        c,
                        r,
                        f"{int(count)}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if rates[r, c] > 0.5 else "black",
                    )
        names = [name[:10] for name in rec["class_names"]]
        ax.set_xticks(range(k), names, rotation=90, fontsize=6)
        ax.set_yticks(range(k), names, fontsize=6)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        ax.set_title(wrap_cell_name(rec["cell"]), fontsize=8)
    fig.tight_layout()
    return fig


def quality_chart(records: Sequence[Record], metrics: Sequence[str], info: dict[str, Any]) -> Figure:
    """One panel per metric: each method's mean score with its 95% bootstrap interval, a bar group per cell."""
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows + 0.4))
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    methods = sorted(
        {m for rec in records for m in rec.get("quality", {})},
        key=lambda m: (
            records[0]["explain"]["methods"].index(m) if m in records[0]["explain"]["methods"] else 99
        ),
    )
    width = 0.8 / max(1, len(methods))
    for ax, metric in zip(axes, metrics, strict=False):  # spare axes are hidden below
        for j, method in enumerate(methods):
            means, lows, highs = [], [], []
            for rec in records:
                s = rec.get("quality", {}).get(method, {}).get(metric, {})
                mean = s.get("mean", np.nan)
                means.append(mean)
                lows.append(mean - s.get("ci_low", mean))
                highs.append(s.get("ci_high", mean) - mean)
            xs = np.arange(len(records)) + (j - (len(methods) - 1) / 2) * width
            ax.bar(xs, means, width, yerr=[lows, highs], capsize=2, color=f"C{j % 10}", label=method)
        better = info.get(metric, {}).get("better", "none")
        arrow = {"higher": " (higher is better)", "lower": " (lower is better)"}.get(better, "")
        ax.set_title(f"{metric}{arrow}", fontsize=9)
        ax.set_xticks(range(len(records)), [r["cell"].replace("__", "\n") for r in records], fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(metrics) :]:
        ax.axis("off")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    fig.legend(handles, labels, loc="upper center", ncol=min(len(methods), 8), fontsize=8, frameon=False)
    return fig


def agreement_matrices(records: Sequence[Record]) -> Figure:
    """Per cell, the Spearman rank correlation between every pair of methods' maps (mean over images)."""
    n = len(records)
    m = len(records[0]["agreement"]["methods"])
    size = 2.2 + 0.5 * m
    fig = Figure(figsize=(size * n + 1.0, size), layout="constrained")  # room for labels and colour bar
    axes = fig.subplots(1, n, squeeze=False)[0]
    image = None
    for ax, rec in zip(axes, records, strict=True):
        methods = rec["agreement"]["methods"]
        rho = np.asarray(rec["agreement"]["spearman"], dtype=float)
        image = ax.imshow(rho, cmap="RdBu_r", vmin=-1, vmax=1)
        for (r, c), v in np.ndenumerate(rho):
            ax.text(
                c,
                r,
                "-" if np.isnan(v) else f"{v:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if abs(v) > 0.6 else "black",
            )
        ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(methods)), methods, fontsize=7)
        ax.set_title(wrap_cell_name(rec["cell"]), fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.8, label="Spearman")
    return fig


def sanity_curves(records: Sequence[Record]) -> Figure:
    """Per cell, the mean Spearman and SSIM between the trained model's maps and the maps after randomising
    the layers from the output down: a method that explains the model falls towards 0."""
    fig = Figure(figsize=(11, 3.8))
    ax_rank, ax_ssim = fig.subplots(1, 2)
    for i, rec in enumerate(records):
        s = rec.get("sanity")
        if not s:
            continue
        steps = range(1, len(s["layers"]) + 1)
        ax_rank.plot(steps, s["mean_spearman"], "-o", ms=3, color=f"C{i % 10}", label=rec["cell"])
        ax_ssim.plot(steps, s["mean_ssim"], "-o", ms=3, color=f"C{i % 10}", label=rec["cell"])
    for ax, title in ((ax_rank, "Spearman with the trained model's maps"), (ax_ssim, "SSIM with them")):
        ax.set_xlabel("layers randomised (from the output down)")
        ax.set_title(title, fontsize=9)
        ax.axhline(0, color="grey", lw=0.8)
        ax.grid(alpha=0.3)
    ax_rank.legend(fontsize=7)
    fig.tight_layout()
    return fig
