"""Running a study: expand its cells, train (or resume, or skip) each, explain and assess its test images,
and store one JSON result record per cell for the report.

A cell is one model (with one combination of grid options) on one dataset and lives in
``<out>/<study>/<cell name>/``: the training run's files (``config.json``, ``model.safetensors``, ...) plus
``explanations.safetensors``, the figures and tiles of the report, and ``record.json``, written last and
atomically. A re-run skips a cell whose record carries the same cell key (recipe + explanation settings),
reuses a finished training run of the same recipe, and resumes a run killed mid-training from its last
checkpoint, so an interrupted study loses at most the epoch in progress.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor

from xailab.data import Dataset, load_dataset
from xailab.data.transforms import to_model_input
from xailab.errors import CheckpointError, XailabError
from xailab.explain.base import explain
from xailab.explain.figures import overlay, save_figure, to_rgb
from xailab.io import atomic_write, remove_orphans
from xailab.metrics.assessment import Assessment, assess
from xailab.models import model_input_size
from xailab.records import CellRecord, read_cell_record
from xailab.report.assessment import sanity_overlay_figure
from xailab.study.spec import StudySpec
from xailab.train import Run, TrainConfig, load_run, predict_logits, resolve_device, train
from xailab.train.loop import config_hash
from xailab.train.runs import read_run_config, read_run_meta

RECORD_VERSION = 1
# Keys that pick the cells and their recipe: the recipe's own hash covers them, so the other cells' keys stay
# the same when a model or dataset is added to the study.
CELL_DEFINING_KEYS = frozenset(
    (
        "name",
        "description",
        "datasets",
        "models",
        "train",
        "model_options",
        "option_grid",
        "dataset_options",
        "dataset_roots",
        "kind",
    )
)
# Gallery tiles are upscaled (nearest neighbour) to about this size, so 8x8 digits stay crisp.
TILE_PIXELS = 96


@dataclass(frozen=True)
class Cell:
    """One model (with one combination of grid options) on one dataset, trained with ``config``."""

    name: str
    model: str
    dataset: str
    config: TrainConfig
    grid_options: dict[str, Any] = field(default_factory=dict)


def cell_name(model: str, dataset: str, grid_options: dict[str, Any]) -> str:
    """``<model>__<dataset>``, with grid options in the model part: ``keras_cnn-stride2-kernel_size3__cifar10``."""
    suffix = "".join(f"-{k}{v}" for k, v in grid_options.items())
    return f"{model}{suffix}__{dataset}"


def expand_cells(spec: StudySpec, data_dir: str | None = None) -> list[Cell]:
    """Every cell of ``spec``: datasets x models x the product of each model's option grid, in file order."""
    cells = []
    for dataset in spec.datasets:
        for model in spec.models:
            grid = spec.option_grid.get(model, {})
            for values in itertools.product(*grid.values()):
                combo = dict(zip(grid, values, strict=True))
                config = TrainConfig.from_dict(
                    {
                        **spec.train,
                        "model": model,
                        "dataset": dataset,
                        "data_dir": data_dir,
                        "dataset_root": spec.dataset_roots.get(dataset, spec.train.get("dataset_root")),
                        "model_options": {
                            **spec.train.get("model_options", {}),
                            **spec.model_options.get(model, {}),
                            **combo,
                        },
                        "dataset_options": {
                            **spec.train.get("dataset_options", {}),
                            **spec.dataset_options.get(dataset, {}),
                        },
                    }
                )
                cells.append(Cell(cell_name(model, dataset, combo), model, dataset, config, combo))
    return cells


