"""The public Python API. The CLI, the web app and notebooks all call these functions."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from xailab.config import bounded, from_dict
from xailab.data import Dataset, dataset_status, list_datasets, load_dataset
from xailab.data.transforms import Sample, resize_uint8, sample_indices, to_channels, to_model_input
from xailab.device import resolve_device
from xailab.errors import ConfigError, DatasetError, did_you_mean
from xailab.explain import applicable_methods, explain, list_methods
from xailab.explain.base import check_applicable, resolve_method, validate_method_params
from xailab.explain.export import explain_to_disk
from xailab.explain.figures import CMAP, normalise_map, overlay
from xailab.explain.lrp.composites import with_dataset_bounds
from xailab.io import folder_lock
from xailab.metrics import DEFAULT_METRICS, evaluate_explanations, list_metrics
from xailab.metrics.assessment import CHANCE_LABEL, assess, finished_parts, remove_parts
from xailab.metrics.base import MetricPrecision
from xailab.models import create_model, list_models, model_input_size, model_table, random_init_options
from xailab.report.assessment import write_assessment
from xailab.study import EXECUTORS, TRACKERS, list_studies, run_study
from xailab.train import Run, TrainConfig, classification_metrics, list_runs, load_run, predict_logits, train
from xailab.train import distributed as _distributed
from xailab.train.distributed import is_main_process, launched_by_torchrun
from xailab.train.loop import check_train_config
from xailab.train.recipes import recipe_defaults
from xailab.train.runs import read_run_config

Precision = Literal["fp32", "bf16", "auto"]  # auto: bf16 where measured faster and accurate

__all__ = [
    "CHANCE_LABEL",
    "AssessOptions",
    "ExplainOptions",
    "PredictOptions",
    "Run",
    "ServeOptions",
    "TrainConfig",
    "assess_run",
    "check_methods",
    "check_train_config",
    "class_probabilities",
    "create_model",
    "dataset_status",
    "decode_image",
    "did_you_mean",
    "evaluate",
    "evaluate_explanations",
    "explain",
    "explain_images",
    "explain_run",
    "explain_untrained",
    "heatmap_image",
    "is_main_process",
    "launch_distributed",
    "launched_by_torchrun",
    "list_datasets",
    "list_executors",
    "list_methods",
    "list_metrics",
    "list_models",
    "list_runs",
    "list_studies",
    "list_trackers",
    "load_dataset",
    "load_run",
    "method_description",
    "method_options",
    "methods_for",
    "model_table",
    "options",
    "overlay_image",
    "predict",
    "read_images",
    "recipe_defaults",
    "resolve_device",
    "resume_config",
    "run_dataset",
    "run_study",
    "speed",
    "train",
    "unfinished_assessment",
]


def _as_run(run: Run | str | Path, device: str | torch.device = "cpu") -> Run:
    return run if isinstance(run, Run) else load_run(run, device=device)


def evaluate(
    run: Run | str | Path, split: str = "test", data_dir: str | None = None, dataset_root: str | None = None
) -> dict[str, Any]:
    """Metrics of a trained run on a split of its dataset (accuracy, macro-F1, confusion matrix, ...)."""
    run = _as_run(run)
    split_set = run_dataset(run, data_dir, dataset_root)[split]  # an unknown split names the valid ones
    logits = predict_logits(
        run.model, split_set.images, run.mean, run.std, run.config.eval_batch_size, tta=run.config.tta
    )
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
                w, h = im.size  # from the header: a decompression bomb is refused before decoding
                if w * h > MAX_UPLOAD_PIXELS:
                    raise DatasetError(
                        f"{path}: image is {w}x{h} = {w * h:,} pixels, over the limit of "
                        f"{MAX_UPLOAD_PIXELS:,}; refused as a possible decompression bomb"
                    )
                im.load()
                arr = np.asarray(im.convert("L" if channels == 1 else "RGB"))
        except (FileNotFoundError, IsADirectoryError):
            raise DatasetError(f"{path}: no such image file") from None
        except Image.DecompressionBombError as e:
            raise DatasetError(f"{path}: refused as a decompression bomb ({e})") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise DatasetError(f"{path}: not a readable image ({e})") from None
        x = torch.from_numpy(arr.copy()).reshape(arr.shape[0], arr.shape[1], channels)
        arrays.append(resize_uint8(x[None], image_size)[0])
    return torch.stack(arrays) if arrays else torch.empty(0, *image_size, channels, dtype=torch.uint8)


# Formats a server accepts from strangers: the common ones, so Pillow's rarer parsers never see uploads.
UPLOAD_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")
# ``assess_run`` keeps finished methods here until its record is written
ASSESS_PARTS_DIR = ".assessment-parts"
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
        with Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS) as opened:
            w, h = opened.size
            if w * h > max_pixels or w < 1 or h < 1:
                raise DatasetError(
                    f"{name}: image is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}; "
                    "send a smaller image"
                )
            im = opened.convert("L" if channels == 1 else "RGB")
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
    """Top-``k`` (class name, probability) for each image file (or uint8 ``[N, H, W, C]`` tensor); ``top_k``
    outside 1..1000 raises ``ConfigError``."""
    top_k = options(PredictOptions, "predict", top_k=top_k).top_k
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
    ``params``: the method's parameters (``validate_method_params``; LRP's z-B bounds default to the run's
    normalised data range, ``with_dataset_bounds``); ``precision``: see ``explain``.
    """
    net = run.model if model is None else model
    device = next(net.parameters()).device
    x = to_model_input(images.to(device), run.mean, run.std)
    # LRP's z-B rule is bounded by the run's normalised data range unless params set the bounds
    chosen = with_dataset_bounds({method: params or {}}, [method], run.mean, run.std)[method]
    return explain(net, x, method, target=target, **{"precision": precision, **chosen})


