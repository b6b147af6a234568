"""Running a study: expand its cells, train (or resume, or skip) each, explain and assess its test images,
and store one JSON result record per cell for the report.

A cell is one model (with one combination of grid options) on one dataset and lives in
``<out>/<study>/<cell name>/``: the training run's files (``config.json``, ``model.safetensors``, ...) plus
``explanations.safetensors``, the figures and tiles of the report, and ``record.json``, written last and
atomically. A re-run skips a cell whose record carries the same cell key (recipe + explanation settings),
reuses a finished training run of the same recipe, and resumes a run killed mid-training from its last
checkpoint, so an interrupted study loses at most the epoch in progress.

A study may list methods that apply to some of its models only (the transformer methods need a ViT's
attention and tokens, LRP a CNN's convolutions; a method declares what it ``needs``). Each cell explains and
assesses the methods that apply to its model and records the others with what they need
(``CellRecord.skipped_methods``); ``check_methods_apply`` refuses, before anything trains, a method that
applies to no model of the study. A cell on a two-class dataset also gets galleries of its true and false
positives and negatives (``CellRecord.quadrants``, positive = class index 1).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor, nn

from xailab.config import CELL_REFERENCE, cell_references
from xailab.data import Dataset, load_dataset
from xailab.data.transforms import sample_indices, to_model_input
from xailab.device import resolve_device
from xailab.errors import CheckpointError, ConfigError, XailabError
from xailab.explain.base import explain, model_capabilities, resolve_method
from xailab.explain.figures import overlay, save_figure, to_rgb
from xailab.explain.lrp.composites import with_dataset_bounds
from xailab.io import atomic_write, remove_orphans
from xailab.metrics.assessment import Assessment, assess, remove_parts
from xailab.models import create_model, model_input_size, random_init_options, size_options
from xailab.records import (
    ALL_METHODS,
    CELL_RECORD_VERSION,
    QUADRANTS,
    CellRecord,
    SkippedMethod,
    read_cell_record,
)
from xailab.report.assessment import sanity_overlay_figure
from xailab.study.spec import StudySpec
from xailab.train import Run, TrainConfig, load_run, predict_logits, train
from xailab.train.ema import flip_average
from xailab.train.loop import config_hash
from xailab.train.runs import read_run_config, read_run_meta

# Part of every cell key. It stayed 1 when records reached version 2 (skipped methods, quadrants): a finished
# cell's record stays valid, only a two-class cell without quadrants is redone (``record_is_current``).
CELL_KEY_VERSION = 1
# Keys that pick the cells and their recipe: the recipe's own hash covers them, so the other cells' keys stay
# the same when a model or dataset is added to the study.
CELL_DEFINING_KEYS = frozenset(
    (
        "name",
        "description",
        "datasets",
        "models",
        "train",
        "model_train",
        "dataset_train",
        "cell_train",
        "model_options",
        "option_grid",
        "dataset_options",
        "dataset_roots",
        "kind",
    )
)
# Gallery tiles are upscaled (nearest neighbour) to about this size, so 8x8 digits stay crisp.
TILE_PIXELS = 96
# A cell's assessment keeps each finished method here until the cell's record is written (resumable).
PARTS_DIR = "assessment-parts"


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
                        **spec.dataset_train.get(dataset, {}),
                        **spec.model_train.get(model, {}),  # no key is in both (checked)
                        **spec.cell_train.get(f"{model}__{dataset}", {}),  # the most specific wins
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
    return [_pin_references(cell, cells) for cell in cells]


def _pin_references(cell: Cell, cells: list[Cell]) -> Cell:
    """``cell`` with each ``"cell:<model>"`` option pinned to that cell's recipe (``"cell:<model>@<hash>"``):
    the hash enters the cell's own recipe hash, so retraining a member with another recipe retrains the
    cells built on it, while the study folder can still move (no path is hashed)."""
    refs = cell_references(cell.config.model_options)
    if not refs:
        return cell
    options = dict(cell.config.model_options)
    for option, member in refs.items():
        target = next(c for c in cells if c.model == member and c.dataset == cell.dataset)  # validated
        options[option] = f"{CELL_REFERENCE}{member}@{config_hash(target.config)}"
    return dataclasses.replace(cell, config=dataclasses.replace(cell.config, model_options=options))


def resolve_cell_references(cell: Cell, study_dir: Path) -> dict[str, Any] | None:
    """The cell's model options with each ``"cell:<model>@<hash>"`` replaced by the path of that cell's
    ``model.safetensors`` in ``study_dir``, or None when it refers to no cell. The referenced cell must
    have finished training with the pinned recipe, else a CheckpointError says which and what to do."""
    refs = cell_references(cell.config.model_options)
    if not refs:
        return None
    options = dict(cell.config.model_options)
    for option, member in refs.items():
        pinned = options[option].split("@")[1]
        member_dir = study_dir / cell_name(member, cell.dataset, {})
        weights = member_dir / "model.safetensors"
        meta = read_run_meta(member_dir) if (member_dir / "config.json").is_file() else None
        if meta is None or meta.status != "finished" or not weights.is_file() or meta.config_hash != pinned:
            found = "nothing" if meta is None else f"a {meta.status} run of recipe {meta.config_hash}"
            raise CheckpointError(
                f"cell {cell.name}: model_options.{option} needs the weights of cell {member_dir.name} trained "
                f"to the end with recipe {pinned}; {member_dir} holds {found}. Run the study again: it trains "
                f"{member_dir.name} first (or --redo {member_dir.name})"
            )
        options[option] = str(weights)
    return options


def has_cell_references(cell: Cell) -> bool:
    """Whether the cell starts from another cell's weights (so it must train after that cell)."""
    return bool(cell_references(cell.config.model_options))


