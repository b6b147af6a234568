"""The web app: a JSON inference API (FastAPI; schema at ``/openapi.json``) and a static page on top of it.

``create_app(runs_dir)`` serves the runs found under ``runs_dir``: list them, predict (image upload -> top-k
classes with probabilities), explain (image + methods + method parameters -> PNG overlays and, on request,
the raw maps), a few test-set images per run, and the studies' ``report.html`` pages. The app is split by
concern: ``schemas`` (the JSON shapes), ``routes`` (the endpoints), ``serving`` (run cache and prediction
batcher), ``limits`` (request sizes) and ``reports`` (report-file security). Every model call goes through
``xailab.api``.

Safety: run names are looked up among the listed runs and never joined into a path; a broken run folder is
listed as broken and refused on its own; report files are served only from folders holding a
``report.html`` under ``runs_dir`` after resolving symlinks; request bodies are capped; uploads are decoded
by content with a pixel limit checked before decoding; every bad input is a 4xx ``{"detail": "..."}``
naming what is wrong.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from xailab import api
from xailab.errors import XailabError
from xailab.web.limits import FORM_OVERHEAD_BYTES, MAX_UPLOAD_BYTES, BodySizeLimit
from xailab.web.routes import WebState, router
from xailab.web.serving import RunCache

STATIC_DIR = Path(__file__).parent / "static"


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
    ``$XAILAB_DATA_DIR``); ``device``: ``auto`` uses CUDA where present (a device this machine lacks raises
    ``ConfigError``); ``max_upload_bytes`` and ``max_pixels`` bound an upload's file size and decoded size;
    ``max_batch``: most images answered in one forward pass when predictions arrive together (1: one pass per
    request).
    """
    root = Path(runs_dir)
    cache = RunCache(root, api.resolve_device(device), data_dir, max_batch)
    app = FastAPI(
        title="xailab",
        summary="Predictions and explanations of the trained runs",
        version="0.1.0",
    )
    app.add_middleware(BodySizeLimit, max_bytes=max_upload_bytes + FORM_OVERHEAD_BYTES)
    app.state.web = WebState(root, cache, max_upload_bytes, max_pixels)
    app.state.cache = cache

    @app.exception_handler(XailabError)
    async def bad_input(_request: Request, exc: XailabError) -> JSONResponse:
        # Every deliberate xailab error is about the request (unknown method, unreadable image, ...) or the
        # run folder it names (corrupt files).
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(Exception)
    async def server_error(_request: Request, exc: Exception) -> JSONResponse:
        # A bug, not bad input: still answered as JSON, and re-raised by Starlette so that it is logged.
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    app.include_router(router)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
