"""The public Python API. The CLI, the web app and notebooks all call these functions."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from xailab.data import Dataset, list_datasets, load_dataset
from xailab.data.transforms import resize_uint8, to_channels, to_model_input
from xailab.errors import ConfigError, DatasetError
from xailab.explain import explain, list_methods, resolve_method, validate_method_params
from xailab.explain.export import explain_to_disk
from xailab.metrics import DEFAULT_METRICS, evaluate_explanations, list_metrics
from xailab.metrics.assessment import assess
from xailab.models import create_model, list_models, model_input_size, random_init_options
from xailab.report.assessment import write_assessment
from xailab.study import list_studies, run_study
from xailab.train import Run, TrainConfig, classification_metrics, list_runs, load_run, predict_logits, train

Precision = Literal["fp32", "bf16"]

__all__ = [
    "Run",
    "TrainConfig",
    "assess_run",
    "class_probabilities",
    "create_model",
    "decode_image",
    "evaluate",
    "evaluate_explanations",
    "explain",
    "explain_images",
    "explain_run",
    "explain_untrained",
    "list_datasets",
    "list_methods",
    "list_metrics",
    "list_models",
    "list_runs",
    "list_studies",
    "load_dataset",
    "load_run",
    "predict",
    "read_images",
    "run_dataset",
    "run_study",
    "train",
]


def _as_run(run: Run | str | Path, device: str | torch.device = "cpu") -> Run:
    return run if isinstance(run, Run) else load_run(run, device=device)


def evaluate(
    run: Run | str | Path, split: str = "test", data_dir: str | None = None, dataset_root: str | None = None
) -> dict[str, Any]:
    """Metrics of a trained run on a split of its dataset (accuracy, macro-F1, confusion matrix, ...)."""
    run = _as_run(run)
    split_set = run_dataset(run, data_dir, dataset_root)[split]
    logits = predict_logits(run.model, split_set.images, run.mean, run.std, run.config.eval_batch_size)
    return classification_metrics(logits, split_set.labels, run.class_names)


def run_dataset(run: Run, data_dir: str | None = None, dataset_root: str | None = None) -> Dataset:
    """The dataset a run was trained on, at the run's image size and channels (``data_dir`` and
    ``dataset_root`` override where the run found it, e.g. on another machine)."""
    cfg = run.config
    return load_dataset(
        cfg.dataset,
        data_dir=data_dir or cfg.data_dir,
        root=dataset_root or cfg.dataset_root,
        image_size=run.image_size,
        channels=run.channels,
        **cfg.dataset_options,
    )


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


# Formats a server accepts from strangers: the common ones, so Pillow's rarer parsers never see uploads.
UPLOAD_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")
MAX_UPLOAD_PIXELS = 25_000_000  # 5000x5000; below Pillow's own bomb warning (~89M pixels)


def decode_image(
    data: bytes,
    image_size: tuple[int, int],
    channels: int,
    max_pixels: int = MAX_UPLOAD_PIXELS,
    name: str = "upload",
) -> torch.Tensor:
    """Decode image bytes into uint8 ``[1, H, W, C]`` at ``image_size`` ``(H, W)`` with ``channels`` channels.

    The format is sniffed from the content by Pillow (never from a file name) among ``UPLOAD_FORMATS``; the
    pixel count is checked from the header before any pixel is decoded, so a decompression bomb costs nothing.
    Bad input raises ``DatasetError`` naming ``name`` and what is wrong.
    """
    if not data:
        raise DatasetError(f"{name}: the file is empty; send a PNG, JPEG, BMP, GIF, TIFF or WebP image")
    try:
        with Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS) as im:
            w, h = im.size
            if w * h > max_pixels or w < 1 or h < 1:
                raise DatasetError(
                    f"{name}: image is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}; "
                    "send a smaller image"
                )
            im = im.convert("L" if channels == 1 else "RGB")
            # Shrink big images by an integer factor first (cheap box filter, keeps the aspect), so the
            # antialiased resize below works on a small float copy.
            factor = min(w // (2 * image_size[1]), h // (2 * image_size[0]))
            if factor >= 2:
                im = im.reduce(factor)
            arr = np.asarray(im)
    except Image.DecompressionBombError as e:
        raise DatasetError(f"{name}: refused as a decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise DatasetError(
            f"{name}: not an image: its content is none of PNG, JPEG, BMP, GIF, TIFF or WebP"
        ) from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data, unsupported pixel mode
        raise DatasetError(f"{name}: a corrupt or unsupported image ({type(e).__name__}: {e})") from None
    x = torch.from_numpy(arr.copy()).reshape(1, arr.shape[0], arr.shape[1], channels)
    return resize_uint8(x, image_size)


def class_probabilities(run: Run | str | Path, images: torch.Tensor) -> torch.Tensor:
    """Softmax probabilities ``[N, K]`` (on the model's device) for uint8 images ``[N, H, W, C]``, resized and
    converted to the run's input size and channels."""
    run = _as_run(run)
    x = to_channels(resize_uint8(images, run.image_size), run.channels)
    return predict_logits(run.model, x, run.mean, run.std).softmax(1)


def predict(
    run: Run | str | Path, images: Sequence[str | Path] | torch.Tensor, top_k: int = 3
) -> list[list[tuple[str, float]]]:
    """Top-``k`` (class name, probability) for each image file (or uint8 ``[N, H, W, C]`` tensor)."""
    run = _as_run(run)
    x = images if isinstance(images, torch.Tensor) else read_images(images, run.image_size, run.channels)
    probs = class_probabilities(run, x)
    p, idx = probs.topk(min(top_k, probs.shape[1]), dim=1)
    return [
        [(run.class_names[c], float(q)) for c, q in zip(ci.tolist(), pi.tolist(), strict=True)]
        for ci, pi in zip(idx, p, strict=True)
    ]


def explain_images(
    run: Run,
    images: torch.Tensor,
    method: str,
    target: int | torch.Tensor | None = None,
    model: torch.nn.Module | None = None,
    params: Mapping[str, Any] | None = None,
    precision: Precision = "fp32",
) -> torch.Tensor:
    """Attribution maps ``[N, 1, H, W]`` of ``method`` for uint8 images ``[N, H, W, C]`` already at the run's
    size and channels (e.g. from ``decode_image``), normalised as the run's model expects.

    ``model``: the run's model by default; a server passes a private copy so that explanation hooks never
    touch the copy answering predictions. ``target``: class index (default: the predicted class).
    ``params``: the method's parameters (``validate_method_params``); ``precision``: see ``explain``.
    """
    net = run.model if model is None else model
    device = next(net.parameters()).device
    x = to_model_input(images.to(device), run.mean, run.std)
    return explain(net, x, method, target=target, **{"precision": precision, **(params or {})})


def _method_list(
    methods: Sequence[str] | None, method_params: Mapping[str, Mapping[str, Any]] | None = None
) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """The chosen methods (default: all; ``captum:<Name>`` resolved as any other) and their parameters,
    validated before anything runs: unknown names suggest the nearest, a parameter of a method not chosen is
    a ConfigError."""
    chosen = list(methods) if methods else list_methods()
    for m in chosen:
        resolve_method(m)
    params = dict(method_params or {})
    stray = [m for m in params if m not in chosen]
    if stray:
        raise ConfigError(f"method_params for {stray}, which are not among the methods: {', '.join(chosen)}")
    return chosen, {m: validate_method_params(m, p) for m, p in params.items()}


def explain_run(
    run: Run | str | Path,
    out_dir: str | Path,
    methods: Sequence[str] | None = None,
    split: str = "test",
    n: int = 64,
    image_files: Sequence[str | Path] | None = None,
    data_dir: str | None = None,
    batch_size: int = 16,
    method_params: Mapping[str, Mapping[str, Any]] | None = None,
    precision: Precision = "fp32",
) -> Path:
    """Explain the first ``n`` images of a run's ``split`` (or the user's ``image_files``) with ``methods``
    (default: all), writing attributions, ``index.csv`` and figures to ``out_dir`` (see ``explain_to_disk``).

    ``method_params``: method -> its parameters (e.g. ``{"integrated_gradients": {"n_steps": 16,
    "internal_batch_size": 64}}``), validated up front; ``precision``: see ``explain``."""
    if n < 1:
        raise ConfigError(f"n must be at least 1, got {n}")
    chosen, params = _method_list(methods, method_params)
    run = _as_run(run)
    labels = None
    if image_files:
        images = read_images(image_files, run.image_size, run.channels)
        names = [Path(f).name for f in image_files]
    else:
        split_set = run_dataset(run, data_dir)[split]
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
        params=params,
        precision=precision,
    )


