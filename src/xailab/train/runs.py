"""A run is a folder: ``config.json``, ``model.safetensors``, ``checkpoint.safetensors``, ``history.csv``/``.json``,
``metrics.json``, ``predictions.csv``. This module reads them back."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xailab.errors import CheckpointError
from xailab.io import read_json
from xailab.models import create_model, random_init_options, size_options
from xailab.train.checkpoint import load_weights
from xailab.train.config import TrainConfig


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


def read_run_config(path: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a run folder, with a clear error when it is not a run."""
    path = Path(path)
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{path} is not a run folder (no config.json); list runs with `xailab runs`")
    try:
        return read_json(cfg)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg} is corrupt: {e}") from None


def load_run(path: str | Path, device: str | torch.device = "cpu") -> Run:
    """Rebuild a run's model from ``config.json`` + ``model.safetensors`` (no pickle), in eval mode."""
    path = Path(path)
    meta = read_run_config(path)
    config = TrainConfig.from_dict(meta["train"])
    ds = meta["dataset"]
    # The run's own weights replace any ImageNet backbone weights, so none need to be found.
    size = size_options(config.model, tuple(ds["image_size"]))
    options = {**size, **config.model_options, **random_init_options(config.model)}
    model = create_model(
        config.model, in_channels=ds["channels"], num_classes=len(ds["class_names"]), **options
    )
    load_weights(path / "model.safetensors", model)
    model.to(device).eval()
    history = read_json(path / "history.json") if (path / "history.json").is_file() else []
    metrics = read_json(path / "metrics.json") if (path / "metrics.json").is_file() else {}
    return Run(
        path,
        config,
        model,
        tuple(ds["class_names"]),
        tuple(ds["mean"]),
        tuple(ds["std"]),
        tuple(ds["image_size"]),
        ds["channels"],
        history,
        metrics,
    )


def list_runs(root: str | Path = "runs") -> list[dict[str, Any]]:
    """One summary dict per run folder under ``root`` (searched recursively): name, model, dataset, status,
    epochs, test accuracy."""
    root = Path(root)
    rows = []
    for cfg in sorted(root.rglob("config.json")) if root.is_dir() else []:
        try:
            meta = read_json(cfg)
            train = meta["train"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # not one of ours
        metrics = read_json(cfg.parent / "metrics.json") if (cfg.parent / "metrics.json").is_file() else {}
        history = read_json(cfg.parent / "history.json") if (cfg.parent / "history.json").is_file() else []
        rows.append(
            {
                "run": str(cfg.parent.relative_to(root)),
                "model": train["model"],
                "dataset": train["dataset"],
                "status": meta.get("status", "?"),
                "epochs": f"{len(history)}/{train['epochs']}",
                "test_accuracy": metrics.get("test", {}).get("accuracy"),
            }
        )
    return rows
