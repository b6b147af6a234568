"""Consolidating a study's result records into ``report.html``, ``results.csv`` and ``results.md``.

Reads ``study.json`` and each cell's ``record.json`` (typed ``CellRecord``s, validated as they are read) plus
the image files the study layer drew; draws the cross-cell charts into ``report_files/`` and renders Jinja2
templates. No model is loaded here.

A method that does not apply to a cell's model (``CellRecord.skipped_methods``) reads "n/a — needs ..." in
that cell's tables; models on one dataset are shown side by side on the same test images, per method they
share; a two-class cell's true and false positives and negatives get four galleries.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2

from xailab.config import CELL_REFERENCE, cell_references
from xailab.errors import CheckpointError
from xailab.io import read_json, write_text
from xailab.metrics.assessment import CHANCE_LABEL
from xailab.records import ALL_METHODS, QUADRANTS, CellRecord, read_cell_record
from xailab.report import charts
from xailab.report.shortcut import cascade_verdict, score_text, scored_cell
from xailab.report.shortcut import report_context as ground_truth_context

Record = CellRecord
SECTIONS = (
    ("results", "Results"),
    ("curves", "Training curves"),
    ("performance", "Accuracy vs size and time"),
    ("confusion", "Confusion matrices"),
    ("misclassified", "Misclassifications"),
    ("galleries", "Explanation galleries"),
    ("sidebyside", "Models side by side"),
    ("quality", "Explanation quality"),
    ("agreement", "Agreement between methods"),
    ("sanity", "Sanity checks"),
    ("trust", "Which explanation to trust"),
    ("environment", "Environment and command"),
)
SHORTCUT_SECTION = ("shortcut", "Which explanation finds the shortcut?")  # before "environment" in the page
QUADRANT_SECTION = ("quadrants", "True and false positives and negatives")  # after "misclassified"
QUADRANT_TITLES = {
    "TP": "true positives: {p} predicted {p}",
    "FP": "false positives: {n} predicted {p}",
    "TN": "true negatives: {n} predicted {n}",
    "FN": "false negatives: {p} predicted {n}",
}
RESULT_COLUMNS = (
    ("model", "model"),
    ("options", "options"),
    ("dataset", "dataset"),
    ("accuracy", "accuracy"),
    ("macro_f1", "macro-F1"),
    ("parameters", "parameters"),
    ("macs", "MACs"),
    ("epochs", "epochs"),
    ("train_seconds", "training time (s)"),
    ("train_images_per_s", "train images/s"),
    ("inference_images_per_s", "inference images/s"),
)
# Two-class test splits also get these (positive = class index 1), after macro-F1: what a screening task
# is judged by. A study without a two-class cell keeps the table above.
BINARY_COLUMNS = (("sensitivity", "sensitivity"), ("specificity", "specificity"), ("roc_auc", "ROC-AUC"))
SANITY_THRESHOLD = 0.5  # |Spearman| after full randomisation above this: the maps ignore the weights


def read_records(study_dir: Path) -> tuple[dict[str, Any], list[Record]]:
    """``study.json`` and the records of its cells that have one, in the study's cell order."""
    if not (study_dir / "study.json").is_file():
        raise CheckpointError(f"{study_dir} is not a study folder (no study.json); run `xailab run` first")
    study = read_json(study_dir / "study.json")
    records = []
    for name in study["cells"]:
        path = study_dir / name / "record.json"
        if path.is_file():
            records.append(read_cell_record(path))
    if not records:
        raise CheckpointError(f"{study_dir}: no cell has finished yet, so there is nothing to report")
    return study, records


def started_from(record: Record) -> dict[str, str]:
    """The cell's options that start weights from another cell of the study (``"cell:<model>"``), without
    the recipe hash they are pinned to: the results table names them beside the grid options."""
    return {k: f"{CELL_REFERENCE}{model}" for k, model in cell_references(record.model_options).items()}


def result_columns(records: Sequence[Record]) -> tuple[tuple[str, str], ...]:
    """The results table's (key, label) columns: ``RESULT_COLUMNS``, with ``BINARY_COLUMNS`` after macro-F1
    when a cell's test split has two classes (its metrics then hold ROC-AUC)."""
    if not any("roc_auc" in r.test for r in records):
        return RESULT_COLUMNS
    at = [k for k, _ in RESULT_COLUMNS].index("macro_f1") + 1
    return RESULT_COLUMNS[:at] + BINARY_COLUMNS + RESULT_COLUMNS[at:]