def cell_key(spec: StudySpec, cell: Cell) -> str:
    """A short hash of what decides a cell's record: the recipe (with its epoch budget) and the explanation
    and metric settings. A record with the same key is reused as it is."""
    explain_part = {k: v for k, v in spec.to_dict().items() if k not in CELL_DEFINING_KEYS}
    payload = {
        "version": RECORD_VERSION,
        "recipe": config_hash(cell.config),
        "epochs": cell.config.epochs,
        "early_stopping": cell.config.early_stopping,
        "explain": explain_part,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class CellTask:
    """What an executor needs to run one cell (picklable, so Ray can ship it to a worker)."""

    spec: StudySpec
    cell: Cell
    study_dir: str
    progress: bool = False
    callbacks: tuple = ()


def finished_record(spec: StudySpec, cell: Cell, cell_dir: Path) -> CellRecord | None:
    """The cell's ``record.json`` if it was written for the same cell key, else None."""
    path = cell_dir / "record.json"
    if not path.is_file():
        return None
    try:
        record = read_cell_record(path)
    except XailabError:
        return None  # written atomically, so only a hand-edited file is broken: redo the cell
    return record if record.cell_key == cell_key(spec, cell) else None


def cell_dataset(cell: Cell) -> Dataset:
    """The cell's dataset at the model's input size and the recipe's channels."""
    cfg = cell.config
    return load_dataset(
        cfg.dataset,
        data_dir=cfg.data_dir,
        root=cfg.dataset_root,
        image_size=cfg.image_size or model_input_size(cfg.model)[0],
        channels=cfg.channels,
        **cfg.dataset_options,
    )


def train_cell(
    cell: Cell, cell_dir: Path, dataset: Dataset, callbacks: Sequence[Any] = (), progress: bool = True
) -> Run:
    """Train the cell's model into ``cell_dir``; reuse a finished run of the same recipe and epoch budget,
    resume an unfinished one (or one with a smaller epoch budget) from its last checkpoint."""
    if not (cell_dir / "config.json").is_file():
        return train(
            cell.config,
            out_dir=cell_dir.parent,
            name=cell_dir.name,
            callbacks=callbacks,
            dataset=dataset,
            progress=progress,
        )
    meta = read_run_meta(cell_dir)
    if meta.config_hash != config_hash(cell.config):
        raise CheckpointError(
            f"{cell_dir} holds a run of another recipe (config hash {meta.config_hash} != "
            f"{config_hash(cell.config)}); delete that folder or run the study with another --out"
        )
    if (
        meta.status == "finished"
        and meta.train.epochs == cell.config.epochs
        and (cell_dir / "model.safetensors").is_file()
    ):
        return load_run(cell_dir, device=resolve_device(cell.config.device))
    return train(
        cell.config,
        out_dir=cell_dir.parent,
        name=cell_dir.name,
        resume=True,
        callbacks=callbacks,
        dataset=dataset,
        progress=progress,
    )


def run_cell(task: CellTask) -> dict[str, Any]:
    """Train, explain and assess one cell; return its record (also written to ``record.json``)."""
    spec, cell = task.spec, task.cell
    cell_dir = Path(task.study_dir) / cell.name
    remove_orphans(cell_dir)  # the study folder is locked: temp files here are a killed write's
    done = finished_record(spec, cell, cell_dir)
    if done is not None:
        return {**done.to_dict(), "skipped": True}
    dataset = cell_dataset(cell)
    run = train_cell(cell, cell_dir, dataset, task.callbacks, task.progress)
    record = CellRecord.from_dict(assess_cell(spec, cell, run, dataset, cell_dir), where=f"{cell.name}:")
    record.write(cell_dir)
    return {**record.to_dict(), "skipped": False}


# ---------------------------------------------------------------------------------------------------------
# Explaining and assessing one trained cell
# ---------------------------------------------------------------------------------------------------------


def save_tile(path: Path, rgb: np.ndarray) -> str:
    """Write float ``[H, W, 3]`` in [0, 1] as a PNG upscaled (nearest) to about ``TILE_PIXELS``; the file name."""
    h, w = rgb.shape[:2]
    scale = max(1, round(TILE_PIXELS / max(h, w)))
    img = Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)).resize(
        (w * scale, h * scale), Image.Resampling.NEAREST
    )
    atomic_write(path, lambda p: img.save(p, format="PNG"))
    return path.name


