"""Serving the runs: a cache loading each run once (a broken run folder is refused on its own, never taking
the others down) and a batcher answering concurrent predictions of a run in shared forward passes."""

from __future__ import annotations

import copy
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, SimpleQueue
from typing import Any

import torch
from fastapi import HTTPException
from torch import Tensor, nn

from xailab import api

SAMPLES_PER_RUN = 24


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
        """``xailab.api.list_runs`` of the root (re-read each time, so new runs appear; broken ones are listed
        with status ``broken`` and the reason)."""
        return api.list_runs(self.root)

    def summary(self, name: str) -> dict[str, Any]:
        """The listed summary of run ``name``; a name that is not a listed run is a 404 naming the nearest."""
        rows = self.summaries()
        for row in rows:
            if row["run"] == name:  # the only check a name needs: it is never joined into a path
                return row
        names = [r["run"] for r in rows]
        listed = ", ".join(names) if names else f"none (train one into {self.root}/)"
        raise HTTPException(404, f"unknown run {name!r}.{api.did_you_mean(name, names)} Runs: {listed}.")

    def get(self, name: str) -> LoadedRun:
        """The loaded run called ``name``: a 404 when no such run is listed, a 400 saying why when its folder
        is broken."""
        entry = self._loaded.get(name)
        if entry is not None:
            return entry
        row = self.summary(name)
        if row["status"] == "broken":
            raise HTTPException(400, f"run {name!r} is broken: {row.get('error')}")
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
