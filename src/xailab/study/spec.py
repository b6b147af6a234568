"""A study: datasets x models (x model-option grid) x explanation methods x metrics, read from YAML/TOML.

The spec is a frozen dataclass validated when it is read: an unknown key names itself and lists the valid
keys; an unknown model, dataset, method or metric suggests the nearest names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xailab.config import cell_references, folder_name, from_dict, read_config_file, to_dict
from xailab.data.base import DATASETS
from xailab.data.transforms import Sample
from xailab.errors import ConfigError, UnknownNameError
from xailab.explain.base import METHODS, resolve_method, validate_method_params
from xailab.metrics.base import METRICS, MetricPrecision
from xailab.models.base import MODELS
from xailab.records import ALL_METHODS
from xailab.train.config import TrainConfig


@dataclass(frozen=True)
class StudySpec:
    """Everything that decides a study.

    ``train``: `TrainConfig` fields shared by every cell (not ``model``/``dataset``). ``model_train``: per
    model, `TrainConfig` fields that replace ``train``'s for that model's cells (architectures need their own
    budget: ``{"vit_tiny": {"epochs": 8}}``); ``dataset_train``: the same per dataset (digits converge in fewer
    epochs than CIFAR-10: ``{"mnist": {"epochs": 4}}``). A key set for both a cell's model and its dataset is
    refused as ambiguous. ``cell_train``: per ``<model>__<dataset>`` pair (every grid option of it), fields
    that replace all of those, the most specific: one pair's budget (``{"efficient_cnn__fashion_mnist":
    {"epochs": 16}}``) without changing its model's or its dataset's other cells. ``model_options``:
    fixed options per model, e.g. ``{"keras_cnn": {"padding": "same"}}``; ``option_grid``: per model, option
    -> list of values, every combination becoming its own cell (``{"keras_cnn": {"stride": [1, 2, 3]}}``).
    ``dataset_roots``: read a dataset from this folder instead of the data dir, e.g.
    ``{"cifar10": "../shared/datasets/cifar10-subset"}``. ``n_explain`` test images are explained with every method and assessed with every metric
    (``explain_sample``: ``balanced``, the default, takes the classes in turn, so a test split stored class by
    class is not judged on its first class alone; ``first``: the first ``n_explain``, as before
    2026-11-30); the first ``n_gallery`` of them are shown in the report, with up to ``n_misclassified`` wrong predictions.
    ``sanity_method``: the method of the model-randomisation sanity check (empty string: no check; ``all``:
    every method that applies to the cell's model, on the same ``sanity_images`` images — the answer to
    "which methods pass on which architecture").
    ``metric_precision``: of the metrics' forward passes of perturbed copies: ``fp32`` (exact), ``bf16``, or
    ``auto`` (bf16 only where the autotuner measured it faster here; see ``xailab.metrics.base``).
    """

    name: str
    datasets: list[str]
    models: list[str]
    methods: list[str]
    description: str = ""
    train: dict[str, Any] = field(default_factory=dict)
    model_train: dict[str, Any] = field(default_factory=dict)
    dataset_train: dict[str, Any] = field(default_factory=dict)
    cell_train: dict[str, Any] = field(default_factory=dict)
    model_options: dict[str, Any] = field(default_factory=dict)
    option_grid: dict[str, Any] = field(default_factory=dict)
    dataset_options: dict[str, Any] = field(default_factory=dict)
    dataset_roots: dict[str, Any] = field(default_factory=dict)
    method_params: dict[str, Any] = field(default_factory=dict)
    metrics: list[str] = field(default_factory=list)
    metric_params: dict[str, Any] = field(default_factory=dict)
    n_explain: int = 16
    n_gallery: int = 4
    n_misclassified: int = 6
    misclassification_method: str = ""
    sanity_method: str = ""
    sanity_images: int = 4
    seed: int = 0
    metric_precision: MetricPrecision = "fp32"
    explain_sample: Sample = "balanced"
    # how each cell runs (xailab.study.kinds): grid, or shortcut (planted marker + control)
    kind: str = "grid"

    def to_dict(self) -> dict[str, Any]:
        """The spec as a plain JSON-able dict (stored in ``study.json``)."""
        return to_dict(self)


def _names(where: str, value: Any, registry, allow_empty: bool = False) -> list[str]:
    """``value`` as a list of registered names, or a ConfigError naming ``where`` and the valid names."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected a list of names, got {value!r}")
    if not value and not allow_empty:
        raise ConfigError(f"{where}: give at least one; valid: {', '.join(registry.names())}")
    lookup = resolve_method if registry is METHODS else registry.get  # captum:<Name> resolves as methods do
    for i, name in enumerate(value):
        try:
            lookup(name)
        except UnknownNameError as e:
            raise ConfigError(f"{where}[{i}]: {e}") from None
    return list(value)


