"""The routes of the web API: runs, methods, reports, predict, explain, samples. Every model call goes
through ``xailab.api``; every bad input is a 4xx ``{"detail": "..."}`` naming what is wrong."""

from __future__ import annotations

import base64
import io
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

import numpy as np
from fastapi import APIRouter, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, Response
from PIL import Image
from torch import Tensor

from xailab import api
from xailab.web.limits import read_upload
from xailab.web.reports import REPORT_ASSET_TYPES, REPORT_FILE, find_reports, report_file
from xailab.web.schemas import (
    ClassProbability,
    Explanation,
    MethodInfo,
    MethodMap,
    Prediction,
    Report,
    RunInfo,
    RunSummary,
    Sample,
    TopK,
    errors,
)
from xailab.web.serving import LoadedRun, RunCache

MAX_METHODS_PER_REQUEST = 16
MAX_PARAMS_CHARS = 4096
# The largest whole number a request may give a method parameter: far above every default (n_steps 50, lime's
# 1000 samples) but bounding the work one request can ask of a shared server (n_steps=10**9 would run for
# days). Python callers and the CLI are not bounded.
MAX_PARAM_INT = 10_000
_INDEX = re.compile(r"[0-9]{1,9}")  # ASCII digits only: "²".isdigit() is True in Python

router = APIRouter()


@dataclass(frozen=True)
class WebState:
    """What the routes of one app share: the runs, and the limits on uploads."""

    root: Path
    cache: RunCache
    max_upload_bytes: int
    max_pixels: int


def state(request: Request) -> WebState:
    """The app's ``WebState`` (set by ``create_app``)."""
    return request.app.state.web


# ------------------------------------------------------------------------------------------------ helpers
def png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of a uint8 ``[H, W]``, ``[H, W, 1]`` or ``[H, W, 3]`` array."""
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image).save(buf, "PNG")
    return buf.getvalue()


def png_data_url(rgb: np.ndarray) -> str:
    """uint8 ``[H, W, 3]`` or ``[H, W]`` (or float in [0, 1]) -> ``data:image/png;base64,...``."""
    if rgb.dtype != np.uint8:
        rgb = (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)
    return "data:image/png;base64," + base64.b64encode(png_bytes(rgb)).decode("ascii")


def parse_methods(methods: str, entry: LoadedRun) -> list[str]:
    """``"gradcam, captum:Saliency"`` -> names, each one that applies to the run's model; unknown names are
    an error suggesting the nearest."""
    names = list(dict.fromkeys(m.strip() for m in methods.split(",") if m.strip()))
    if not names:
        raise HTTPException(400, f"methods: give at least one of {', '.join(api.methods_for(entry.run))}")
    if len(names) > MAX_METHODS_PER_REQUEST:
        raise HTTPException(400, f"methods: at most {MAX_METHODS_PER_REQUEST} per request, got {len(names)}")
    return api.check_methods(names, entry.run)


def parse_params(params: str, methods: list[str]) -> dict[str, dict[str, Any]]:
    """The form's ``params``, a JSON object ``{"[METHOD.]KEY": value}``, as validated per-method parameters
    (as ``--method-option`` on the command line); anything else is a 400 naming the parameter."""
    if not params.strip():
        return {}
    if len(params) > MAX_PARAMS_CHARS:
        raise HTTPException(400, f"params: at most {MAX_PARAMS_CHARS:,} characters, got {len(params):,}")
    try:
        values = json.loads(params)
    except (ValueError, RecursionError) as e:
        raise HTTPException(400, f'params: not JSON ({e}); send an object like {{"n_steps": 32}}') from None
    if not isinstance(values, dict):
        raise HTTPException(
            400, f'params: expected a JSON object like {{"n_steps": 32}}, got {params[:80]!r}'
        )
    chosen = api.method_options(methods, values)
    for method, given in chosen.items():
        for key, value in given.items():
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_PARAM_INT:
                raise HTTPException(
                    400,
                    f"params: {method}.{key}={value} is over this server's limit of {MAX_PARAM_INT:,}; "
                    "ask for less work (or run it with the Python API or the CLI)",
                )
    return chosen


def parse_target(target: str | None, class_names: tuple[str, ...], predicted: int) -> int:
    """A class given by name or by index in ASCII digits (default: ``predicted``) as an index; anything else
    is a 400."""
    if target is None or target.strip() == "":
        return predicted
    target = target.strip()
    if target in class_names:
        return class_names.index(target)
    if _INDEX.fullmatch(target) and int(target) < len(class_names):
        return int(target)
    raise HTTPException(
        400,
        f"target {target[:80]!r} is neither a class name nor an index below {len(class_names)}: "
        f"classes are {', '.join(class_names)}",
    )


def ranked(probs: Tensor, class_names: tuple[str, ...], k: int) -> list[ClassProbability]:
    """The ``k`` most probable classes of ``probs`` ``[K]``, best first."""
    p, idx = probs.topk(min(k, probs.shape[0]))
    return [
        ClassProbability(index=i, name=class_names[i], probability=float(q))
        for i, q in zip(idx.tolist(), p.tolist(), strict=True)
    ]


def decode(web: WebState, file: UploadFile, entry: LoadedRun) -> Tensor:
    """The uploaded image as uint8 ``[1, H, W, C]`` at the run's size and channels (4xx when unreadable)."""
    data = read_upload(file, web.max_upload_bytes)
    return api.decode_image(
        data, entry.run.image_size, entry.run.channels, web.max_pixels, name=file.filename or "upload"
    )


