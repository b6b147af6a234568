"""The web app: a JSON inference API (FastAPI; schema at ``/openapi.json``) and a static page on top of it.

``create_app(runs_dir)`` serves the runs found under ``runs_dir``: list them, predict (image upload -> top-k
classes with probabilities), explain (image + methods -> PNG overlays and, on request, the raw maps), a few
test-set images per run, and the studies' ``report.html`` pages. Every model call goes through ``xailab.api``.

Safety: run names are looked up among the listed runs and never joined into a path; report files are served
only from folders holding a ``report.html`` under ``runs_dir`` after resolving symlinks; request bodies are
capped; uploads are decoded by content with a pixel limit checked before decoding; every bad input is a 4xx
``{"detail": "..."}`` naming what is wrong.
"""

from __future__ import annotations

import base64
import copy
import difflib
import io
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, SimpleQueue
from typing import Annotated, Any
from urllib.parse import quote

import matplotlib
import numpy as np
import torch
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from torch import Tensor, nn

from xailab import api
from xailab.errors import XailabError
from xailab.explain import METHODS
from xailab.explain.figures import CMAP, normalise_map, overlay

STATIC_DIR = Path(__file__).parent / "static"
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries and the small form fields around the file
SAMPLES_PER_RUN = 24
MAX_METHODS_PER_REQUEST = 16
REPORT_FILE = "report.html"
REPORT_ASSET_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".css": "text/css",
    ".js": "text/javascript",
    ".json": "application/json",
    ".csv": "text/csv",
}

TopK = Annotated[int, Form(ge=1, le=1000, description="how many classes, most probable first")]


# ----------------------------------------------------------------------------------------------- responses
class ClassProbability(BaseModel):
    index: int
    name: str
    probability: float


class RunSummary(BaseModel):
    run: str
    model: str
    dataset: str
    status: str
    epochs: str
    test_accuracy: float | None


class RunInfo(RunSummary):
    class_names: list[str]
    image_size: list[int]
    channels: int
    test_macro_f1: float | None
    device: str


class Prediction(BaseModel):
    run: str
    top: list[ClassProbability]
    seconds: float


class MethodMap(BaseModel):
    method: str
    overlay_png: str  # data URL: the image blended with the colour-mapped map (alpha)
    heatmap_png: str  # data URL: the colour-mapped map alone, for an opacity slider over ``image_png``
    seconds: float
    attribution: list[list[float]] | None = None  # the raw map [H][W], when asked for with raw=true


class Explanation(BaseModel):
    run: str
    image_png: str
    top: list[ClassProbability]
    target: ClassProbability
    maps: list[MethodMap]


class MethodInfo(BaseModel):
    name: str
    description: str


class Sample(BaseModel):
    index: int
    label: str
    url: str


class Report(BaseModel):
    name: str
    url: str


class ErrorDetail(BaseModel):
    detail: str


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the 4xx answers of a route (all ``{"detail": "..."}``)."""
    meaning = {
        400: "bad input: unreadable or too large image, unknown method, bad target",
        404: "unknown run, sample or report file",
        413: "upload over the size limit",
    }
    return {code: {"model": ErrorDetail, "description": meaning[code]} for code in codes}


# ------------------------------------------------------------------------------------------ request limits
class BodySizeLimit:
    """ASGI middleware refusing request bodies over ``max_bytes`` with 413, before they are buffered.

    A declared ``Content-Length`` is checked up front; a streamed body is counted as it arrives.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self, size: str) -> str:
        return f"request body is {size} bytes, over the limit of {self.max_bytes:,}; send a smaller image"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = JSONResponse({"detail": self._message(f"{int(declared):,}")}, status_code=413)
            await response(scope, receive, send)
            return
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                # FastAPI re-raises an HTTPException met while reading the body as this response.
                raise HTTPException(413, self._message(f"over {received:,}"))
            return message

        await self.app(scope, counted_receive, send)


