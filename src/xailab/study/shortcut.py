"""The planted-shortcut study (``kind: shortcut``): which explanation finds a shortcut the model learnt?

Each cell trains its model twice on the same images: once with the marker planted into the chosen classes
(the dataset ``shortcut`` with the study's ``dataset_options``) and once without it (the control: the same
options at strength 0, in ``<cell>/control/``). Then it

- measures how much each model relies on the marker: test accuracy with the marker on every image of the
  marked classes (``present``), on none (``removed``) and on every image of the other classes only
  (``moved``), and how often a moved marker pulls a prediction to a marked class;
- explains the first ``n_explain`` marked test images with every method that applies to the cell's model
  (the others are recorded as skipped, with what they need), for both models, for the marked
  (true) class, and scores each map by every localisation metric against the marker's exact mask;
- compares the two models' maps of the same images: the change of relevance mass on the marker, and their
  rank correlation;
- scores every method by Focus on 2x2 mosaics of clean test images (where the model takes 2H x 2W inputs);
- runs the study's usual assessment (quality metrics, sanity check, galleries) on the marked test images of
  the shortcut model, so the report's tables speak about the same images.

Everything goes into the cell's ``record.json`` under ``shortcut``; ``xailab.report`` draws it as "Which
explanation finds the shortcut?".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from xailab.data.shortcut import MarkedImageSet, ShortcutConfig, class_indices, plant_where
from xailab.data.transforms import to_model_input
from xailab.errors import ConfigError, XailabError
from xailab.explain.lrp.composites import with_dataset_bounds
from xailab.metrics import METRICS, evaluate_explanations, spearman, summarise
from xailab.metrics.base import chunked_explain, method_explainer
from xailab.metrics.localisation import LOCALISATION_METRICS, focus, mosaics
from xailab.records import CellRecord, read_cell_record
from xailab.study.runner import (
    Cell,
    CellTask,
    assess_cell,
    cell_dataset,
    cell_key,
    gallery_tiles,
    misclassified_section,
    predict_test,
    train_cell,
)
from xailab.study.spec import StudySpec
from xailab.train import Run, predict_logits

SHORTCUT_VERSION = 1
DATASET = "shortcut"
VARIANTS = ("present", "removed", "moved")
# Zhang et al.'s 15-pixel pointing-game tolerance was set for 224-pixel images: scaled to the image size.
TOLERANCE_SHARE = 15 / 224


def validate_shortcut(spec: StudySpec, where: str) -> None:
    """A ``kind: shortcut`` study plants into one dataset named ``shortcut`` whose ``dataset_options`` give
    ``base`` and a ``ShortcutConfig`` with strength above 0; a ConfigError otherwise."""
    if spec.datasets != [DATASET]:
        raise ConfigError(
            f"{where}: a shortcut study lists datasets: [shortcut] (the base dataset goes into "
            f"dataset_options.shortcut.base), got {spec.datasets}"
        )
    options = dict(spec.dataset_options.get(DATASET, {}))
    if not isinstance(options.pop("base", None), str):
        raise ConfigError(
            f"{where}: dataset_options.shortcut.base: name the dataset to plant into, e.g. mnist"
        )
    options.pop("base_root", None)
    options.pop("base_options", None)
    try:
        config = ShortcutConfig.from_options(options)
    except ConfigError as e:
        raise ConfigError(f"{where}: dataset_options.{e}") from None
    if config.strength == 0:
        raise ConfigError(
            f"{where}: dataset_options.shortcut.strength is 0: nothing to find (the control is built in)"
        )


def shortcut_config(cell: Cell) -> ShortcutConfig:
    """The planting options of ``cell`` (its dataset options without ``base``, ``base_root``, ``base_options``)."""
    options = {
        k: v for k, v in cell.config.dataset_options.items() if k not in ("base", "base_root", "base_options")
    }
    return ShortcutConfig.from_options(options)


def control_cell(cell: Cell) -> Cell:
    """``cell`` with the marker at strength 0: the same images, recipe and seed, nothing planted."""
    options = {**cell.config.dataset_options, "strength": 0.0}
    config = dataclasses.replace(cell.config, dataset_options=options)
    return dataclasses.replace(cell, name=f"{cell.name}/control", config=config)


def shortcut_key(spec: StudySpec, cell: Cell) -> str:
    """The cell key of a shortcut cell: the usual key plus this module's version (its record has more)."""
    payload = {"cell": cell_key(spec, cell), "shortcut": SHORTCUT_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def run_shortcut_cell(task: CellTask) -> dict[str, Any]:
    """Train the shortcut and the control model of one cell, assess both against the marker; the record
    (also written to ``record.json``). A record with the same key is reused."""
    spec, cell = task.spec, task.cell
    cell_dir = Path(task.study_dir) / cell.name
    key = shortcut_key(spec, cell)
    path = cell_dir / "record.json"
    if path.is_file():
        try:
            done = read_cell_record(path)
        except XailabError:
            done = None  # written atomically, so only a hand-edited file is broken: redo the cell
        if done is not None and done.cell_key == key:
            return {**done.to_dict(), "skipped": True}
    dataset = cell_dataset(cell)
    run = train_cell(cell, cell_dir, dataset, task.callbacks, task.progress)
    control = control_cell(cell)
    control_dataset = cell_dataset(control)
    control_run = train_cell(control, cell_dir / "control", control_dataset, (), task.progress)

    config = shortcut_config(cell)
    classes = class_indices(config, dataset.class_names)
    clean = control_dataset["test"]  # strength 0: the base test images untouched
    in_classes = torch.isin(clean.labels.cpu(), torch.tensor(classes))
    variants = {
        "present": plant_where(clean, in_classes, config),
        "removed": plant_where(clean, torch.zeros_like(in_classes), config),
        "moved": plant_where(clean, ~in_classes, config),
    }
    present = variants["present"]
    marked = present.subset(in_classes.nonzero().flatten()[: spec.n_explain])
    # The usual assessment, on the marked test images only, so galleries and quality tables show them.
    on_marked = dataclasses.replace(dataset, splits={**dataset.splits, "test": marked})
    assessed = assess_cell(spec, cell, run, on_marked, cell_dir)
    # ... but mistakes are searched for in the whole test split as trained (the marked images above are
    # all of the marked classes and mostly right: "0 of 128 wrong" would hide what the shortcut costs).
    assessed["misclassified"] = misclassified_section(
        spec,
        run.model.eval(),
        dataset,
        predict_test(run, dataset),
        assessed["misclassified"]["method"],
        cell_dir,
    )
    # Only the methods that apply to the cell's model (both models share its architecture): the plan
    # assess_cell made, whose skipped methods its record lists with what they need. LRP's z-B bounds: the
    # dataset's normalised range unless the study sets them, as in assess_cell.
    methods = list(assessed["explain"]["methods"])
    applied = dataclasses.replace(
        spec,
        methods=methods,
        method_params=with_dataset_bounds(spec.method_params, methods, run.mean, run.std),
    )
    section = shortcut_section(applied, config, classes, run, control_run, variants, marked, cell_dir)
    section["control_test"] = control_run.metrics.get("test", {})
    data = {**assessed, "cell_key": key, "shortcut": section}
    record = CellRecord.from_dict(data, where=f"{cell.name}:")
    record.write(cell_dir)
    return {**record.to_dict(), "skipped": False}


def reliance(
    model: nn.Module, run: Run, variants: dict[str, MarkedImageSet], classes: list[int]
) -> dict[str, Any]:
    """Per test variant: accuracy overall, on the marked classes' images and on the others, and the share of
    the other classes' images predicted as a marked class."""
    out = {}
    for name, images in variants.items():
        logits = predict_logits(model, images.images, run.mean, run.std, run.config.eval_batch_size)
        predicted = logits.argmax(1).cpu()
        labels = images.labels.cpu()
        mine = torch.isin(labels, torch.tensor(classes))
        correct = (predicted == labels).float()
        out[name] = {
            "accuracy": float(correct.mean()),
            "accuracy_marked_classes": float(correct[mine].mean()) if mine.any() else float("nan"),
            "accuracy_other_classes": float(correct[~mine].mean()) if (~mine).any() else float("nan"),
            "to_marked_class": float(torch.isin(predicted[~mine], torch.tensor(classes)).float().mean())
            if (~mine).any()
            else float("nan"),
        }
    return out


def explain_all(
    spec: StudySpec, model: nn.Module, run: Run, images: Tensor, targets: Tensor
) -> dict[str, Tensor]:
    """Every study method's maps ``[N, 1, H, W]`` (CPU) of uint8 ``images`` ``[N, H, W, C]`` for ``targets``."""
    device = next(model.parameters()).device
    x = to_model_input(images.to(device), run.mean, run.std).contiguous()
    t = targets.to(device)
    return {
        m: chunked_explain(method_explainer(m, **spec.method_params.get(m, {})), model, x, t).cpu()
        for m in spec.methods
    }


def focus_scores(
    spec: StudySpec,
    model: nn.Module,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    images: Tensor,
    labels: Tensor,
    n_max: int = 64,
) -> dict[str, dict[str, float]] | None:
    """Focus (Arias-Duart et al. 2022) of every study method on ``min(n_explain, n_max)`` seeded 2x2 mosaics
    of the clean uint8 test ``images`` ``[N, H, W, C]`` (labels ``[N]``): method -> mean and bootstrap
    interval. None when the model does not take ``2H x 2W`` inputs (a fixed-size classifier head)."""
    device = next(model.parameters()).device
    mos = mosaics(images.permute(0, 3, 1, 2), labels, min(spec.n_explain, n_max), seed=spec.seed)
    x = to_model_input(mos.inputs.permute(0, 2, 3, 1).to(device), mean, std).contiguous()
    targets = mos.targets.to(device)
    try:
        with torch.no_grad():
            model.eval()(x[:1])
    except RuntimeError:  # e.g. a Linear layer sized for H x W: no mosaics for this model
        return None
    out = {}
    for method in spec.methods:
        explain_fn = method_explainer(method, **spec.method_params.get(method, {}))
        maps = chunked_explain(explain_fn, model, x, targets)
        scores = focus(model, x, targets, maps, mask=mos.mask.to(maps.device))
        out[method] = summarise({"focus": scores.cpu()}, seed=spec.seed)["focus"]
    return out


def localisation_scores(maps: Tensor, masks: Tensor, k: int, tolerance: float) -> dict[str, Tensor]:
    """Every localisation metric of ``maps`` ``[N, 1, H, W]`` against ``masks`` ``[N, 1, H, W]``: name -> ``[N]``."""
    dummy = nn.Linear(1, 1)  # the localisation metrics read the maps and masks only
    zeros = torch.zeros(maps.shape[0], 1, *maps.shape[-2:])
    return evaluate_explanations(
        dummy,
        zeros,
        torch.zeros(maps.shape[0], dtype=torch.long),
        maps,
        metrics=list(LOCALISATION_METRICS),
        mask=masks,
        k=k,
        tolerance=tolerance,
    )


def shortcut_section(
    spec: StudySpec,
    config: ShortcutConfig,
    classes: list[int],
    run: Run,
    control_run: Run,
    variants: dict[str, MarkedImageSet],
    marked: MarkedImageSet,
    cell_dir: Path,
) -> dict[str, Any]:
    """Reliance, localisation, map differences and side-by-side galleries of one cell: the ``shortcut`` part
    of its record, for ``spec.methods`` (the caller keeps those that apply to the cell's model)."""
    models = {"shortcut": run, "control": control_run}
    targets = marked.labels
    h, w = marked.images.shape[1:3]
    k = int(marked.masks[0].sum())  # the marker's pixels: top-k intersection can then reach 1
    tolerance = TOLERANCE_SHARE * max(h, w)
    maps, localisation, logits = {}, {}, {}
    for name, r in models.items():
        model = r.model.eval()
        maps[name] = explain_all(spec, model, r, marked.images, targets)
        localisation[name] = {
            m: summarise(localisation_scores(a, marked.masks, k, tolerance), seed=spec.seed)
            for m, a in maps[name].items()
        }
        logits[name] = predict_logits(model, marked.images, r.mean, r.std, r.config.eval_batch_size).cpu()
    difference = {}
    for method in spec.methods:
        mass = {
            n: localisation_scores(maps[n][method], marked.masks, k, tolerance)["relevance_mass_accuracy"]
            for n in models
        }
        difference[method] = summarise(
            {
                "mass_shift": mass["shortcut"] - mass["control"],
                "spearman": spearman(
                    maps["shortcut"][method].flatten(1), maps["control"][method].flatten(1)
                ).float(),
            },
            seed=spec.seed,
        )
    names = list(run.class_names)
    g = min(spec.n_gallery, marked.images.shape[0])
    gallery = {}
    for name in models:
        probs = logits[name][:g].softmax(1)
        gallery[name] = gallery_tiles(
            cell_dir / f"shortcut_gallery_{name}",
            marked.images[:g],
            {m: a[:g] for m, a in maps[name].items()},
            [names[int(c)] for c in targets[:g]],
            [names[int(c)] for c in probs.argmax(1)],
            probs.amax(1).tolist(),
        )
    return {
        "config": dataclasses.asdict(config),
        "classes": [names[c] for c in classes],
        "n_marked": int(marked.images.shape[0]),
        "marker_pixels": k,
        "tolerance": tolerance,
        "reliance": {n: reliance(r.model, r, variants, classes) for n, r in models.items()},
        "localisation": localisation,
        "difference": difference,
        "metrics": list(LOCALISATION_METRICS),
        "metric_info": {
            m: {"better": METRICS.get(m).better, "description": METRICS.get(m).description}
            for m in LOCALISATION_METRICS
        },
        "gallery": gallery,
        "focus": {
            n: focus_scores(
                spec, r.model, r.mean, r.std, variants["removed"].images, variants["removed"].labels
            )
            for n, r in models.items()
        },
    }
