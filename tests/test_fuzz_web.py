"""Schemathesis over the web API with broken run folders beside a healthy one: generated requests on every
endpoint, aimed at the healthy run, at each broken one and at unknown names, never get a 5xx, and the
healthy run keeps answering. Bounded: a few examples per operation and run (well under a minute)."""

from __future__ import annotations

import json
import shutil

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error, status_code_conformance

from web_helpers import RUN, digit_png, train_tiny_run
from xailab.web import create_app

CHECKS = [not_a_server_error, status_code_conformance]
EXAMPLES_PER_OPERATION = 12


def break_config(folder, change) -> None:
    """Rewrite ``folder/config.json`` through ``change(meta) -> meta``."""
    path = folder / "config.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


# Broken run folders: corrupt files and hostile config.json values (issue: a broken run takes the app down).
DAMAGE = {
    "corrupt_metrics": lambda f: (f / "metrics.json").write_text('{"test": {"accuracy": '),
    "metrics_not_a_dict": lambda f: (f / "metrics.json").write_text("[1, 2]"),
    "corrupt_config": lambda f: (f / "config.json").write_bytes(b"\xff\xfe{not json"),
    "empty_train": lambda f: break_config(f, lambda m: {**m, "train": {}}),
    "no_dataset": lambda f: break_config(f, lambda m: {k: v for k, v in m.items() if k != "dataset"}),
    "huge_image": lambda f: break_config(
        f, lambda m: {**m, "dataset": {**m["dataset"], "image_size": [10**5] * 2}}
    ),
    "negative_channels": lambda f: break_config(
        f, lambda m: {**m, "dataset": {**m["dataset"], "channels": -3}}
    ),
    "text_mean": lambda f: break_config(f, lambda m: {**m, "dataset": {**m["dataset"], "mean": ["grey"]}}),
    "no_weights": lambda f: (f / "model.safetensors").unlink(),
}


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    source = train_tiny_run(tmp_path_factory) / RUN
    root = tmp_path_factory.mktemp("fuzz_runs")
    shutil.copytree(source, root / "good")
    for name, damage in DAMAGE.items():
        shutil.copytree(source, root / name)
        damage(root / name)
    return root


@pytest.fixture(scope="module")
def app(runs_root):
    return create_app(runs_root)


def test_broken_runs_are_listed_and_the_healthy_one_still_predicts(app):
    client = TestClient(app)
    rows = {r["run"]: r for r in client.get("/api/runs").json()}
    assert set(rows) == {"good", *DAMAGE}
    assert rows["good"]["status"] != "broken"
    # a missing weights file is only found when the run is loaded: its listing is not broken, its use is a 400
    assert {n for n, r in rows.items() if r["status"] == "broken"} == set(DAMAGE) - {"no_weights"}
    for name in DAMAGE:
        response = client.post(f"/api/runs/{name}/predict", files={"file": ("d.png", digit_png(0)[0])})
        assert response.status_code == 400, (name, response.text)
    response = client.post("/api/runs/good/predict", files={"file": ("d.png", digit_png(0)[0])})
    assert response.status_code == 200 and len(response.json()["top"]) == 3


def test_generated_requests_get_no_server_error(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    runs = st.sampled_from(["good", *DAMAGE, "nope", "good/../good"])
    digit = digit_png(0)[0]
    for operation in operations:

        @given(case=operation.as_strategy(), run=runs, real_image=st.booleans())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case, run, real_image):
            if "run" in (case.path_parameters or {}):
                case.path_parameters = {**case.path_parameters, "run": run}
            if real_image and isinstance(case.body, dict) and "file" in case.body:
                case.body = {**case.body, "file": digit}
            case.call_and_validate(checks=CHECKS)

        check()
    assert TestClient(app).get("/api/runs/good").status_code == 200  # the healthy run survived it all
