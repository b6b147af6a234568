"""A run is a folder: ``config.json``, ``model.safetensors``, ``checkpoint.safetensors``, ``history.csv``/``.json``,
``metrics.json``, ``predictions.csv``. This module defines the run's metadata record (``RunMeta``, the typed
``config.json``), writes it, and reads everything back, validating ``config.json`` as untrusted input."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from xailab.config import MAX_IMAGE_SIZE, bounded, from_dict, to_dict
from xailab.errors import CheckpointError, ConfigError, XailabError
from xailab.io import read_json, write_json
from xailab.models import create_model, random_init_options, size_options
from xailab.train.checkpoint import load_weights
from xailab.train.config import TrainConfig

RUN_RECORD_VERSION = 1
MAX_CLASSES = 100_000


@dataclass(frozen=True)
class SplitSizes:
    """How many images each split of a run held."""

    train: int = bounded(0, low=0)
    val: int = bounded(0, low=0)
    test: int = bounded(0, low=0)


@dataclass(frozen=True, kw_only=True)
class DatasetInfo:
    """What a run's model needs to know of its dataset: classes, normalisation (``mean``/``std`` per channel
    of images scaled to [0, 1]), input size ``(H, W)`` and channels."""

    name: str
    class_names: tuple[str, ...]
    mean: tuple[float, ...] = bounded(low=0, high=1)
    std: tuple[float, ...] = bounded(low=0, high=1, low_open=True)
    image_size: tuple[int, int] = bounded(low=1, high=MAX_IMAGE_SIZE)
    channels: int = bounded(choices=(1, 3))
    source: str = ""
    notes: tuple[str, ...] = ()
    sizes: SplitSizes = field(default_factory=SplitSizes)

    def __post_init__(self) -> None:
        if not 1 <= len(self.class_names) <= MAX_CLASSES:
            raise ConfigError(
                f"dataset.class_names: {len(self.class_names)} classes; valid: 1 to {MAX_CLASSES:,}"
            )
        for key in ("mean", "std"):
            if len(getattr(self, key)) != self.channels:
                raise ConfigError(
                    f"dataset.{key}: {list(getattr(self, key))!r} has {len(getattr(self, key))} values; "
                    f"valid: one per channel ({self.channels})"
                )


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """The run's model: name, size and where its initial weights came from."""

    name: str
    parameters: int = bounded(low=0)
    macs: int = bounded(low=0)
    options: dict[str, Any] = field(default_factory=dict)
    weights_source: str = "random init"


@dataclass(frozen=True, kw_only=True)
class RunMeta:
    """A run's ``config.json``: the recipe, the dataset and model it produced, its status and environment.

    ``status``: ``running`` while training, then ``finished`` or ``diverged``. Folders written before the
    record had a ``version`` read as version 1 (the same layout).
    """

    version: int = bounded(RUN_RECORD_VERSION, choices=(RUN_RECORD_VERSION,))
    status: Literal["running", "finished", "diverged"] = "running"
    created: str = ""
    config_hash: str = ""
    train: TrainConfig
    dataset: DatasetInfo
    model: ModelInfo
    environment: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able dict written to ``config.json``."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "config.json:") -> RunMeta:
        """Validate ``data`` (a parsed ``config.json``) field by field; errors name ``where`` and the field."""
        return from_dict(cls, data, where=where)

    def write(self, run_dir: Path) -> Path:
        """Atomically write ``run_dir/config.json``."""
        return write_json(run_dir / "config.json", self.to_dict())


@dataclass
class Run:
    """A trained (or training) model with everything needed to use it on new images.

    ``mean``/``std``: normalisation the model expects; ``image_size``: ``(H, W)``; ``channels``: C.
    """

    path: Path
    config: TrainConfig
    model: nn.Module
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: tuple[int, int]
    channels: int
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name


def read_run_meta(path: str | Path) -> RunMeta:
    """The validated ``config.json`` of run folder ``path``; a missing or corrupt file is a
    ``CheckpointError``, a bad field a ``ConfigError`` naming the file, the field and the bad value."""
    path = Path(path)
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{path} is not a run folder (no config.json); list runs with `xailab runs`")
    try:
        data = read_json(cfg)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg} is corrupt: {e}") from None
    if isinstance(data, dict):
        data.setdefault("version", RUN_RECORD_VERSION)  # written before records carried a version
    return RunMeta.from_dict(data, where=f"{cfg}:")


def read_run_config(path: str | Path) -> dict[str, Any]:
    """``read_run_meta`` as a plain dict (validated)."""
    return read_run_meta(path).to_dict()


def load_run(path: str | Path, device: str | torch.device = "cpu") -> Run:
    """Rebuild a run's model from ``config.json`` + ``model.safetensors`` (no pickle), in eval mode."""
    path = Path(path)
    meta = read_run_meta(path)
    config, ds = meta.train, meta.dataset
    # The run's own weights replace any ImageNet backbone weights, so none need to be found.
    size = size_options(config.model, ds.image_size)
    options = {**size, **config.model_options, **random_init_options(config.model)}
    model = create_model(config.model, in_channels=ds.channels, num_classes=len(ds.class_names), **options)
    load_weights(path / "model.safetensors", model)
    model.to(device).eval()
    history = read_json(path / "history.json") if (path / "history.json").is_file() else []
    metrics = read_json(path / "metrics.json") if (path / "metrics.json").is_file() else {}
    return Run(
        path, config, model, ds.class_names, ds.mean, ds.std, ds.image_size, ds.channels, history, metrics
    )


def _run_file(path: Path, empty: Any) -> Any:
    """A run's JSON file (``empty`` when absent); unreadable JSON or the wrong kind of value is a
    ``CheckpointError`` naming the file, so a listing says which file broke the run."""
    if not path.is_file():
        return empty
    try:
        value = read_json(path)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise CheckpointError(f"{path.name} is corrupt: {e}") from None
    if not isinstance(value, type(empty)):
        raise CheckpointError(f"{path.name} holds a {type(value).__name__}, not a {type(empty).__name__}")
    return value


def list_runs(root: str | Path = "runs") -> list[dict[str, Any]]:
    """One summary dict per run folder under ``root`` (searched recursively): name, model, dataset, status,
    epochs, test accuracy. A broken folder is listed with status ``broken`` and ``error`` saying why."""
    root = Path(root)
    rows = []
    for cfg in sorted(root.rglob("config.json")) if root.is_dir() else []:
        row: dict[str, Any] = {"run": str(cfg.parent.relative_to(root))}
        try:
            meta = read_run_meta(cfg.parent)
            metrics = _run_file(cfg.parent / "metrics.json", {})
            history = _run_file(cfg.parent / "history.json", [])
            accuracy = metrics.get("test", {}).get("accuracy")
            row.update(
                model=meta.train.model,
                dataset=meta.train.dataset,
                status=meta.status,
                epochs=f"{len(history)}/{meta.train.epochs}",
                test_accuracy=accuracy if isinstance(accuracy, int | float) else None,
            )
        except (XailabError, ValueError, AttributeError, TypeError) as e:  # corrupt JSON is a ValueError
            row.update(model="?", dataset="?", status="broken", epochs="?", test_accuracy=None, error=str(e))
        rows.append(row)
    return rows