def _method_list(
    methods: Sequence[str] | None,
    method_params: Mapping[str, Mapping[str, Any]] | None = None,
    model: torch.nn.Module | None = None,
) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """The chosen methods (default: all that apply to ``model``, e.g. no transformer method for a CNN;
    ``captum:<Name>`` resolved as any other) and their parameters, validated before anything runs: unknown
    names suggest the nearest, a parameter of a method not chosen is a ConfigError."""
    chosen = list(methods) if methods else (list_methods() if model is None else applicable_methods(model))
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
    sample: Sample = "balanced",
) -> Path:
    """Explain ``n`` images of a run's ``split`` (``sample``: ``balanced``, the classes in turn, or the
    ``first``; see ``xailab.data.sample_indices``), or the user's ``image_files``, with ``methods`` (default:
    all), writing attributions, ``index.csv`` and figures to ``out_dir`` (see ``explain_to_disk``).

    ``method_params``: method -> its parameters (e.g. ``{"integrated_gradients": {"n_steps": 16,
    "internal_batch_size": 64}}``), validated up front (LRP's z-B bounds default to the run's normalised data
    range, ``with_dataset_bounds``); ``precision``: see ``explain``."""
    checked = options(ExplainOptions, "explain_run", n=n, sample=sample)
    n, sample = checked.n, checked.sample
    run = _as_run(run)
    chosen, params = _method_list(methods, method_params, run.model)
    params = with_dataset_bounds(params, chosen, run.mean, run.std)
    labels = None
    if image_files:
        images = read_images(image_files, run.image_size, run.channels)
        names = [Path(f).name for f in image_files]
    else:
        split_set = run_dataset(run, data_dir)[split]
        index = sample_indices(split_set.labels, n, sample)
        images, labels = split_set.images[index], split_set.labels[index]
        names = [f"{split}-{i}" for i in index.tolist()]  # the split's own indices
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


def unfinished_assessment(out_dir: str | Path) -> list[str]:
    """The methods a killed ``assess_run`` into ``out_dir`` had finished (kept as parts, read back when the
    request is the same); empty when none was killed there."""
    return finished_parts(Path(out_dir) / ASSESS_PARTS_DIR)


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
    metric_precision: MetricPrecision = "fp32",
    sample: Sample = "balanced",
    **metric_params: Any,
) -> dict[str, Any]:
    """Score the explanations of a run's predictions on ``n`` images of ``split`` (``sample``: ``balanced``,
    the classes in turn, or the ``first``; see ``xailab.data.sample_indices``) by every method
    in ``methods`` (default: all, with ``method_params``: method -> its parameters) and metric in
    ``metrics`` (default: ``DEFAULT_METRICS`` plus the model-randomisation sanity check), by the one
    assessment engine (``xailab.metrics.assess``), writing its tables and figures to ``out_dir``
    (``xailab.report.assessment``). ``metric_params`` go to the metrics that take them;
    ``metric_precision``: of the metrics' forward passes of perturbed copies (``fp32`` exact, the default;
    ``auto`` the fast mode: bf16 only where the autotuner measured it faster here; ``bf16``; see
    ``xailab.metrics.base``). LRP's z-B bounds default to the run's normalised data range
    (``with_dataset_bounds``). Returns the record's JSON form (what ``scores.json`` holds)."""
    checked = options(AssessOptions, "assess_run", n=n, metric_precision=metric_precision, sample=sample)
    n, metric_precision, sample = checked.n, checked.metric_precision, checked.sample
    run = _as_run(run, device=device)
    chosen, params = _method_list(methods, method_params, run.model)
    params = with_dataset_bounds(params, chosen, run.mean, run.std)
    split_set = run_dataset(run, data_dir)[split]
    index = sample_indices(split_set.labels, n, sample)
    images = split_set.images[index]
    inputs = to_model_input(images.to(device), run.mean, run.std).contiguous()
    with folder_lock(out_dir, "assessment folder"):  # a second `xailab assess` into it stops with a message
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
            precision=metric_precision,
            resume_dir=Path(out_dir) / ASSESS_PARTS_DIR,  # a killed `xailab assess` resumes method by method
        )
        record = dataclasses.replace(record, image_ids=tuple(index.tolist()))  # per_image.csv names them
        write_assessment(record, out_dir)
        remove_parts(Path(out_dir) / ASSESS_PARTS_DIR)
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
    ds = load_dataset("digits", image_size=model_input_size(model))
    net = create_model(model, in_channels=1, num_classes=ds.num_classes, **random_init_options(model))
    chosen, params = _method_list(methods, method_params, net)
    params = with_dataset_bounds(params, chosen, ds.mean, ds.std)
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