def assess_run(
    run: Run | str | Path,
    out_dir: str | Path,
    methods: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    n: int = 256,
    split: str = "test",
    data_dir: str | None = None,
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device = "cpu",
    method_params: Mapping[str, Mapping[str, Any]] | None = None,
    **metric_params: Any,
) -> dict[str, Any]:
    """Score the explanations of a run's predictions on the first ``n`` images of ``split`` by every method
    in ``methods`` (default: all, with ``method_params``: method -> its parameters) and metric in
    ``metrics`` (default: ``DEFAULT_METRICS`` plus the model-randomisation sanity check), by the one
    assessment engine (``xailab.metrics.assess``), writing its tables and figures to ``out_dir``
    (``xailab.report.assessment``). ``metric_params`` go to the metrics that take them. Returns the
    record's JSON form (what ``scores.json`` holds)."""
    if n < 1:
        raise ConfigError(f"n must be at least 1, got {n}")
    chosen, params = _method_list(methods, method_params)
    run = _as_run(run, device=device)
    images = run_dataset(run, data_dir)[split].images[:n]
    inputs = to_model_input(images.to(device), run.mean, run.std).contiguous()
    record = assess(
        run.model,
        inputs,
        None,
        chosen,
        list(metrics) if metrics else [*DEFAULT_METRICS, "model_randomisation"],
        model_name=run.name,
        method_params=params,
        metric_params=metric_params,
        batch_size=batch_size,
        seed=seed,
    )
    write_assessment(record, out_dir)
    return record.to_json()


def explain_untrained(
    model: str,
    out_dir: str | Path,
    methods: Sequence[str] | None = None,
    n: int = 8,
    method_params: Mapping[str, Mapping[str, Any]] | None = None,
    precision: Precision = "fp32",
) -> Path:
    """The quick demo: every method on an untrained ``model`` over ``n`` bundled ``digits`` test images
    (no run, no download needed); ``method_params`` and ``precision`` as for ``explain_run``."""
    chosen, params = _method_list(methods, method_params)
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
        params=params,
        precision=precision,
    )
