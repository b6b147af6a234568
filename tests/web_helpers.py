"""Shared by the web tests: a tiny trained run on the bundled digits, image bytes, a loopback server."""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI
from PIL import Image

from xailab import load_dataset, train

RUN = "tiny_digits"


def train_tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A runs folder holding ``tiny_digits``: ``mnist_cnn`` trained for one epoch on 400 bundled digits (a few
    seconds on a CPU). Trained once per test session, in the session's temporary folder, and shared by the
    web test modules, which only read it. The model is barely trained: tests compare the app with the Python
    API, not with the labels."""
    root = tmp_path_factory.getbasetemp() / "web_runs"
    if (root / RUN / "model.safetensors").is_file():
        return root
    train(
        {
            "model": "mnist_cnn",
            "dataset": "digits",
            "epochs": 1,
            "batch_size": 32,
            "precision": "fp32",
            "train_limit": 400,
            "val_fraction": 0.0,
        },
        out_dir=root,
        name=RUN,
        progress=False,
    )
    return root


def png_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    """uint8 ``[H, W]`` or ``[H, W, 3]`` encoded as ``fmt``."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt)
    return buf.getvalue()


def digit_png(index: int = 0) -> tuple[bytes, int]:
    """Test digit ``index`` of the bundled ``digits`` set, upscaled to 28x28 like an MNIST image, as PNG bytes,
    with its label."""
    test = load_dataset("digits")["test"]
    image = Image.fromarray(test.images[index, :, :, 0].numpy()).resize((28, 28), Image.NEAREST)
    return png_bytes(np.asarray(image)), int(test.labels[index])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def loopback_server(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1 in a thread; yields its base URL, stops it on exit."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the loopback server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