# ============================================================================ what the faces (CLI, web) use
# The CLI and the web app import only this module (and errors/config): everything they need from the layers
# below is reached through the functions here, so a face never re-implements a lookup, a check or a default.

OptionsT = TypeVar("OptionsT")


@dataclass(frozen=True)
class PredictOptions:
    """The bounded options of a prediction (``xailab predict``, the web predict endpoint)."""

    top_k: int = bounded(3, low=1, high=1000, help="how many classes, most probable first")


SAMPLE_HELP = (
    "which images of the split: balanced (the classes in turn: a split stored class by class is not judged "
    "on its first class alone) or first (the first n)"
)


@dataclass(frozen=True)
class ExplainOptions:
    """The bounded options of ``xailab explain`` (``explain_run``)."""

    n: int = bounded(64, low=1, high=1_000_000, help="number of images")
    batch_size: int = bounded(16, low=1, high=1 << 16, help="images explained per call")
    sample: Sample = bounded("balanced", help=SAMPLE_HELP)  # noqa: RUF009 (a str Literal is immutable)


@dataclass(frozen=True)
class AssessOptions:
    """The bounded options of ``xailab assess`` (``assess_run``)."""

    n: int = bounded(256, low=1, high=1_000_000, help="number of test images")
    batch_size: int = bounded(64, low=1, high=1 << 16, help="images explained per call")
    seed: int = bounded(0, low=0, high=2**63 - 1, help="seed of the random parts of the metrics")
    sample: Sample = bounded("balanced", help=SAMPLE_HELP)  # noqa: RUF009 (a str Literal is immutable)
    # a Literal: the one validation layer refuses any other value, naming the valid ones
    metric_precision: MetricPrecision = bounded(  # noqa: RUF009 (a str Literal is immutable)
        "fp32",
        help="precision of the metrics' forward passes of perturbed copies: fp32 (exact), bf16, or auto "
        "(bf16 only where the autotuner measured it faster on this machine, else fp32)",
    )


@dataclass(frozen=True)
class ServeOptions:
    """The bounded options of ``xailab serve``."""

    port: int = bounded(8000, low=0, high=65535, help="TCP port (0: any free one)")
    max_upload_mb: int = bounded(10, low=1, high=4096, help="largest accepted upload in MiB")


def options(cls: type[OptionsT], where: str, **values: Any) -> OptionsT:
    """Options record ``cls`` from ``values`` (None: the default) through the one validation layer, so a bad
    value raises ``ConfigError`` naming ``where.field``, the value and the valid range."""
    return from_dict(cls, {k: v for k, v in values.items() if v is not None}, where=where)


def speed(
    model: str,
    image_size: int | None = None,
    device: str = "auto",
    channels: int = 3,
    num_classes: int = 10,
    refresh: bool = False,
) -> Any:
    """The autotuner's table for ``model`` on ``image_size`` x ``image_size`` images (default: the model's
    own size) with ``channels`` channels on ``device``: seconds per image of each configuration of the
    training step, the no-grad forward and the forward + input-gradient pass, and the choice of each
    (``xailab.autotune.Tuning``; read from the cache unless ``refresh``, measured otherwise)."""
    from xailab import autotune

    size = image_size or model_input_size(model)[0]
    dev = resolve_device(device)
    net = create_model(model, in_channels=channels, num_classes=num_classes, **random_init_options(model))
    return autotune.tune(net, (channels, size, size), dev, refresh=refresh)