def results_rows(records: Sequence[Record]) -> list[dict[str, Any]]:
    """One row per cell with the results table's columns (numbers unformatted; the two-class columns are
    None for a cell of more classes)."""
    columns = [k for k, _ in result_columns(records)]
    rows = []
    for r in records:
        row = {
            "model": r.model,
            "options": " ".join(f"{k}={v}" for k, v in {**r.grid_options, **started_from(r)}.items()),
            "dataset": r.dataset,
            "accuracy": r.test.get("accuracy"),
            "macro_f1": r.test.get("macro_f1"),
            **{k: r.test.get(k) for k, _ in BINARY_COLUMNS},
            "parameters": r.parameters,
            "macs": r.macs,
            "epochs": len(r.history),
            "train_seconds": r.train_seconds,
            "train_images_per_s": r.train_images_per_s,
            "inference_images_per_s": r.inference_images_per_s,
        }
        rows.append({k: row[k] for k in columns})
    return rows


def fmt(key: str, value: Any) -> str:
    """A results-table value as text: accuracies in %, counts with thousands separators, MACs in millions."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key in ("accuracy", "sensitivity", "specificity"):
        return f"{100 * value:.2f}%"
    if key in ("macro_f1", "roc_auc"):
        return f"{value:.4f}"
    if key == "macs":
        return f"{value / 1e6:,.1f}M"
    if key in ("parameters", "epochs"):
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return str(value)


def results_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The results table as CSV text, unformatted numbers (one row per cell)."""
    buf = io.StringIO()
    names = list(rows[0]) if rows else [k for k, _ in RESULT_COLUMNS]  # the rows hold the table's columns
    writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def top_confusions(records: Sequence[Record], k: int = 5) -> list[dict[str, Any]]:
    """The ``k`` most frequent (true -> predicted) mistakes over all cells of one dataset, with each cell's count."""
    names = records[0].class_names
    size = len(names)
    totals: dict[tuple[int, int], int] = {}
    for rec in records:
        cm = rec.test["confusion_matrix"]
        for t in range(size):
            for p in range(size):
                if t != p and cm[t][p]:
                    totals[(t, p)] = totals.get((t, p), 0) + cm[t][p]
    ranked = sorted(totals.items(), key=lambda item: (-item[1], item[0]))[:k]
    return [
        {
            "true": names[t],
            "predicted": names[p],
            "total": count,
            "per_cell": {rec.cell: rec.test["confusion_matrix"][t][p] for rec in records},
        }
        for (t, p), count in ranked
    ]


def by_dataset(records: Sequence[Record]) -> dict[str, list[Record]]:
    """Records grouped by dataset, in study order."""
    groups: dict[str, list[Record]] = {}
    for rec in records:
        groups.setdefault(rec.dataset, []).append(rec)
    return groups


def not_applicable(rec: Record, method: str) -> str | None:
    """``n/a — needs attention, tokens`` when ``method`` was skipped on the cell's model, else None."""
    skipped = rec.skipped_methods.get(method)
    return f"n/a — {skipped.reason}" if skipped is not None else None