# ------------------------------------------------------------------------------------- model cache, batching
class PredictBatcher:
    """Serves concurrent predictions of one run in shared forward passes.

    Each caller queues its images and then takes the lock; whoever holds it answers every request queued so
    far in one batch (up to ``max_batch`` images), so requests arriving while a batch runs are answered
    together by the next one. No background thread: nothing to start or stop.
    """

    def __init__(self, run: api.Run, max_batch: int = 64) -> None:
        self.run = run
        self.max_batch = max_batch
        self._queue: SimpleQueue[tuple[Tensor, Future[Tensor]]] = SimpleQueue()
        self._lock = threading.Lock()

    def probabilities(self, images: Tensor) -> Tensor:
        """Class probabilities ``[N, K]`` (CPU) for uint8 images ``[N, H, W, C]`` at the run's size."""
        done: Future[Tensor] = Future()
        self._queue.put((images, done))
        while not done.done():
            with self._lock:
                if not done.done():
                    self._serve_one_batch()
        return done.result()

    def _serve_one_batch(self) -> None:
        batch: list[tuple[Tensor, Future[Tensor]]] = []
        count = 0
        while count < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except Empty:
                break
            batch.append(item)
            count += item[0].shape[0]
        if not batch:
            return
        try:
            with torch.inference_mode():
                probs = api.class_probabilities(self.run, torch.cat([x for x, _ in batch])).cpu()
        except Exception as e:  # every waiter of this batch sees the error, not only the lock holder
            for _, future in batch:
                future.set_exception(e)
            return
        start = 0
        for x, future in batch:
            future.set_result(probs[start : start + x.shape[0]])
            start += x.shape[0]


@dataclass
class LoadedRun:
    """A run kept in memory: its model answers predictions (batched); ``explain_model`` is a private copy for
    explanations, whose hooks and mode switches must never meet a concurrent prediction."""

    name: str
    run: api.Run
    batcher: PredictBatcher
    explain_model: nn.Module
    explain_lock: threading.Lock = field(default_factory=threading.Lock)
    samples_lock: threading.Lock = field(default_factory=threading.Lock)
    samples: tuple[Tensor, Tensor] | None = None  # uint8 [S, H, W, C], labels [S]


class RunCache:
    """The runs under ``root``, each loaded once on first use and kept; safe to use from many threads."""

    def __init__(
        self, root: Path, device: str | torch.device, data_dir: str | None = None, max_batch: int = 64
    ) -> None:
        self.root = root
        self.device = device
        self.data_dir = data_dir
        self.max_batch = max_batch
        self._loaded: dict[str, LoadedRun] = {}
        self._lock = threading.Lock()

    def summaries(self) -> list[dict[str, Any]]:
        """``xailab.list_runs`` of the root (re-read each time, so new runs appear)."""
        return api.list_runs(self.root)

    def get(self, name: str) -> LoadedRun:
        """The loaded run called ``name``; a name that is not a listed run is a 404 naming the nearest."""
        entry = self._loaded.get(name)
        if entry is not None:
            return entry
        names = [r["run"] for r in self.summaries()]
        if name not in names:  # the only check a name needs: it is never joined into a path
            close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            listed = ", ".join(names) if names else f"none (train one into {self.root}/)"
            raise HTTPException(404, f"unknown run {name!r}.{hint} Runs: {listed}.")
        with self._lock:
            entry = self._loaded.get(name)
            if entry is None:
                run = api.load_run(self.root / name, device=self.device)
                model = copy.deepcopy(run.model)
                entry = LoadedRun(name, run, PredictBatcher(run, self.max_batch), model)
                self._loaded[name] = entry
        return entry

    def samples(self, entry: LoadedRun) -> tuple[Tensor, Tensor]:
        """The first ``SAMPLES_PER_RUN`` test images of the run's dataset ``[S, H, W, C]`` and labels ``[S]``."""
        with entry.samples_lock:
            if entry.samples is None:
                test = api.run_dataset(entry.run, self.data_dir)["test"]
                entry.samples = (test.images[:SAMPLES_PER_RUN].clone(), test.labels[:SAMPLES_PER_RUN].clone())
            return entry.samples


