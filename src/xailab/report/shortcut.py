"""The report's ground-truth sections, drawn from the records only (no model, no tensor):

- "Which explanation to trust": per cell and method, the sanity-check verdict, the faithfulness and
  robustness scores, and (where the study planted a shortcut, so there is ground truth) the localisation
  scores of the marker — one table that puts the three kinds of evidence side by side.
- "Which explanation finds the shortcut?" (studies of ``kind: shortcut``): the reliance figures of the
  shortcut and the control model, each method's localisation scores with bootstrap intervals for both
  models, how the maps changed between them, and galleries of marked images side by side.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from xailab.records import SkippedMethod
from xailab.report import charts

Record = dict[str, Any]
SANITY_METRIC = "model_randomisation"  # a per-method sanity score, when the study lists it as a metric
MODELS = (("shortcut", "with the shortcut"), ("control", "control (no marker)"))
VARIANTS = (
    ("present", "marker on the marked classes"),
    ("removed", "marker removed"),
    ("moved", "marker moved to the other classes"),
)


def score_text(stats: Mapping[str, Any] | None) -> str:
    """``mean [low, high]`` with three decimals, ``-`` when missing or NaN."""
    if not stats or stats.get("mean") is None or math.isnan(stats["mean"]):
        return "-"
    return f"{stats['mean']:.3f} [{stats['ci_low']:.3f}, {stats['ci_high']:.3f}]"


def versus_chance(
    stats: Mapping[str, Any] | None, chance: Mapping[str, Any] | None, better: str
) -> str | None:
    """Where a method's score stands against the chance level (the same metric on random maps):
    ``"above"`` when its 95% interval lies wholly on the better side of chance's mean, ``"below"`` when
    wholly on the worse side, ``"at"`` when the interval holds it; None without a chance level, a score or a
    direction. A score at chance says nothing the metric can see, however it ranks among the methods."""
    if better not in ("higher", "lower") or not stats or not chance:
        return None
    level, low, high = chance.get("mean"), stats.get("ci_low"), stats.get("ci_high")
    if level is None or low is None or high is None or any(math.isnan(v) for v in (level, low, high)):
        return None
    if low <= level <= high:
        return "at"
    return "above" if (low > level) == (better == "higher") else "below"


def scored_cell(
    stats: Mapping[str, Any] | None, chance: Mapping[str, Any] | None, better: str, is_best: bool
) -> dict[str, Any]:
    """One table cell of a method's score: ``text``, ``chance`` (``versus_chance``) and ``best``, which a
    score at or below chance never gets (bold would point at a method the metric cannot tell from noise)."""
    verdict = versus_chance(stats, chance, better)
    return {"text": score_text(stats), "chance": verdict, "best": is_best and verdict in (None, "above")}


def best_methods(scores: Mapping[str, Mapping[str, Any]], metric: str, better: str) -> str | None:
    """The method with the best mean of ``metric`` (``better``: ``higher`` or ``lower``), None if none."""
    means = {m: (s.get(metric) or {}).get("mean") for m, s in scores.items()}
    found = [(v, m) for m, v in means.items() if v is not None and not math.isnan(v)]
    if not found or better not in ("higher", "lower"):
        return None
    return (max if better == "higher" else min)(found)[1]


def cascade_verdict(spearman: Sequence[float | None], threshold: float) -> dict[str, Any]:
    """The verdict of one cascading-randomisation curve (mean Spearman with the trained model's maps after each
    layer, output first): ``final`` (after every layer) and ``cascade_mean`` (over the layers: the
    ``model_randomisation`` metric's aggregate); ``passes`` when ``|final| < threshold``; ``late`` when it
    passes but the mean stays at or above ``threshold`` — maps that ignore most of the weights and change only
    once the lowest layers are random (attention rollout on a ViT: 1.00 after the head, 0.41 after all)."""
    values = [v for v in spearman if v is not None and not math.isnan(v)]
    final = spearman[-1] if spearman else None
    if final is None or math.isnan(final):
        return {"final": final, "cascade_mean": None, "passes": False, "late": False}
    mean = sum(values) / len(values)
    passes = abs(final) < threshold
    return {"final": final, "cascade_mean": mean, "passes": passes, "late": passes and abs(mean) >= threshold}


def sanity_verdict(rec: Record, method: str, threshold: float) -> dict[str, Any]:
    """Whether ``method``'s maps of cell ``rec`` change when the model is randomised: from the
    ``model_randomisation`` metric (mean |Spearman| over the cascade below ``threshold``) or the cell's
    sanity check of that method (|Spearman| after every layer below ``threshold``); ``None`` when untested."""
    quality = rec.get("quality") or {}
    score = (quality.get(method) or {}).get(SANITY_METRIC)
    if score and score.get("mean") is not None and not math.isnan(score["mean"]):
        return {
            "passes": abs(score["mean"]) < threshold,
            "late": False,
            "text": f"{score['mean']:.2f}",
            "how": "mean over layers",
        }
    sanity = (rec.get("sanity_by_method") or {}).get(method) or rec.get("sanity") or {}
    if sanity.get("method") == method and sanity.get("mean_spearman"):
        verdict = cascade_verdict(sanity["mean_spearman"], threshold)
        if verdict["cascade_mean"] is not None:
            text = f"{verdict['final']:.2f}"
            if verdict["late"]:
                text += f"; {verdict['cascade_mean']:.2f} mean over layers"
            return {
                "passes": verdict["passes"],
                "late": verdict["late"],
                "text": text,
                "how": "all layers random",
            }
    return {"passes": None, "late": False, "text": "not checked", "how": ""}


def trust_table(
    records: Sequence[Record], metrics: Sequence[str], info: Mapping[str, Any], threshold: float
) -> dict[str, Any]:
    """The summary "which explanation to trust": per cell, one row per method with the sanity verdict, the
    quality scores (the study's metrics with a direction, the sanity metric aside) and the localisation
    scores of the shortcut model where the cell has ground truth; the best method per column flagged. A
    study method skipped on the cell's model gets a row whose ``na`` says what it needs (``n/a — needs
    conv``); the other rows' ``na`` is None."""
    quality_cols = [
        m for m in metrics if m != SANITY_METRIC and info.get(m, {}).get("better") in ("higher", "lower")
    ]
    cells = []
    for rec in records:
        quality = rec.get("quality") or {}
        shortcut = rec.get("shortcut")
        local = (shortcut or {}).get("localisation", {}).get("shortcut", {})
        local_cols = list((shortcut or {}).get("metrics", []))
        mosaic = ((shortcut or {}).get("focus") or {}).get("shortcut")
        if mosaic:  # Focus on 2x2 mosaics: ground truth without a planted marker
            local = {m: {**s, "focus": mosaic.get(m)} for m, s in local.items()}
            local_cols.append("focus")
        methods = list(rec.get("explain", {}).get("methods") or quality or local)
        best = {m: best_methods(quality, m, info[m]["better"]) for m in quality_cols}
        best.update({m: best_methods(local, m, "higher") for m in local_cols})
        chance = rec.get("chance") or {}
        rows = []
        for method in methods:
            rows.append(
                {
                    "method": method,
                    "sanity": sanity_verdict(rec, method, threshold),
                    "quality": {
                        m: scored_cell(
                            (quality.get(method) or {}).get(m),
                            chance.get(m),
                            info[m]["better"],
                            best[m] == method,
                        )
                        for m in quality_cols
                    },
                    "localisation": {
                        m: {"text": score_text((local.get(method) or {}).get(m)), "best": best[m] == method}
                        for m in local_cols
                    },
                    "na": None,
                }
            )
        for method, skipped in (rec.get("skipped_methods") or {}).items():
            reason = SkippedMethod(
                needs=tuple(skipped["needs"]), offers=tuple(skipped.get("offers", ()))
            ).reason
            rows.append(
                {"method": method, "sanity": None, "quality": {}, "localisation": {}, "na": f"n/a — {reason}"}
            )
        cells.append(
            {
                "cell": rec["cell"],
                "quality_columns": quality_cols,
                "localisation_columns": local_cols,
                "rows": rows,
                # the level each quality score must beat; absent in records made before it existed
                "chance": {m: score_text(chance.get(m)) for m in quality_cols} if chance else None,
            }
        )
    return {
        "cells": cells,
        "threshold": threshold,
        "directions": {m: info.get(m, {}).get("better", "none") for m in quality_cols},
    }


# ---------------------------------------------------------------------------------------------------------
# "Which explanation finds the shortcut?"
# ---------------------------------------------------------------------------------------------------------


def reliance_chart(rec: Record) -> Figure:
    """Test accuracy on the marked classes' images and on the others, and the share of the others pulled to
    a marked class, with the marker present / removed / moved, for both models."""
    reliance = rec["shortcut"]["reliance"]
    panels = (
        ("accuracy_marked_classes", "accuracy on the marked classes"),
        ("accuracy_other_classes", "accuracy on the other classes"),
        ("to_marked_class", "other classes predicted as marked"),
    )
    fig = Figure(figsize=(11, 3.3))
    axes = fig.subplots(1, len(panels))
    x = np.arange(len(VARIANTS))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for j, (model, label) in enumerate(MODELS):
            values = [reliance[model][v][key] for v, _ in VARIANTS]
            ax.bar(x + (j - 0.5) * 0.38, values, width=0.38, label=label, color=f"C{j}")
        ax.set_xticks(x, [v for v, _ in VARIANTS])
        ax.set_ylim(0, 1.05)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"{rec['cell']}: how much the models rely on the marker", fontsize=10)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.1, top=0.82, wspace=0.18)  # fixed: no second draw
    return fig