# ----------------------------------------------------------------------------------------------------- runs
def resume_config(run_dir: str | Path) -> dict[str, Any]:
    """The ``train`` section of a run folder's ``config.json`` (what ``train --resume`` starts from)."""
    train_section = read_run_config(run_dir).get("train")
    if not isinstance(train_section, dict):
        raise ConfigError(f"{run_dir}/config.json has no train section to resume from")
    # a run stored before recipes existed was trained with the plain defaults: never fill it from a recipe
    return {"recipe": "none", **train_section}


# ------------------------------------------------------------------------------------ catalogues, launching
def list_executors() -> list[str]:
    """Where a study's cells can run (``xailab run --executor``)."""
    return EXECUTORS.names()


def list_trackers() -> list[str]:
    """Experiment trackers a study can log to (``xailab run --tracking``)."""
    return TRACKERS.names()


def launch_distributed(argv: Sequence[str], processes: int) -> int:
    """Run ``xailab <argv>`` as ``processes`` data-parallel ranks under torchrun; its exit status."""
    return _distributed.launch(argv, processes)


# ------------------------------------------------------------------------------------------------- methods
def method_description(name: str) -> str:
    """One line saying what method ``name`` does (``captum:<Name>`` included)."""
    return resolve_method(name).description


def methods_for(run: Run) -> list[str]:
    """The registered methods that apply to ``run``'s model (what a face offers for it)."""
    return applicable_methods(run.model)


def check_methods(names: Sequence[str], run: Run | None = None) -> list[str]:
    """``names`` without repeats, each resolved (``captum:<Name>`` included); unknown names raise an error
    suggesting the nearest; with ``run``, a method its model cannot use is a ``ConfigError`` listing those
    that apply."""
    chosen = list(dict.fromkeys(names))
    for name in chosen:
        spec = resolve_method(name)
        if run is not None:
            check_applicable(spec, run.model)
    return chosen


def method_param_names(name: str) -> frozenset[str]:
    """The parameters method ``name`` declares (for a wrapper such as SmoothGrad, its default base's too)."""
    spec = resolve_method(name)
    extra = spec.extra_params({}) if spec.extra_params is not None else {}
    return frozenset(spec.params) | frozenset(extra)


def method_options(methods: Sequence[str], values: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-method parameters from ``{"[METHOD.]KEY": value}`` (``--method-option``, the web form's ``params``).

    ``METHOD.KEY`` goes to ``METHOD`` (one of ``methods``); a bare ``KEY`` to every method in ``methods`` that
    declares it, and is an error when none does. Each method's parameters are validated by its declaration,
    so a misspelt or ill-typed parameter raises ``ConfigError`` naming it before anything runs.
    """
    out: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for item, value in values.items():
        method, _, key = str(item).rpartition(".")
        if not key:
            raise ConfigError(f"method option {item!r}: expected [METHOD.]KEY")
        if method:
            if method not in out:
                raise ConfigError(
                    f"method option {item!r}: {method!r} is not among the chosen methods "
                    f"({', '.join(methods)}).{did_you_mean(method, methods)}"
                )
            out[method][key] = value
            continue
        takers = [m for m in methods if key in method_param_names(m)]
        if not takers:
            known = sorted(set().union(*(method_param_names(m) for m in methods)))
            raise ConfigError(
                f"method option {key!r}: none of the chosen methods ({', '.join(methods)}) takes it."
                f"{did_you_mean(key, known)} Their parameters: {', '.join(known) or 'none'}; write "
                f"METHOD.KEY=VALUE to give one method a parameter."
            )
        for m in takers:
            out[m].setdefault(key, value)
    return {m: validate_method_params(m, params) for m, params in out.items() if params}


# ---------------------------------------------------------------------------------------- pictures of maps
def heatmap_image(attribution: torch.Tensor) -> np.ndarray:
    """``[1, H, W]`` map -> float ``[H, W, 3]`` in [0, 1]: the normalised map through the figures' colour map."""
    import matplotlib

    return matplotlib.colormaps[CMAP](normalise_map(attribution).numpy())[..., :3]


def overlay_image(image: torch.Tensor, attribution: torch.Tensor, alpha: float = 0.5) -> np.ndarray:
    """uint8 image ``[H, W, C]`` blended with the colour-mapped map ``[1, H, W]``: float ``[H, W, 3]``."""
    return overlay(image, attribution, alpha)