def _check_overrides(
    where: str, spec: StudySpec, kind: str, names: list[str], model: str, dataset: str
) -> None:
    """Validate ``spec.<kind>_train`` (kind ``model`` or ``dataset``): its names are the study's, and each
    entry's keys are `TrainConfig` fields a cell reads, with values of the right type and range."""
    field_name = f"{kind}_train"
    overrides_by_name: dict[str, Any] = getattr(spec, field_name)
    _per_name(f"{where}: {field_name}", overrides_by_name, names)
    for name, overrides in overrides_by_name.items():
        _refuse_cell_keys(f"{where}: {field_name}.{name}", overrides)
        cell = {"model": name, "dataset": dataset} if kind == "model" else {"model": model, "dataset": name}
        from_dict(TrainConfig, {**spec.train, **overrides, **cell}, where=f"{where}: {field_name}.{name}")


def _refuse_cell_keys(where: str, overrides: dict[str, Any]) -> None:
    """A per-model/dataset/cell override may not set what the cell decides (its model and dataset) nor keys
    read from their own sections (options and data roots): a ConfigError naming ``where.<key>``."""
    for key in ("model", "dataset"):
        if key in overrides:
            raise ConfigError(f"{where}.{key} cannot be set: the cell decides it")
    for key, instead in (("model_options", "model_options"), ("dataset_options", "dataset_options"),
                         ("dataset_root", "dataset_roots")):  # fmt: skip
        if key in overrides:
            raise ConfigError(f"{where}.{key} is not read; set it under {instead}")


def _check_cell_overrides(where: str, spec: StudySpec, models: list[str], datasets: list[str]) -> None:
    """Validate ``spec.cell_train``: each key a ``<model>__<dataset>`` pair of the study, each entry's keys
    `TrainConfig` fields a cell reads, with values of the right type and range (over the pair's own layers)."""
    pairs = [f"{m}__{d}" for d in datasets for m in models]
    _per_name(f"{where}: cell_train", spec.cell_train, pairs)
    for pair, overrides in spec.cell_train.items():
        model, dataset = pair.split("__", 1)
        _refuse_cell_keys(f"{where}: cell_train.{pair}", overrides)
        layers = {**spec.train, **spec.dataset_train.get(dataset, {}), **spec.model_train.get(model, {})}
        cell = {"model": model, "dataset": dataset}
        from_dict(TrainConfig, {**layers, **overrides, **cell}, where=f"{where}: cell_train.{pair}")


def _per_name(where: str, value: dict[str, Any], valid: list[str]) -> None:
    """Check that every key of a per-model/dataset/method mapping is one of ``valid`` and maps to a mapping."""
    for key, options in value.items():
        if key not in valid:
            raise ConfigError(f"{where}: {key!r} is not in the study; valid: {', '.join(valid)}")
        if not isinstance(options, dict):
            raise ConfigError(f"{where}.{key}: expected a mapping of option -> value, got {options!r}")