# ----------------------------------------------------------------------------------------------- helpers
def png_data_url(rgb: np.ndarray) -> str:
    """uint8 ``[H, W, 3]`` or ``[H, W]`` (or float in [0, 1]) -> ``data:image/png;base64,...``."""
    if rgb.dtype != np.uint8:
        rgb = (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)
    return "data:image/png;base64," + base64.b64encode(png_bytes(rgb)).decode("ascii")


def png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of a uint8 ``[H, W]``, ``[H, W, 1]`` or ``[H, W, 3]`` array."""
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image).save(buf, "PNG")
    return buf.getvalue()


def heatmap_rgb(attribution: Tensor) -> np.ndarray:
    """``[1, H, W]`` map -> float ``[H, W, 3]``: the normalised map through the figures' colour map."""
    return matplotlib.colormaps[CMAP](normalise_map(attribution).numpy())[..., :3]


def read_upload(file: UploadFile, max_bytes: int) -> bytes:
    """The uploaded file's bytes; over ``max_bytes`` is a 413."""
    data = file.file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise HTTPException(413, f"{file.filename or 'upload'}: over the limit of {max_bytes:,} bytes")
    return data


def parse_methods(methods: str) -> list[str]:
    """``"gradcam, saliency"`` -> names; unknown names raise an error suggesting the nearest."""
    names = list(dict.fromkeys(m.strip() for m in methods.split(",") if m.strip()))
    if not names:
        raise HTTPException(400, f"methods: give at least one of {', '.join(api.list_methods())}")
    if len(names) > MAX_METHODS_PER_REQUEST:
        raise HTTPException(400, f"methods: at most {MAX_METHODS_PER_REQUEST} per request, got {len(names)}")
    for name in names:
        METHODS.get(name)
    return names


def parse_target(target: str | None, class_names: tuple[str, ...], predicted: int) -> int:
    """A class given by index or name (default: ``predicted``) as an index; anything else is a 400."""
    if target is None or target.strip() == "":
        return predicted
    target = target.strip()
    if target in class_names:
        return class_names.index(target)
    if target.isdigit() and int(target) < len(class_names):
        return int(target)
    raise HTTPException(
        400,
        f"target {target!r} is neither a class name nor an index below {len(class_names)}: "
        f"classes are {', '.join(class_names)}",
    )


def ranked(probs: Tensor, class_names: tuple[str, ...], k: int) -> list[ClassProbability]:
    """The ``k`` most probable classes of ``probs`` ``[K]``, best first."""
    p, idx = probs.topk(min(k, probs.shape[0]))
    return [
        ClassProbability(index=i, name=class_names[i], probability=float(q))
        for i, q in zip(idx.tolist(), p.tolist(), strict=True)
    ]


def find_reports(root: Path) -> dict[str, Path]:
    """Study name (its folder relative to ``root``) -> resolved folder, for every ``report.html`` under it
    whose real location (after symlinks) stays inside ``root``."""
    real_root = root.resolve()
    reports = {}
    for path in sorted(root.rglob(REPORT_FILE)) if root.is_dir() else []:
        real = path.resolve()
        if real.is_file() and real.is_relative_to(real_root):
            reports[path.parent.relative_to(root).as_posix()] = real.parent
    return reports