def gallery_tiles(
    out: Path,
    images: Tensor,
    maps: dict[str, Tensor],
    labels: Sequence[str],
    predictions: Sequence[str],
    confidences: Sequence[float],
) -> list[dict[str, Any]]:
    """One input tile and one overlay tile per method for each image ``[N, H, W, C]`` (maps ``[N, 1, H, W]``),
    written to ``out``; returns per image its label, prediction and the tiles' paths relative to the cell."""
    rows = []
    for i in range(images.shape[0]):
        rows.append(
            {
                "index": i,
                "label": labels[i],
                "prediction": predictions[i],
                "confidence": round(float(confidences[i]), 4),
                "input": f"{out.name}/" + save_tile(out / f"{i}-input.png", to_rgb(images[i])),
                "maps": {
                    m: f"{out.name}/"
                    + save_tile(out / f"{i}-{m.replace(':', '_')}.png", overlay(images[i], maps[m][i]))
                    for m in maps
                },
            }
        )
    return rows


def misclassification_figure(
    images: Tensor, for_predicted: Tensor, for_true: Tensor, titles: Sequence[tuple[str, str]], method: str
) -> Figure:
    """One column per misclassified image ``[N, H, W, C]``: the input, ``method``'s map for the predicted
    class and for the true class (maps ``[N, 1, H, W]``); ``titles``: (true, predicted) class names."""
    n = images.shape[0]
    fig = Figure(figsize=(1.3 * n + 0.9, 4.3))
    axes = fig.subplots(3, n, squeeze=False)
    for j, (true, predicted) in enumerate(titles):
        panels = [
            (to_rgb(images[j]), f"true {true}\npredicted {predicted}"),
            (overlay(images[j], for_predicted[j]), f"for {predicted}"),
            (overlay(images[j], for_true[j]), f"for {true}"),
        ]
        for ax, (picture, title) in zip(axes[:, j], panels, strict=True):
            ax.imshow(picture, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    axes[1, 0].set_ylabel(f"{method}:\npredicted class", fontsize=8)
    axes[2, 0].set_ylabel(f"{method}:\ntrue class", fontsize=8)
    fig.tight_layout()
    return fig


def assess_cell(spec: StudySpec, cell: Cell, run: Run, dataset: Dataset, cell_dir: Path) -> dict[str, Any]:
    """Explain the first ``spec.n_explain`` test images with every method, score the maps with every metric,
    compare the methods, run the sanity check and draw the cell's tiles and figures; the cell's record."""
    model = run.model.eval()
    device = next(model.parameters()).device
    names = list(dataset.class_names)
    test = dataset["test"]
    t0 = time.perf_counter()
    logits = predict_logits(model, test.images, dataset.mean, dataset.std, run.config.eval_batch_size)
    inference_seconds = time.perf_counter() - t0
    probs = logits.softmax(1).cpu()
    predicted = probs.argmax(1)
    labels = test.labels.cpu()

    n = min(spec.n_explain, len(test))
    images = test.images[:n]
    x = to_model_input(images.to(device), dataset.mean, dataset.std).contiguous()
    targets = predicted[:n].to(device)
    assessment = assess(
        model,
        x,
        targets,
        spec.methods,
        spec.metrics,
        model_name=cell.name,
        method_params=spec.method_params,
        metric_params=spec.metric_params,
        seed=spec.seed,
        sanity_methods=[spec.sanity_method] if spec.sanity_method else [],
        sanity_images=spec.sanity_images,
        sanity_seed=spec.seed + 42,
        n_examples=1,
        agreement=True,
    )
    maps = dict(assessment.maps)
    tensors = {f"map.{m}": t.contiguous() for m, t in maps.items()}
    tensors.update(images=images.contiguous(), labels=labels[:n].clone(), predictions=predicted[:n].clone())
    atomic_write(cell_dir / "explanations.safetensors", lambda p: save_file(tensors, str(p)))

    g = min(spec.n_gallery, n)
    gallery = gallery_tiles(
        cell_dir / "gallery",
        images[:g],
        {m: t[:g] for m, t in maps.items()},
        [names[int(c)] for c in labels[:g]],
        [names[int(c)] for c in predicted[:g]],
        probs[:g].amax(1).tolist(),
    )

    record: dict[str, Any] = {
        "version": RECORD_VERSION,
        "cell": cell.name,
        "cell_key": cell_key(spec, cell),
        "study": spec.name,
        "model": cell.model,
        "dataset": cell.dataset,
        "grid_options": cell.grid_options,
        "model_options": dict(cell.config.model_options),
        "config_hash": config_hash(cell.config),
        "train_config": cell.config.to_dict(),
        "class_names": names,
        "image_size": list(dataset.image_size),
        "test": run.metrics.get("test", {}),
        "best_epoch": run.metrics.get("best_epoch"),
        "train_seconds": run.metrics.get("train_seconds"),
        "train_images_per_s": run.metrics.get("train_images_per_s"),
        "inference_images_per_s": round(len(test) / max(inference_seconds, 1e-9), 1),
        "history": run.history,
        "explain": {
            "methods": list(spec.methods),
            "n": n,
            "seconds_per_image": dict(assessment.seconds_per_image),
        },
        "gallery": gallery,
    }
    meta = read_run_config(cell_dir)
    record.update(parameters=meta["model"]["parameters"], macs=meta["model"]["macs"])
    record["environment"] = meta.get("environment", {})
    record["misclassified"] = _misclassified(spec, model, dataset, predicted, probs, cell_dir)
    record["quality"] = assessment.quality()
    record["metric_info"] = {m: vars(i) for m, i in assessment.metric_info.items()}
    record["agreement"] = assessment.to_json()["agreement"]
    record["sanity"] = _sanity_figure(assessment, spec.sanity_method, images[0], cell_dir)
    return record


def _misclassified(
    spec: StudySpec,
    model: torch.nn.Module,
    dataset: Dataset,
    predicted: Tensor,
    probs: Tensor,
    cell_dir: Path,
) -> dict[str, Any]:
    """The first ``spec.n_misclassified`` wrong test predictions, explained for the predicted and the true class."""
    test = dataset["test"]
    wrong = (predicted != test.labels.cpu()).nonzero().flatten()
    method = spec.misclassification_method or spec.methods[0]
    out: dict[str, Any] = {"method": method, "total": int(wrong.numel()), "figure": None, "items": []}
    chosen = wrong[: spec.n_misclassified]
    if spec.n_misclassified == 0 or chosen.numel() == 0:
        return out
    device = next(model.parameters()).device
    images = test.images[chosen]
    x = to_model_input(images.to(device), dataset.mean, dataset.std).contiguous()
    params = spec.method_params.get(method, {})
    for_predicted = explain(model, x, method, target=predicted[chosen].to(device), **params).cpu()
    for_true = explain(model, x, method, target=test.labels[chosen].to(device), **params).cpu()
    names = dataset.class_names
    titles = [(names[int(test.labels[i])], names[int(predicted[i])]) for i in chosen]
    fig = misclassification_figure(images, for_predicted, for_true, titles, method)
    save_figure(fig, cell_dir / "misclassified.png")
    out["figure"] = "misclassified.png"
    out["items"] = [
        {"index": int(i), "true": t, "predicted": p, "confidence": round(float(probs[i].max()), 4)}
        for i, (t, p) in zip(chosen.tolist(), titles, strict=True)
    ]
    return out


def _sanity_figure(
    assessment: Assessment, method: str, image: Tensor, cell_dir: Path
) -> dict[str, Any] | None:
    """Draw ``sanity.png`` from the assessment's randomisation check of ``method`` on ``image`` ``[H, W, C]``;
    the record's ``sanity`` entry (None when no check was asked for)."""
    if not method:
        return None
    curves = assessment.sanity[method]
    fig = sanity_overlay_figure(image, assessment.sanity_maps[method][:, 0], curves.layers, method)
    save_figure(fig, cell_dir / "sanity.png")
    return {**assessment.to_json()["sanity_check"][method], "figure": "sanity.png"}