def localisation_chart(rec: Record) -> Figure:
    """One panel per localisation metric: each method's mean with its 95% bootstrap interval, for the
    shortcut model and the control. Fixed margins (no tight layout: it would draw the figure twice)."""
    section = rec["shortcut"]
    metrics = section["metrics"]
    methods = list(section["localisation"]["shortcut"])
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    panel_h = 0.36 * len(methods) + 0.5
    width, height = 1.9 + 3.1 * cols, panel_h * rows + 0.55 * (rows - 1) + 0.9
    fig = Figure(figsize=(width, height))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False, sharey=True, sharex=True)).flatten()
    y = np.arange(len(methods))
    for ax, metric in zip(axes, metrics, strict=False):
        for j, (model, label) in enumerate(MODELS):
            stats = [section["localisation"][model][m][metric] for m in methods]
            means = np.array([s["mean"] for s in stats], dtype=float)
            low = np.clip(means - np.array([s["ci_low"] for s in stats], dtype=float), 0, None)
            high = np.clip(np.array([s["ci_high"] for s in stats], dtype=float) - means, 0, None)
            ax.barh(y + (j - 0.5) * 0.38, means, height=0.38, xerr=[low, high], color=f"C{j}", label=label)
        ax.set_title(metric, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, methods, fontsize=8)
    axes[0].set_ylim(len(methods) - 0.5, -0.5)  # the first method on top
    axes[0].set_xlim(0, 1.02)
    axes[0].set_xticks([0, 0.25, 0.5, 0.75, 1.0], ["0", "", "0.5", "", "1"])
    for ax in axes:
        ax.tick_params(labelsize=8)
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="upper right", ncols=2)
    fig.suptitle(
        f"{rec['cell']}: localisation of the marker (higher is better)", fontsize=10, x=0.02, ha="left"
    )
    fig.subplots_adjust(
        left=1.7 / width,
        right=0.98,
        bottom=0.45 / height,
        top=1 - 0.55 / height,
        wspace=0.08,
        hspace=0.55 / panel_h,
    )
    return fig


