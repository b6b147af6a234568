"""Experiment tracking of a study: ``mlflow`` logs each cell as a nested run (parameters, per-epoch metrics,
test metrics, the model and its record) under one run for the study, which also gets the report.

Tracking reads the cells' records in this process after each cell finishes, so it works the same with the
``local`` and the ``ray`` executor.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xailab.registry import Registry

if TYPE_CHECKING:  # mlflow is an optional extra, imported only when tracking is on
    from mlflow import ActiveRun

TRACKERS: Registry = Registry("tracker")


def flat_params(prefix: str, value: Any) -> dict[str, str]:
    """Nested dicts as ``a.b`` -> str, the form tracking servers accept."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for k, v in value.items():
            out.update(flat_params(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: str(value)}


@contextlib.contextmanager
def file_store_allowed(uri: str) -> Iterator[None]:
    """MLflow 3 refuses its file store unless ``MLFLOW_ALLOW_FILE_STORE`` is set; set it for the block only,
    and only for a ``file:`` URI (the database backends need SQLAlchemy, which mlflow-skinny lacks)."""
    if not uri.startswith("file:"):
        yield
        return
    previous = os.environ.get("MLFLOW_ALLOW_FILE_STORE")
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)
        else:
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = previous


@TRACKERS.register("mlflow")
class MlflowTracker:
    """A study callback logging to MLflow at ``uri`` (default: a local file store ``<out>/mlruns``)."""

    def __init__(self, study_dir: str | Path, uri: str | None = None) -> None:
        import mlflow  # an optional extra: imported only when tracking is asked for

        self.mlflow = mlflow
        self.study_dir = Path(study_dir)
        self.uri = uri or (self.study_dir.parent / "mlruns").resolve().as_uri()
        self.parent: ActiveRun | None = None  # the study's run, once begun

    def on_study_begin(self, spec: Any, cells: list[Any]) -> None:
        """Open the study's run in the experiment named after the study."""
        with file_store_allowed(self.uri):
            self._study_begin(spec, cells)

    def on_cell_end(self, record: dict[str, Any]) -> None:
        """Log a finished cell as a nested run: recipe, per-epoch and test metrics, weights and record."""
        with file_store_allowed(self.uri):
            self._cell_end(record)

    def on_study_end(self, report: Path) -> None:
        """Attach the report (HTML, CSV, Markdown, images) to the study's run and close it."""
        with file_store_allowed(self.uri):
            self._study_end(report)

    def on_study_failed(self) -> None:
        """Close the study's run as failed (interrupted or raised); the cells logged so far stay."""
        with file_store_allowed(self.uri):
            self.mlflow.end_run(status="FAILED")

    def _study_begin(self, spec: Any, cells: list[Any]) -> None:
        self.mlflow.set_tracking_uri(self.uri)
        self.mlflow.set_experiment(spec.name)
        self.parent = self.mlflow.start_run(run_name=f"study {spec.name}")
        self.mlflow.log_params(
            {"study": spec.name, "cells": len(cells), **flat_params("study", {"methods": spec.methods})}
        )

    def _cell_end(self, record: dict[str, Any]) -> None:
        cell_dir = self.study_dir / record["cell"]
        with self.mlflow.start_run(run_name=record["cell"], nested=True):
            self.mlflow.log_params(flat_params("", record["train_config"]))
            for row in record["history"]:
                values = {k: v for k, v in row.items() if k != "epoch" and isinstance(v, int | float)}
                self.mlflow.log_metrics(values, step=int(row["epoch"]))
            test = record.get("test", {})
            self.mlflow.log_metrics(
                {f"test_{k}": v for k, v in test.items() if isinstance(v, int | float) and k != "n"}
            )
            for name in ("model.safetensors", "config.json", "record.json", "history.csv"):
                if (cell_dir / name).is_file():
                    self.mlflow.log_artifact(str(cell_dir / name))

    def _study_end(self, report: Path) -> None:
        for name in ("report.html", "results.csv", "results.md"):
            self.mlflow.log_artifact(str(report.parent / name), artifact_path="report")
        self.mlflow.log_artifacts(str(report.parent / "report_files"), artifact_path="report/report_files")
        self.mlflow.end_run()