def quality_table(rec: Record, metrics: Sequence[str], info: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows (one per method) of ``metric -> {"text", "chance", "best"}`` (``shortcut.scored_cell``): the best
    method per metric is flagged unless its score is at or below chance. A method skipped on the cell's model
    gets a row whose ``na`` says what it needs; a last row (``chance``) holds the metrics' level on random
    maps, where the record has it."""
    quality = rec.section("quality", {})
    chance = rec.section("chance", {})  # absent in records made before the chance level existed
    best: dict[str, str] = {}
    for metric in metrics:
        better = info.get(metric, {}).get("better", "none")
        scored = [(q[metric]["mean"], m) for m, q in quality.items() if not math.isnan(q[metric]["mean"])]
        if scored and better in ("higher", "lower"):
            best[metric] = (max if better == "higher" else min)(scored)[1]
    rows = []
    for method, q in quality.items():
        cells = {}
        for metric in metrics:
            better = info.get(metric, {}).get("better", "none")
            cells[metric] = scored_cell(q[metric], chance.get(metric), better, best.get(metric) == method)
        rows.append({"method": method, "scores": cells, "na": None, "chance": False})
    rows += [
        {"method": m, "scores": {}, "na": not_applicable(rec, m), "chance": False}
        for m in rec.skipped_methods
    ]
    if chance:
        cells = {m: {"text": score_text(chance.get(m)), "chance": None, "best": False} for m in metrics}
        rows.append({"method": CHANCE_LABEL, "scores": cells, "na": None, "chance": True})
    return rows


def sanity_rows(records: Sequence[Record], method: str = "") -> list[dict[str, Any]]:
    """Per cell and checked method: Spearman after the first and after all layers, and a verdict (the cell's
    figure on the row of the method it draws; with ``sanity_method: all`` one row per method that applies,
    ``sanity_by_method``); a cell whose model the study's sanity ``method`` does not apply to gets a row whose
    ``na`` says what it needs."""
    rows: list[dict[str, Any]] = []
    for rec in records:
        s = rec.section("sanity")
        na = not_applicable(rec, method) if method and method != ALL_METHODS else None
        if na is not None:
            rows.append({"cell": rec.cell, "method": method, "na": na})
        if not s:
            continue
        by_method = rec.section("sanity_by_method") or {s["method"]: s}
        for name, curves in by_method.items():
            rows.append(
                {
                    "cell": rec.cell,
                    "method": name,
                    "layers": len(curves["layers"]),
                    "first": curves["mean_spearman"][0],
                    "final_ssim": curves["mean_ssim"][-1],
                    **cascade_verdict(curves["mean_spearman"], SANITY_THRESHOLD),
                    "figure": f"{rec.cell}/{s['figure']}" if name == s["method"] else None,
                    "na": None,
                }
            )
    return rows


def common_images(galleries: Sequence[Sequence[dict[str, Any]]]) -> int:
    """How many leading gallery images all ``galleries`` share (the same test index at each position)."""
    n = 0
    while all(n < len(g) for g in galleries) and len({g[n]["index"] for g in galleries}) == 1:
        n += 1
    return n


def side_by_side_row(rec: Record, tiles: Sequence[dict[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    """One model's row of a side-by-side table: per image its prediction and its maps' paths from the report."""
    return {
        "cell": rec.cell,
        "name": rec.cell.split("__")[0],
        "tiles": [
            {
                "index": t["index"],
                "prediction": t["prediction"],
                "correct": t["prediction"] == t["label"],
                "maps": {m: f"{rec.cell}/{t['maps'][m]}" for m in methods},
            }
            for t in tiles
        ],
    }


def side_by_side(groups: dict[str, list[Record]], methods: Sequence[str]) -> list[dict[str, Any]]:
    """Per dataset with several cells: the gallery images every cell explained (same test indices, same
    order) and one row per cell, for the methods every cell ran (in study order); the others are listed with
    the cells that lack them and why."""
    blocks: list[dict[str, Any]] = []
    for dataset, recs in groups.items():
        galleries = [rec.section("gallery") or [] for rec in recs]
        if len(recs) < 2 or not all(galleries):
            continue
        n = common_images(galleries)
        shared = [m for m in methods if all(m in g[0]["maps"] for g in galleries)]
        if not n or not shared:
            continue
        lacking = {
            m: "; ".join(
                f"{rec.cell}: {not_applicable(rec, m) or 'not run'}"
                for rec, g in zip(recs, galleries, strict=True)
                if m not in g[0]["maps"]
            )
            for m in methods
            if m not in shared
        }
        images = [
            {"index": t["index"], "label": t["label"], "input": f"{recs[0].cell}/{t['input']}"}
            for t in galleries[0][:n]
        ]
        rows = [side_by_side_row(rec, g[:n], shared) for rec, g in zip(recs, galleries, strict=True)]
        blocks.append(
            {"dataset": dataset, "methods": shared, "not_shared": lacking, "images": images, "rows": rows}
        )
    return blocks


def quadrant_blocks(records: Sequence[Record]) -> list[dict[str, Any]]:
    """Per two-class cell with quadrant galleries: the positive and negative class, the method, and per
    outcome (TP, FP, TN, FN) its title, its count on the test split and its tiles (paths from the report)."""
    blocks: list[dict[str, Any]] = []
    for rec in records:
        q = rec.quadrants
        if q is None:
            continue
        blocks.append(
            {
                "cell": rec.cell,
                "method": q.method,
                "positive": q.positive,
                "negative": q.negative,
                "quadrants": [
                    {
                        "name": name,
                        "title": QUADRANT_TITLES[name].format(p=q.positive, n=q.negative),
                        "count": q.counts[name],
                        "tiles": [
                            {
                                "index": t.index,
                                "label": t.label,
                                "prediction": t.prediction,
                                "confidence": t.confidence,
                                "input": f"{rec.cell}/{t.input}",
                                "map": f"{rec.cell}/{t.maps[q.method]}",
                            }
                            for t in q.galleries[name]
                        ],
                    }
                    for name in QUADRANTS
                ],
            }
        )
    return blocks


def page_sections(shortcut: bool, quadrants: bool) -> tuple[tuple[str, str], ...]:
    """The report's sections in page order: the quadrant galleries after the misclassifications and the
    shortcut section before the environment, each only when the study has them."""
    sections: list[tuple[str, str]] = []
    for section in SECTIONS:
        if section[0] == "environment" and shortcut:
            sections.append(SHORTCUT_SECTION)
        sections.append(section)
        if section[0] == "misclassified" and quadrants:
            sections.append(QUADRANT_SECTION)
    return tuple(sections)


def build_report(study_dir: str | Path) -> Path:
    """Write ``report.html``, ``results.csv``, ``results.md`` and ``report_files/*.png`` into ``study_dir``
    from its records; returns the path of ``report.html``."""
    study_dir = Path(study_dir)
    study, records = read_records(study_dir)
    spec = study["spec"]
    files = study_dir / "report_files"
    rows = results_rows(records)
    metrics = list(spec["metrics"])
    info: dict[str, Any] = {}
    for rec in records:
        info.update(rec.section("metric_info", {}))
    groups = by_dataset(records)
    # The charts and templates read the records as their JSON layout.
    flat = [rec.to_dict() for rec in records]
    flat_groups = {d: [rec.to_dict() for rec in recs] for d, recs in groups.items()}
    figures = {
        "curves": "report_files/" + charts.save(charts.training_curves(flat), files / "training_curves.png"),
        "performance": "report_files/" + charts.save(charts.accuracy_scatter(flat), files / "accuracy.png"),
        "confusion": {
            d: "report_files/" + charts.save(charts.confusion_matrices(recs), files / f"confusion-{d}.png")
            for d, recs in flat_groups.items()
        },
    }
    has_quality = bool(metrics) and any(rec.section("quality") for rec in records)
    if has_quality:
        figures["quality"] = "report_files/" + charts.save(
            charts.quality_chart(flat, metrics, info), files / "quality.png"
        )
    figures["agreement"] = "report_files/" + charts.save(
        charts.agreement_matrices(flat), files / "agreement.png"
    )
    sanity = sanity_rows(records, spec.get("sanity_method", ""))
    if any(row["na"] is None for row in sanity):
        figures["sanity"] = "report_files/" + charts.save(charts.sanity_curves(flat), files / "sanity.png")

    quadrants = quadrant_blocks(records)
    truth = ground_truth_context(flat, files, metrics, info, SANITY_THRESHOLD)  # report/shortcut.py
    context = {
        "study": study,
        "spec": spec,
        "records": flat,
        "groups": flat_groups,
        "sections": page_sections(bool(truth["shortcut"]), bool(quadrants)),
        "side_by_side": side_by_side(groups, spec["methods"]),
        "quadrants": quadrants,
        **truth,
        "columns": result_columns(records),
        "rows": [{k: fmt(k, v) for k, v in row.items()} for row in rows],
        "figures": figures,
        "confusions": {d: top_confusions(recs) for d, recs in groups.items()},
        "metrics": metrics,
        "metric_info": info,
        "quality": {rec.cell: quality_table(rec, metrics, info) for rec in records} if has_quality else {},
        "sanity": sanity,
        "sanity_threshold": SANITY_THRESHOLD,
        "missing": [c for c in study["cells"] if c not in {r.cell for r in records}],
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(resources.files("xailab.report") / "templates")),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,  # a typo in a template fails the report instead of leaving a hole
        trim_blocks=True,
        lstrip_blocks=True,
    )
    write_text(study_dir / "results.csv", results_csv(rows))
    write_text(study_dir / "results.md", env.get_template("results.md.j2").render(**context))
    report = study_dir / "report.html"
    write_text(report, env.get_template("report.html.j2").render(**context))
    return report