def shortcut_cells(records: Sequence[Record], files: Path) -> list[dict[str, Any]]:
    """Per cell of a shortcut study: its tables, galleries and the charts written into ``files``."""
    out = []
    for rec in records:
        section = rec.get("shortcut")
        if not section:
            continue
        safe = rec["cell"].replace("/", "_")
        reliance_png = charts.save(reliance_chart(rec), files / f"shortcut-reliance-{safe}.png")
        local_png = charts.save(localisation_chart(rec), files / f"shortcut-localisation-{safe}.png")
        local = {}
        for model, _ in MODELS:
            scores = section["localisation"][model]
            best = {m: best_methods(scores, m, "higher") for m in section["metrics"]}
            local[model] = [
                {
                    "method": method,
                    "scores": {
                        m: {"text": score_text(s.get(m)), "best": best[m] == method}
                        for m in section["metrics"]
                    },
                }
                for method, s in scores.items()
            ]
        reliance = [
            {
                "model": label,
                "variants": {
                    v: {k: _pct(section["reliance"][model][v][k]) for k in section["reliance"][model][v]}
                    for v, _ in VARIANTS
                },
            }
            for model, label in MODELS
        ]
        gallery = [
            {
                "label": row["label"],
                "input": row["input"],
                "models": {m: section["gallery"][m][i] for m, _ in MODELS},
            }
            for i, row in enumerate(section["gallery"]["shortcut"])
        ]
        out.append(
            {
                "cell": rec["cell"],
                "config": section["config"],
                "classes": section["classes"],
                "n_marked": section["n_marked"],
                "marker_pixels": section["marker_pixels"],
                "tolerance": section["tolerance"],
                "metrics": section["metrics"],
                "metric_info": section.get("metric_info", {}),
                "reliance": reliance,
                "variants": VARIANTS,
                "localisation": local,
                "difference": [
                    {
                        "method": method,
                        "mass_shift": score_text(d.get("mass_shift")),
                        "spearman": score_text(d.get("spearman")),
                    }
                    for method, d in section["difference"].items()
                ],
                "gallery": gallery,
                "focus": [
                    {
                        "method": method,
                        **{m: score_text((section["focus"][m] or {}).get(method)) for m, _ in MODELS},
                    }
                    for method in section["localisation"]["shortcut"]
                ]
                if any((section.get("focus") or {}).get(m) for m, _ in MODELS)
                else [],
                "methods": list(section["localisation"]["shortcut"]),
                "figures": {
                    "reliance": f"report_files/{reliance_png}",
                    "localisation": f"report_files/{local_png}",
                },
                "control_accuracy": _pct(section.get("control_test", {}).get("accuracy")),
            }
        )
    return out


def _pct(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.1f}%"


def report_context(
    records: Sequence[Record], files: Path, metrics: Sequence[str], info: Mapping[str, Any], threshold: float
) -> dict[str, Any]:
    """What the templates' ground-truth sections need: ``trust`` (always) and ``shortcut`` (a list, empty
    unless the study planted a shortcut)."""
    return {
        "trust": trust_table(records, metrics, info, threshold),
        "shortcut": shortcut_cells(records, files),
    }
