"""The public Python API. The CLI, the web app and notebooks all call these functions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from xailab.data import list_datasets, load_dataset
from xailab.data.transforms import resize_uint8, to_channels
from xailab.errors import ConfigError, DatasetError
from xailab.explain import METHODS, explain, list_methods
from xailab.explain.export import explain_to_disk
from xailab.models import create_model, list_models, model_input_size, random_init_options
from xailab.train import Run, TrainConfig, classification_metrics, list_runs, load_run, predict_logits, train

__all__ = [
    "Run",
    "TrainConfig",
    "create_model",
    "evaluate",
    "explain",
    "explain_run",
    "explain_untrained",
    "list_datasets",
    "list_methods",
    "list_models",
    "list_runs",
    "load_dataset",
    "load_run",
    "predict",
    "read_images",
    "train",
]


def _as_run(run: Run | str | Path, device: str | torch.device = "cpu") -> Run:
    return run if isinstance(run, Run) else load_run(run, device=device)


def evaluate(
    run: Run | str | Path, split: str = "test", data_dir: str | None = None, dataset_root: str | None = None
) -> dict[str, Any]:
    """Metrics of a trained run on a split of its dataset (accuracy, macro-F1, confusion matrix, ...)."""
    run = _as_run(run)
    cfg = run.config
    ds = load_dataset(
        cfg.dataset,
        data_dir=data_dir or cfg.data_dir,
        root=dataset_root or cfg.dataset_root,
        image_size=run.image_size,
        channels=run.channels,
        **cfg.dataset_options,
    )
    split_set = ds[split]
    logits = predict_logits(run.model, split_set.images, run.mean, run.std, cfg.eval_batch_size)
    return classification_metrics(logits, split_set.labels, run.class_names)


def read_images(paths: Sequence[str | Path], image_size: tuple[int, int], channels: int) -> torch.Tensor:
    """Decode image files into uint8 ``[N, H, W, C]`` at ``image_size`` with ``channels`` channels."""
    arrays = []
    for path in paths:
        try:
            with Image.open(path) as im:
                im.load()
                arr = np.asarray(im.convert("L" if channels == 1 else "RGB"))
        except (FileNotFoundError, IsADirectoryError):
            raise DatasetError(f"{path}: no such image file") from None
        except (UnidentifiedImageError, OSError) as e:
            raise DatasetError(f"{path}: not a readable image ({e})") from None
        x = torch.from_numpy(arr.copy()).reshape(arr.shape[0], arr.shape[1], channels)
        arrays.append(resize_uint8(x[None], image_size)[0])
    return torch.stack(arrays) if arrays else torch.empty(0, *image_size, channels, dtype=torch.uint8)


def predict(
    run: Run | str | Path, images: Sequence[str | Path] | torch.Tensor, top_k: int = 3
) -> list[list[tuple[str, float]]]:
    """Top-``k`` (class name, probability) for each image file (or uint8 ``[N, H, W, C]`` tensor)."""
    run = _as_run(run)
    x = images if isinstance(images, torch.Tensor) else read_images(images, run.image_size, run.channels)
    x = to_channels(resize_uint8(x, run.image_size), run.channels)
    probs = predict_logits(run.model, x, run.mean, run.std).softmax(1)
    p, idx = probs.topk(min(top_k, probs.shape[1]), dim=1)
    return [
        [(run.class_names[c], float(q)) for c, q in zip(ci.tolist(), pi.tolist(), strict=True)]
        for ci, pi in zip(idx, p, strict=True)
    ]


def _method_list(methods: Sequence[str] | None) -> list[str]:
    """The chosen methods (default: all); unknown names raise an error suggesting the nearest."""
    chosen = list(methods) if methods else list_methods()
    for m in chosen:
        if not m.startswith("captum:"):
            METHODS.get(m)
    return chosen


def explain_run(
    run: Run | str | Path,
    out_dir: str | Path,
    methods: Sequence[str] | None = None,
    split: str = "test",
    n: int = 64,
    image_files: Sequence[str | Path] | None = None,
    data_dir: str | None = None,
    batch_size: int = 16,
) -> Path:
    """Explain the first ``n`` images of a run's ``split`` (or the user's ``image_files``) with ``methods``
    (default: all), writing attributions, ``index.csv`` and figures to ``out_dir`` (see ``explain_to_disk``)."""
    if n < 1:
        raise ConfigError(f"n must be at least 1, got {n}")
    chosen = _method_list(methods)
    run = _as_run(run)
    labels = None
    if image_files:
        images = read_images(image_files, run.image_size, run.channels)
        names = [Path(f).name for f in image_files]
    else:
        cfg = run.config
        ds = load_dataset(
            cfg.dataset,
            data_dir=data_dir or cfg.data_dir,
            root=cfg.dataset_root,
            image_size=run.image_size,
            channels=run.channels,
            **cfg.dataset_options,
        )
        split_set = ds[split]
        images, labels = split_set.images[:n], split_set.labels[:n]
        names = [f"{split}-{i}" for i in range(images.shape[0])]
    return explain_to_disk(
        run.model,
        images,
        run.mean,
        run.std,
        run.class_names,
        chosen,
        out_dir,
        labels=labels,
        names=names,
        batch_size=batch_size,
    )


def explain_untrained(
    model: str, out_dir: str | Path, methods: Sequence[str] | None = None, n: int = 8
) -> Path:
    """The quick demo: every method on an untrained ``model`` over ``n`` bundled ``digits`` test images
    (no run, no download needed)."""
    chosen = _method_list(methods)
    ds = load_dataset("digits", image_size=model_input_size(model))
    net = create_model(model, in_channels=1, num_classes=ds.num_classes, **random_init_options(model))
    test = ds["test"]
    return explain_to_disk(
        net,
        test.images[:n],
        ds.mean,
        ds.std,
        ds.class_names,
        chosen,
        out_dir,
        labels=test.labels[:n],
        names=[f"digit-{i}" for i in range(min(n, len(test)))],
    )