def validate(spec: StudySpec, where: str) -> StudySpec:
    """Check names, per-name mappings, the training recipe and counts; return ``spec`` with lists cleaned."""
    folder_name(spec.name, f"{where}: name")  # the study's folder: never a path that leaves --out
    datasets = _names(f"{where}: datasets", spec.datasets, DATASETS)
    models = _names(f"{where}: models", spec.models, MODELS)
    methods = _names(f"{where}: methods", spec.methods, METHODS)
    metrics = _names(f"{where}: metrics", spec.metrics, METRICS, allow_empty=True)
    for key in ("model", "dataset"):
        if key in spec.train:
            raise ConfigError(f"{where}: train.{key} is set per cell; list it under {key}s instead")
    from_dict(
        TrainConfig, {"model": models[0], "dataset": datasets[0], **spec.train}, where=f"{where}: train"
    )
    for kind, names in (("model", models), ("dataset", datasets)):
        _check_overrides(where, spec, kind, names, models[0], datasets[0])
    for model, by_model in spec.model_train.items():
        for dataset, by_dataset in spec.dataset_train.items():
            both = sorted(set(by_model) & set(by_dataset))
            if both:
                raise ConfigError(
                    f"{where}: {', '.join(both)} set in both model_train.{model} and dataset_train.{dataset}: "
                    f"the {model} x {dataset} cell would not know which to use; set it in one of them"
                )
    _check_cell_overrides(where, spec, models, datasets)
    _per_name(f"{where}: model_options", spec.model_options, models)
    check_cell_references(where, spec, models)
    _per_name(f"{where}: dataset_options", spec.dataset_options, datasets)
    for dataset, options in spec.dataset_options.items():  # a misspelt option is never ignored
        DATASETS.get(dataset).check_options(options, where=f"{where}: dataset_options.{dataset}")
    _per_name(f"{where}: method_params", spec.method_params, methods)
    # a misspelt method parameter fails now, not after every cell has trained
    method_params = {
        method: _checked(f"{where}: method_params.{method}", method, params)
        for method, params in spec.method_params.items()
    }
    for dataset, root in spec.dataset_roots.items():
        if dataset not in datasets:
            raise ConfigError(
                f"{where}: dataset_roots: {dataset!r} is not in the study; valid: {', '.join(datasets)}"
            )
        if not isinstance(root, str):
            raise ConfigError(f"{where}: dataset_roots.{dataset}: expected a folder path, got {root!r}")
    _per_name(f"{where}: option_grid", spec.option_grid, models)
    for model, grid in spec.option_grid.items():
        for option, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(
                    f"{where}: option_grid.{model}.{option}: expected a non-empty list, got {values!r}"
                )
    for key in ("n_explain", "n_gallery", "sanity_images"):
        if getattr(spec, key) < 1:
            raise ConfigError(f"{where}: {key} must be at least 1, got {getattr(spec, key)}")
    if spec.n_misclassified < 0:
        raise ConfigError(f"{where}: n_misclassified must be >= 0, got {spec.n_misclassified}")
    if spec.kind != "grid":  # the kinds' registry imports the runner, which imports this module: look up late
        from xailab.study.kinds import CELL_RUNNERS

        try:
            CELL_RUNNERS.get(spec.kind)
        except UnknownNameError as e:
            raise ConfigError(f"{where}: kind: {e}") from None
    if spec.kind == "shortcut":
        from xailab.study.shortcut import validate_shortcut

        validate_shortcut(spec, where)
    for key in ("misclassification_method", "sanity_method"):
        value = getattr(spec, key)
        if value and value not in methods and not (key == "sanity_method" and value == ALL_METHODS):
            extra = f" or {ALL_METHODS!r}" if key == "sanity_method" else ""
            raise ConfigError(
                f"{where}: {key} {value!r} is not one of the study's methods: {', '.join(methods)}{extra}"
            )
    return dataclasses.replace(
        spec, datasets=datasets, models=models, methods=methods, metrics=metrics, method_params=method_params
    )


def check_cell_references(where: str, spec: StudySpec, models: list[str]) -> None:
    """A ``model_options`` value ``"cell:<model>"`` starts that option's weights from the same dataset's cell
    of ``<model>``, so that cell must exist and train first: ``<model>`` is one of the study's models listed
    before the one that refers to it, has no option grid (one cell per dataset) and refers to no cell itself
    (cells train in one or two waves). Only grid studies resolve references."""
    for option in cell_references(spec.train.get("model_options", {})):
        raise ConfigError(
            f"{where}: train.model_options.{option}: a cell reference is per model; set it under "
            f"model_options.<model>.{option}"
        )
    for model, options in spec.model_options.items():
        for option, member in cell_references(options).items():
            at = f"{where}: model_options.{model}.{option}: {options[option]!r}"
            if spec.kind != "grid":
                raise ConfigError(f"{at}: only a grid study trains the cells it refers to; give a file path")
            if member not in models:
                raise ConfigError(f"{at}: {member!r} is not one of the study's models ({', '.join(models)})")
            if models.index(member) >= models.index(model):
                raise ConfigError(
                    f"{at}: {member!r} must be listed before {model!r} in models, so that it trains first"
                )
            if spec.option_grid.get(member):
                raise ConfigError(f"{at}: {member!r} has an option grid, so it has several cells per dataset")
            if cell_references(spec.model_options.get(member, {})):
                raise ConfigError(
                    f"{at}: {member!r} refers to another cell itself; refer to trained cells only"
                )


def _checked(where: str, method: str, params: dict[str, Any]) -> dict[str, Any]:
    """``validate_method_params`` with ``where`` in front of its message."""
    try:
        return validate_method_params(method, params)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def spec_from_dict(data: dict[str, Any], where: str = "study") -> StudySpec:
    """Build and validate a ``StudySpec`` from a plain dict (a parsed YAML/TOML file)."""
    spec = from_dict(StudySpec, data, where=where)
    return validate(spec, where)


def read_study(path: str | Path) -> StudySpec:
    """Read and validate a study file (``.yaml``/``.yml``/``.toml``); a missing ``name`` is the file's stem."""
    path = Path(path)
    data = read_config_file(path)
    data.setdefault("name", path.stem)
    return spec_from_dict(data, where=f"study file {path}")