# ---------------------------------------------------------------------------------------------- catalogue
@router.get("/api/runs", response_model=list[RunSummary], tags=["runs"])
def list_runs(request: Request) -> list[dict[str, Any]]:
    """Every run under the runs folder with its model, dataset, status and test accuracy; a broken run
    folder is listed with status ``broken`` and ``error`` saying why."""
    return state(request).cache.summaries()


@router.get("/api/methods", response_model=list[MethodInfo], responses=errors(400, 404), tags=["explain"])
def list_methods(
    request: Request,
    run: Annotated[str | None, Query(description="only the methods that apply to this run's model")] = None,
) -> list[MethodInfo]:
    """The explanation methods the explain endpoint accepts (for one run: those that apply to its model;
    any ``captum:<Name>`` attribution class is accepted too)."""
    names = api.list_methods() if run is None else api.methods_for(state(request).cache.get(run).run)
    return [MethodInfo(name=n, description=api.method_description(n)) for n in names]


@router.get("/api/reports", response_model=list[Report], tags=["reports"])
def list_reports(request: Request) -> list[Report]:
    """Every study report (``report.html``) found under the runs folder."""
    return [
        Report(name=name, url=f"/reports/{'' if name == '.' else quote(name) + '/'}{REPORT_FILE}")
        for name in find_reports(state(request).root)
    ]


# ------------------------------------------------------------------------------------ predict and explain
@router.post(
    "/api/runs/{run:path}/predict",
    response_model=Prediction,
    responses=errors(400, 404, 413),
    tags=["predict"],
)
def predict(request: Request, run: str, file: Annotated[UploadFile, File()], top_k: TopK = 3) -> Prediction:
    """Top-``k`` classes with probabilities for an uploaded image (PNG, JPEG, BMP, GIF, TIFF, WebP)."""
    web = state(request)
    entry = web.cache.get(run)
    image = decode(web, file, entry)
    start = time.perf_counter()
    probs = entry.batcher.probabilities(image)[0]
    return Prediction(
        run=run, top=ranked(probs, entry.run.class_names, top_k), seconds=time.perf_counter() - start
    )