def cell_key(spec: StudySpec, cell: Cell) -> str:
    """A short hash of what decides a cell's record: the recipe (with its epoch budget) and the explanation
    and metric settings. A record with the same key is reused as it is."""
    explain_part = {k: v for k, v in spec.to_dict().items() if k not in CELL_DEFINING_KEYS}
    if explain_part.get("metric_precision") == "fp32":  # the default: records from before the key stay valid
        del explain_part["metric_precision"]
    if explain_part.get("explain_sample") == "first":  # how records were made before the key: still valid
        del explain_part["explain_sample"]
    payload = {
        "version": CELL_KEY_VERSION,
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
    return record if record.cell_key == cell_key(spec, cell) and record_is_current(record) else None


def record_is_current(record: CellRecord) -> bool:
    """Whether a record holds what this runner writes: a two-class cell's record written before version 2
    lacks the true/false positive/negative galleries, so the cell is re-assessed (its training is reused)."""
    return len(record.class_names) != 2 or record.quadrants is not None


# ---------------------------------------------------------------------------------------------------------
# Which of the study's methods apply to which cell
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodPlan:
    """The study's methods split for one model: those that apply to it (in study order) and the skipped
    ones with the capabilities they need that the model lacks."""

    applicable: tuple[str, ...]
    skipped: dict[str, SkippedMethod]


def plan_methods(methods: Sequence[str], capabilities: frozenset[str]) -> MethodPlan:
    """Split ``methods`` by whether a model offering ``capabilities`` (``model_capabilities``) meets each
    method's ``needs``."""
    applicable: list[str] = []
    skipped: dict[str, SkippedMethod] = {}
    for method in methods:
        missing = resolve_method(method).needs - capabilities
        if missing:
            skipped[method] = SkippedMethod(needs=tuple(sorted(missing)), offers=tuple(sorted(capabilities)))
        else:
            applicable.append(method)
    return MethodPlan(tuple(applicable), skipped)


def cell_capabilities(cell: Cell) -> frozenset[str]:
    """What the cell's model offers explanation methods, from a freshly built model (random weights, never
    loaded: its structure decides, e.g. a ``Conv2d`` or a ViT's declared attention and tokens)."""
    cfg = cell.config
    size = cfg.image_size or model_input_size(cfg.model)[0]
    options = {**size_options(cfg.model, (size, size)), **cfg.model_options, **random_init_options(cfg.model)}
    return model_capabilities(create_model(cfg.model, in_channels=cfg.channels or 3, **options))


def check_methods_apply(spec: StudySpec, cells: Sequence[Cell]) -> dict[str, MethodPlan]:
    """Before anything trains: each of the study's methods must apply to at least one cell's model, and each
    cell must keep at least one method, else a ConfigError naming the method (or cell) and what the models
    offer. Returns each cell's plan. Models are built only when a method needs a capability."""
    if not any(resolve_method(m).needs for m in spec.methods):
        return {c.name: MethodPlan(tuple(spec.methods), {}) for c in cells}
    built: dict[str, frozenset[str]] = {}  # cells sharing a model and options share one build
    plans: dict[str, MethodPlan] = {}
    for cell in cells:
        what = json.dumps(
            [cell.model, cell.config.model_options, cell.config.image_size], sort_keys=True, default=str
        )
        if what not in built:
            built[what] = cell_capabilities(cell)
        plans[cell.name] = plan_methods(spec.methods, built[what])
    for method in spec.methods:
        if all(method in plan.skipped for plan in plans.values()):
            offers = "; ".join(
                f"{name} offers {', '.join(plan.skipped[method].offers) or 'nothing'}"
                for name, plan in plans.items()
            )
            needs = ", ".join(sorted(resolve_method(method).needs))
            raise ConfigError(
                f"study {spec.name}: methods: {method!r} applies to none of the study's models "
                f"({', '.join(spec.models)}): it needs a model with {needs} ({offers}). Remove it from methods "
                f"or add a model that offers {needs}"
            )
    for name, plan in plans.items():
        if not plan.applicable:
            raise ConfigError(
                f"study {spec.name}: cell {name} has no method that applies to its model (skipped: "
                + "; ".join(f"{m} {s.reason}" for m, s in plan.skipped.items())
                + "); add a method that applies to every model, e.g. saliency or gradcam"
            )
    return plans


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
            model_options=resolve_cell_references(cell, cell_dir.parent),
        )
    meta = read_run_meta(cell_dir)
    if meta.config_hash != config_hash(cell.config):
        raise CheckpointError(
            f"{cell_dir} holds a run of another recipe (config hash {meta.config_hash} != "
            f"{config_hash(cell.config)}); run the study with --redo {cell.name} (deletes that folder first) or with "
            "another --out"
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
        model_options=resolve_cell_references(cell, cell_dir.parent),
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
    data = assess_cell(spec, cell, run, dataset, cell_dir, quadrants=True)
    record = CellRecord.from_dict(data, where=f"{cell.name}:")
    record.write(cell_dir)
    remove_parts(cell_dir / PARTS_DIR)
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
    *,
    indices: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """One input tile and one overlay tile per method for each image ``[N, H, W, C]`` (maps ``[N, 1, H, W]``),
    written to ``out``; returns per image its index in the test split (``indices``, default ``0..N-1``),
    label, prediction and the tiles' paths relative to the cell."""
    rows = []
    for i in range(images.shape[0]):
        rows.append(
            {
                "index": int(indices[i]) if indices is not None else i,
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


@dataclass(frozen=True)
class Predictions:
    """A trained cell's predictions on its whole test split: classes ``[N]`` and probabilities ``[N, K]``
    (CPU), and the measured inference speed."""

    predicted: Tensor
    probs: Tensor
    images_per_s: float


def predict_test(run: Run, dataset: Dataset) -> Predictions:
    """Classify every test image of ``dataset`` ``[N, H, W, C]`` as the run's test accuracy was measured: with
    the recipe's test-time augmentation (``run.config.tta``), so the report's counts of right and wrong images
    agree with its accuracy. The speed is timed on the plain pass: the model's own, comparable across cells.
    """
    test = dataset["test"]
    model = run.model.eval()
    t0 = time.perf_counter()
    logits = predict_logits(model, test.images, dataset.mean, dataset.std, run.config.eval_batch_size)
    seconds = time.perf_counter() - t0
    if run.config.tta == "flip":
        mirrored = predict_logits(
            model, test.images.flip(2), dataset.mean, dataset.std, run.config.eval_batch_size
        )
        logits = flip_average(logits, mirrored)
    probs = logits.softmax(1).cpu()
    return Predictions(probs.argmax(1), probs, round(len(test) / max(seconds, 1e-9), 1))


def explaining_method(preferred: str, plan: MethodPlan) -> str:
    """The method that explains misclassified and quadrant images: ``preferred`` (the study's
    ``misclassification_method``) when it applies to the cell's model, else the first study method that does."""
    return preferred if preferred in plan.applicable else plan.applicable[0]


def explain_images(
    spec: StudySpec, model: nn.Module, dataset: Dataset, indices: Tensor, targets: Tensor, method: str
) -> Tensor:
    """``method``'s maps ``[N, 1, H, W]`` (CPU) of the test images at ``indices`` ``[N]`` for ``targets`` ``[N]``."""
    device = next(model.parameters()).device
    x = to_model_input(dataset["test"].images[indices].to(device), dataset.mean, dataset.std).contiguous()
    return explain(model, x, method, target=targets.to(device), **spec.method_params.get(method, {})).cpu()


def assess_cell(
    spec: StudySpec,
    cell: Cell,
    run: Run,
    dataset: Dataset,
    cell_dir: Path,
    *,
    quadrants: bool = False,
) -> dict[str, Any]:
    """Explain ``spec.n_explain`` test images (``spec.explain_sample``: balanced over the classes, or the
    first) with every method that applies to the cell's model,
    score the maps with every metric, compare the methods, run the sanity check and draw the cell's tiles and
    figures; the cell's record. ``quadrants``: on a two-class dataset, also the galleries of true and false
    positives and negatives. LRP's z-B rule is bounded by the dataset's normalised data range unless the
    study's ``method_params`` set the bounds (``with_dataset_bounds``)."""
    model = run.model.eval()
    plan = plan_methods(spec.methods, model_capabilities(model))
    key = cell_key(spec, cell)  # of the study as written, before the dataset's defaults are filled in
    bounded = with_dataset_bounds(spec.method_params, plan.applicable, dataset.mean, dataset.std)
    spec = dataclasses.replace(spec, method_params=bounded)
    names = list(dataset.class_names)
    test = dataset["test"]
    pred = predict_test(run, dataset)
    labels = test.labels.cpu()

    chosen = sample_indices(labels, spec.n_explain, spec.explain_sample)  # [n] test indices
    n = chosen.numel()
    images, labels, predicted = test.images[chosen], labels[chosen], pred.predicted[chosen]
    confidence = pred.probs[chosen].amax(1)
    device = next(model.parameters()).device
    x = to_model_input(images.to(device), dataset.mean, dataset.std).contiguous()
    sanity_methods = sanity_plan(spec.sanity_method, plan.applicable, spec.misclassification_method)
    assessment = assess(
        model,
        x,
        predicted.to(device),
        plan.applicable,
        spec.metrics,
        model_name=cell.name,
        method_params=spec.method_params,
        metric_params=spec.metric_params,
        seed=spec.seed,
        sanity_methods=sanity_methods,
        sanity_images=spec.sanity_images,
        sanity_seed=spec.seed + 42,
        n_examples=1,
        agreement=True,
        precision=spec.metric_precision,
        resume_dir=cell_dir / PARTS_DIR,  # a killed study resumes inside the assessment, method by method
    )
    maps = dict(assessment.maps)
    tensors = {f"map.{m}": t.contiguous() for m, t in maps.items()}
    tensors.update(
        images=images.contiguous(), labels=labels.clone(), predictions=predicted.clone(), indices=chosen
    )
    atomic_write(cell_dir / "explanations.safetensors", lambda p: save_file(tensors, str(p)))

    g = min(spec.n_gallery, n)
    gallery = gallery_tiles(
        cell_dir / "gallery",
        images[:g],
        {m: t[:g] for m, t in maps.items()},
        [names[int(c)] for c in labels[:g]],
        [names[int(c)] for c in predicted[:g]],
        confidence[:g].tolist(),
        indices=chosen[:g].tolist(),  # the images' indices in the test split, as the report names them
    )

    record: dict[str, Any] = {
        "version": CELL_RECORD_VERSION,
        "cell": cell.name,
        "cell_key": key,
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
        "inference_images_per_s": pred.images_per_s,
        "history": run.history,
        "explain": {
            "methods": list(plan.applicable),
            "n": n,
            "sample": spec.explain_sample,  # which test images: balanced over the classes, or the first n
            "seconds_per_image": dict(assessment.seconds_per_image),
        },
        "skipped_methods": {m: dataclasses.asdict(s) for m, s in plan.skipped.items()},
        "gallery": gallery,
    }
    meta = read_run_config(cell_dir)
    record.update(parameters=meta["model"]["parameters"], macs=meta["model"]["macs"])
    record["environment"] = meta.get("environment", {})
    method = explaining_method(spec.misclassification_method, plan)
    record["misclassified"] = misclassified_section(spec, model, dataset, pred, method, cell_dir)
    if quadrants and len(names) == 2:
        record["quadrants"] = quadrant_galleries(spec, model, dataset, pred, method, cell_dir)
    record["quality"] = assessment.quality()
    record["chance"] = assessment.chance  # the metrics' level on random maps, which a method must beat
    record["metric_info"] = {m: vars(i) for m, i in assessment.metric_info.items()}
    record["agreement"] = assessment.to_json()["agreement"]
    record["sanity"] = _sanity_figure(
        assessment, sanity_methods[0] if sanity_methods else "", images[0], cell_dir
    )
    if len(sanity_methods) > 1:  # ``sanity_method: all``: every checked method's curves, for the verdicts
        record["sanity_by_method"] = assessment.to_json()["sanity_check"]
    return record


def misclassified_section(
    spec: StudySpec, model: nn.Module, dataset: Dataset, pred: Predictions, method: str, cell_dir: Path
) -> dict[str, Any]:
    """The first ``spec.n_misclassified`` wrong test predictions ``pred`` of ``dataset``'s test split,
    explained by ``method`` for the predicted and the true class; ``total`` wrong of ``searched`` images."""
    test = dataset["test"]
    labels = test.labels.cpu()
    wrong = (pred.predicted != labels).nonzero().flatten()
    out: dict[str, Any] = {
        "method": method, "total": int(wrong.numel()), "searched": len(test), "figure": None, "items": []
    }  # fmt: skip
    chosen = wrong[: spec.n_misclassified]
    if spec.n_misclassified == 0 or chosen.numel() == 0:
        return out
    for_predicted = explain_images(spec, model, dataset, chosen, pred.predicted[chosen], method)
    for_true = explain_images(spec, model, dataset, chosen, labels[chosen], method)
    names = dataset.class_names
    titles = [(names[int(labels[i])], names[int(pred.predicted[i])]) for i in chosen]
    fig = misclassification_figure(test.images[chosen], for_predicted, for_true, titles, method)
    save_figure(fig, cell_dir / "misclassified.png")
    out["figure"] = "misclassified.png"
    out["items"] = [
        {"index": int(i), "true": t, "predicted": p, "confidence": round(float(pred.probs[i].max()), 4)}
        for i, (t, p) in zip(chosen.tolist(), titles, strict=True)
    ]
    return out


def quadrant_indices(labels: Tensor, predicted: Tensor) -> dict[str, Tensor]:
    """Test indices (in test order) of each outcome of a two-class task, the positive class being class
    index 1: ``TP`` (1 predicted 1), ``FP`` (0 predicted 1), ``TN`` (0 predicted 0), ``FN`` (1 predicted 0).
    ``labels``, ``predicted``: ``[N]``."""
    positive, called = labels == 1, predicted == 1
    masks = {
        "TP": positive & called,
        "FP": ~positive & called,
        "TN": ~positive & ~called,
        "FN": positive & ~called,
    }
    return {q: masks[q].nonzero().flatten() for q in QUADRANTS}


def quadrant_galleries(
    spec: StudySpec, model: nn.Module, dataset: Dataset, pred: Predictions, method: str, cell_dir: Path
) -> dict[str, Any]:
    """The ``quadrants`` entry of a two-class cell: the count of each outcome on the test split and up to
    ``spec.n_gallery`` images of each (the first in test order), explained by ``method`` for the predicted
    class, as tiles in ``quadrant_<TP|FP|TN|FN>/``."""
    test = dataset["test"]
    names = dataset.class_names
    found = quadrant_indices(test.labels.cpu(), pred.predicted)
    galleries: dict[str, list[dict[str, Any]]] = {}
    for q in QUADRANTS:
        chosen = found[q][: spec.n_gallery]
        maps = (
            {method: explain_images(spec, model, dataset, chosen, pred.predicted[chosen], method)}
            if chosen.numel()
            else {}
        )
        galleries[q] = gallery_tiles(
            cell_dir / f"quadrant_{q}",
            test.images[chosen],
            maps,
            [names[int(test.labels[i])] for i in chosen],
            [names[int(pred.predicted[i])] for i in chosen],
            pred.probs[chosen].amax(1).tolist(),
            indices=chosen.tolist(),
        )
    return {
        "method": method,
        "positive": names[1],
        "negative": names[0],
        "counts": {q: int(found[q].numel()) for q in QUADRANTS},
        "galleries": galleries,
    }


def sanity_plan(sanity_method: str, applicable: Sequence[str], preferred: str = "") -> list[str]:
    """The methods a cell's sanity check runs: none (``""``), ``sanity_method`` when it applies to the cell's
    model, or with ``all`` every ``applicable`` method — ``preferred`` (the misclassification method) first,
    as the one whose figure the cell draws."""
    if sanity_method == ALL_METHODS:
        return sorted(applicable, key=lambda m: m != preferred)
    return [sanity_method] if sanity_method in applicable else []


def _sanity_figure(
    assessment: Assessment, method: str, image: Tensor, cell_dir: Path
) -> dict[str, Any] | None:
    """Draw ``sanity.png`` from the assessment's randomisation check of ``method`` on ``image`` ``[H, W, C]``;
    the record's ``sanity`` entry (None when no check was asked for, or its method does not apply)."""
    if not method:
        return None
    curves = assessment.sanity[method]
    fig = sanity_overlay_figure(image, assessment.sanity_maps[method][:, 0], curves.layers, method)
    save_figure(fig, cell_dir / "sanity.png")
    return {**assessment.to_json()["sanity_check"][method], "figure": "sanity.png"}