def report_file(root: Path, path: str) -> Path:
    """The file a ``/reports/<path>`` URL names: inside a report folder, of a known type; else a 404."""
    parts = path.split("/")
    missing = HTTPException(404, f"no report file {path!r}; list the reports at /api/reports")
    if any(part in ("", ".", "..") or part.startswith(".") or "\\" in part for part in parts):
        raise missing
    folders = find_reports(root)
    for name, folder in folders.items():
        prefix = [] if name == "." else name.split("/")
        if parts[: len(prefix)] != prefix or len(parts) == len(prefix):
            continue
        candidate = folder.joinpath(*parts[len(prefix) :]).resolve()  # parts already checked above
        if (
            candidate.is_relative_to(folder)
            and candidate.is_file()
            and candidate.suffix in REPORT_ASSET_TYPES
        ):
            return candidate
    raise missing


# ---------------------------------------------------------------------------------------------- the app
def create_app(
    runs_dir: str | Path = "runs",
    *,
    data_dir: str | None = None,
    device: str = "auto",
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    max_pixels: int = api.MAX_UPLOAD_PIXELS,
    max_batch: int = 64,
) -> FastAPI:
    """The FastAPI app serving the runs under ``runs_dir`` (see the module docstring).

    ``data_dir``: where the runs' datasets are found for the test-set samples (default: each run's, else
    ``$XAILAB_DATA_DIR``); ``device``: ``auto`` uses CUDA where present; ``max_upload_bytes`` and
    ``max_pixels`` bound an upload's file size and decoded size; ``max_batch``: most images answered in one
    forward pass when predictions arrive together (1: one pass per request).
    """
    root = Path(runs_dir)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cache = RunCache(root, device, data_dir, max_batch)
    app = FastAPI(
        title="xailab",
        summary="Predictions and explanations of the trained runs",
        version="0.1.0",
    )
    app.add_middleware(BodySizeLimit, max_bytes=max_upload_bytes + FORM_OVERHEAD_BYTES)
    app.state.cache = cache

    @app.exception_handler(XailabError)
    async def bad_input(_request: Request, exc: XailabError) -> JSONResponse:
        # Every deliberate xailab error is about the request (unknown method, unreadable image, ...).
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(Exception)
    async def server_error(_request: Request, exc: Exception) -> JSONResponse:
        # A bug, not bad input: still answered as JSON, and re-raised by Starlette so that it is logged.
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    def decode(file: UploadFile, entry: LoadedRun) -> Tensor:
        data = read_upload(file, max_upload_bytes)
        return api.decode_image(
            data, entry.run.image_size, entry.run.channels, max_pixels, name=file.filename or "upload"
        )

    @app.get("/api/runs", response_model=list[RunSummary], tags=["runs"])
    def list_runs() -> list[dict[str, Any]]:
        """Every run under the runs folder with its model, dataset, status and test accuracy."""
        return cache.summaries()

    @app.get("/api/methods", response_model=list[MethodInfo], tags=["explain"])
    def list_methods() -> list[MethodInfo]:
        """The explanation methods the explain endpoint accepts."""
        return [MethodInfo(name=n, description=METHODS.get(n).description) for n in api.list_methods()]

    @app.get("/api/reports", response_model=list[Report], tags=["reports"])
    def list_reports() -> list[Report]:
        """Every study report (``report.html``) found under the runs folder."""
        return [
            Report(name=name, url=f"/reports/{'' if name == '.' else quote(name) + '/'}{REPORT_FILE}")
            for name in find_reports(root)
        ]

    @app.post(
        "/api/runs/{run:path}/predict",
        response_model=Prediction,
        responses=errors(400, 404, 413),
        tags=["predict"],
    )
    def predict(run: str, file: Annotated[UploadFile, File()], top_k: TopK = 3) -> Prediction:
        """Top-``k`` classes with probabilities for an uploaded image (PNG, JPEG, BMP, GIF, TIFF, WebP)."""
        entry = cache.get(run)
        image = decode(file, entry)
        start = time.perf_counter()
        probs = entry.batcher.probabilities(image)[0]
        return Prediction(
            run=run, top=ranked(probs, entry.run.class_names, top_k), seconds=time.perf_counter() - start
        )

    @app.post(
        "/api/runs/{run:path}/explain",
        response_model=Explanation,
        responses=errors(400, 404, 413),
        tags=["explain"],
    )
    def explain(
        run: str,
        file: Annotated[UploadFile, File()],
        methods: Annotated[
            str, Form(description="comma-separated method names (see /api/methods)")
        ] = "gradcam",
        target: Annotated[
            str | None, Form(description="class name or index (default: the predicted class)")
        ] = None,
        top_k: TopK = 3,
        alpha: Annotated[float, Form(ge=0.0, le=1.0, description="heatmap weight in the overlay")] = 0.5,
        raw: Annotated[bool, Form(description="also return each raw map as [H][W] numbers")] = False,
    ) -> Explanation:
        """Explain the prediction for an uploaded image with one or more methods: PNG overlays (and raw maps)."""
        entry = cache.get(run)
        names = parse_methods(methods)
        image = decode(file, entry)
        probs = entry.batcher.probabilities(image)[0]
        class_names = entry.run.class_names
        target_index = parse_target(target, class_names, int(probs.argmax()))
        maps = []
        with entry.explain_lock:  # one explanation at a time per run: methods hook into the model
            for name in names:
                start = time.perf_counter()
                attribution = api.explain_images(entry.run, image, name, target_index, entry.explain_model)
                attribution = attribution[0].cpu()  # [1, H, W]
                maps.append(
                    MethodMap(
                        method=name,
                        overlay_png=png_data_url(overlay(image[0], attribution, alpha)),
                        heatmap_png=png_data_url(heatmap_rgb(attribution)),
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

    @app.get(
        "/api/runs/{run:path}/samples", response_model=list[Sample], responses=errors(400, 404), tags=["runs"]
    )
    def list_samples(run: str) -> list[Sample]:
        """A few test-set images of the run's dataset, to try the model on."""
        entry = cache.get(run)
        _, labels = cache.samples(entry)
        return [
            Sample(index=i, label=entry.run.class_names[int(y)], url=f"/api/runs/{quote(run)}/samples/{i}")
            for i, y in enumerate(labels.tolist())
        ]

    @app.get(
        "/api/runs/{run:path}/samples/{index}",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}, **errors(400, 404)},
        tags=["runs"],
    )
    def sample_image(run: str, index: int) -> Response:
        """Test-set image ``index`` of the run's dataset as PNG, at the run's input size."""
        entry = cache.get(run)
        images, _ = cache.samples(entry)
        if not 0 <= index < images.shape[0]:
            raise HTTPException(404, f"sample index {index} out of range: 0..{images.shape[0] - 1}")
        return Response(png_bytes(images[index].numpy()), media_type="image/png")

    @app.get("/api/runs/{run:path}", response_model=RunInfo, responses=errors(400, 404), tags=["runs"])
    def run_info(run: str) -> RunInfo:
        """One run: its classes, input size and channels, test metrics, and where it runs."""
        entry = cache.get(run)
        summary = next((r for r in cache.summaries() if r["run"] == run), None)
        if summary is None:  # removed since it was loaded
            raise HTTPException(404, f"run {run!r} is no longer under {root}/")
        test = entry.run.metrics.get("test", {})
        return RunInfo(
            **summary,
            class_names=list(entry.run.class_names),
            image_size=list(entry.run.image_size),
            channels=entry.run.channels,
            test_macro_f1=test.get("macro_f1"),
            device=str(next(entry.run.model.parameters()).device),
        )

    @app.get("/reports/{path:path}", response_class=FileResponse, responses=errors(404), tags=["reports"])
    def report(path: str) -> FileResponse:
        """A study's ``report.html`` (or a file beside it), found under the runs folder."""
        found = report_file(root, path)
        return FileResponse(
            found, media_type=REPORT_ASSET_TYPES[found.suffix], headers={"X-Content-Type-Options": "nosniff"}
        )

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