@router.post(
    "/api/runs/{run:path}/explain",
    response_model=Explanation,
    responses=errors(400, 404, 413),
    tags=["explain"],
)
def explain(
    request: Request,
    run: str,
    file: Annotated[UploadFile, File()],
    methods: Annotated[
        str, Form(description="comma-separated method names (see /api/methods; captum:<Name> too)")
    ] = "gradcam",
    target: Annotated[
        str | None, Form(description="class name or index (default: the predicted class)")
    ] = None,
    top_k: TopK = 3,
    alpha: Annotated[float, Form(ge=0.0, le=1.0, description="heatmap weight in the overlay")] = 0.5,
    raw: Annotated[bool, Form(description="also return each raw map as [H][W] numbers")] = False,
    params: Annotated[
        str,
        Form(
            description='method parameters, a JSON object {"[METHOD.]KEY": value}: a bare KEY goes to every '
            'chosen method that declares it, e.g. {"integrated_gradients.n_steps": 32, "internal_batch_size": 8}'
        ),
    ] = "",
    precision: Annotated[
        Literal["fp32", "bf16", "auto"],
        Form(description="bf16: the model runs under bfloat16 autocast; auto: bf16 where measured faster"),
    ] = "fp32",
) -> Explanation:
    """Explain the prediction for an uploaded image with one or more methods: PNG overlays (and raw maps)."""
    web = state(request)
    entry = web.cache.get(run)
    names = parse_methods(methods, entry)
    method_params = parse_params(params, names)
    image = decode(web, file, entry)
    probs = entry.batcher.probabilities(image)[0]
    class_names = entry.run.class_names
    target_index = parse_target(target, class_names, int(probs.argmax()))
    maps = []
    with entry.explain_lock:  # one explanation at a time per run: methods hook into the model
        for name in names:
            start = time.perf_counter()
            attribution = api.explain_images(
                entry.run,
                image,
                name,
                target_index,
                entry.explain_model,
                params=method_params.get(name),
                precision=precision,
            )
            attribution = attribution[0].cpu()  # [1, H, W]
            maps.append(
                MethodMap(
                    method=name,
                    overlay_png=png_data_url(api.overlay_image(image[0], attribution, alpha)),
                    heatmap_png=png_data_url(api.heatmap_image(attribution)),
                    seconds=time.perf_counter() - start,
                    attribution=attribution[0].tolist() if raw else None,
                )
            )
    return Explanation(
        run=run,
        image_png=png_data_url(image[0].numpy()),
        top=ranked(probs, class_names, top_k),
        target=ClassProbability(
            index=target_index, name=class_names[target_index], probability=float(probs[target_index])
        ),
        maps=maps,
    )


# --------------------------------------------------------------------------------------- samples, run info
@router.get(
    "/api/runs/{run:path}/samples", response_model=list[Sample], responses=errors(400, 404), tags=["runs"]
)
def list_samples(request: Request, run: str) -> list[Sample]:
    """A few test-set images of the run's dataset, to try the model on."""
    cache = state(request).cache
    entry = cache.get(run)
    _, labels = cache.samples(entry)
    return [
        Sample(index=i, label=entry.run.class_names[int(y)], url=f"/api/runs/{quote(run)}/samples/{i}")
        for i, y in enumerate(labels.tolist())
    ]


@router.get(
    "/api/runs/{run:path}/samples/{index}",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, **errors(400, 404)},
    tags=["runs"],
)
def sample_image(request: Request, run: str, index: int) -> Response:
    """Test-set image ``index`` of the run's dataset as PNG, at the run's input size."""
    cache = state(request).cache
    entry = cache.get(run)
    images, _ = cache.samples(entry)
    if not 0 <= index < images.shape[0]:
        raise HTTPException(404, f"sample index {index} out of range: 0..{images.shape[0] - 1}")
    return Response(png_bytes(images[index].numpy()), media_type="image/png")


@router.get("/api/runs/{run:path}", response_model=RunInfo, responses=errors(400, 404), tags=["runs"])
def run_info(request: Request, run: str) -> RunInfo:
    """One run: its classes, input size and channels, test metrics, the methods for its model, and where it
    runs."""
    cache = state(request).cache
    entry = cache.get(run)
    summary = cache.summary(run)  # 404 when removed since it was loaded
    test = entry.run.metrics.get("test", {})
    return RunInfo(
        **summary,
        class_names=list(entry.run.class_names),
        image_size=list(entry.run.image_size),
        channels=entry.run.channels,
        test_macro_f1=test.get("macro_f1"),
        device=str(next(entry.run.model.parameters()).device),
        methods=api.methods_for(entry.run),
    )


# ------------------------------------------------------------------------------------------------ reports
@router.get("/reports/{path:path}", response_class=FileResponse, responses=errors(404), tags=["reports"])
def report(request: Request, path: str) -> FileResponse:
    """A study's ``report.html`` (or a file beside it), found under the runs folder."""
    found = report_file(state(request).root, path)
    return FileResponse(
        found, media_type=REPORT_ASSET_TYPES[found.suffix], headers={"X-Content-Type-Options": "nosniff"}
    )
