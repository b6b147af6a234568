"""MLflow tracking of a study into a local file store: parameters, per-epoch metrics and artifacts."""

from __future__ import annotations

import json
import os

import pytest
from mlflow.tracking import MlflowClient

from xailab.study import run_study, spec_from_dict

pytestmark = pytest.mark.usefixtures("single_thread")


def test_mlflow_logs_params_metrics_and_artifacts(tmp_path, monkeypatch):
    spec = spec_from_dict(
        {
            "name": "tiny-mlflow",
            "datasets": ["digits"],
            "models": ["keras_cnn"],
            "model_options": {"keras_cnn": {"image_size": 16}},
            "train": {"epochs": 3, "batch_size": 64, "image_size": 16, "train_limit": 256},
            "methods": ["gradcam"],
            "metrics": ["sparseness"],
            "n_explain": 2,
            "n_gallery": 1,
        }
    )
    report = run_study(spec, out=tmp_path, tracking="mlflow", progress=False)
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ  # set for xailab's calls only
    uri = (tmp_path / "mlruns").resolve().as_uri()  # the default: a file store beside the studies
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store only when asked
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tiny-mlflow")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 1
    parent, child = parents[0], children[0]
    assert parent.info.status == "FINISHED"
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.tags["mlflow.runName"] == "keras_cnn__digits"

    params = child.data.params
    assert (
        params["model"] == "keras_cnn"
        and params["epochs"] == "3"
        and params["model_options.image_size"] == "16"
    )
    losses = client.get_metric_history(child.info.run_id, "train_loss")
    assert [m.step for m in losses] == [1, 2, 3]
    history = json.loads((report.parent / "keras_cnn__digits" / "history.json").read_text())
    assert [m.value for m in losses] == [row["train_loss"] for row in history]
    assert 0 <= child.data.metrics["test_accuracy"] <= 1

    child_files = {f.path for f in client.list_artifacts(child.info.run_id)}
    assert {"model.safetensors", "record.json", "config.json"} <= child_files
    report_files = {f.path for f in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.html", "report/results.csv", "report/results.md"} <= report_files
