"""Shared fixtures: where the read-only copy of the real datasets lives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _no_autotune(monkeypatch):
    """Tests run the fixed configuration rules (``XAILAB_AUTOTUNE=0``): measuring speed would make results
    depend on the machine and its load, and cost seconds per new model. ``tests/test_autotune.py`` turns the
    autotuner on where it tests it."""
    monkeypatch.setenv("XAILAB_AUTOTUNE", "0")


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The shared dataset folder: ``XAILAB_DATA_DIR``, else ``<repo>/../shared/datasets``; skip if absent.

    It is read-only: tests write caches and downloads to ``tmp_path`` only.
    """
    env = os.environ.get("XAILAB_DATA_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
    if not path.is_dir():
        pytest.skip(f"shared dataset folder {path} is absent (set XAILAB_DATA_DIR to a copy of it)")
    return path


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a test module: small batches gain nothing from more, and on a busy machine the
    thread barriers between small ops (e.g. DenseNet's) dominate. Use with ``pytest.mark.usefixtures``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
