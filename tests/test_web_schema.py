"""Schemathesis against the app's own OpenAPI schema: generated requests (random run names, files, forms)
never get a 500, and every answer matches the schema (documented status codes and bodies).

Hypothesis drives each operation's strategy directly: schemathesis' lazy pytest fixture does not work with
pytest 9's nodes, and this keeps the number of examples (and the time) bounded and explicit."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error, response_schema_conformance, status_code_conformance

from web_helpers import RUN, digit_png, train_tiny_run
from xailab.web import create_app

CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]
EXAMPLES_PER_OPERATION = 15


@pytest.fixture(scope="module")
def operations(tmp_path_factory):
    app = create_app(train_tiny_run(tmp_path_factory))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    return {f"{op.method.upper()} {op.path}": op for op in (r.ok() for r in schema.get_all_operations())}


def test_the_schema_lists_every_endpoint(operations):
    assert set(operations) == {
        "GET /api/runs",
        "GET /api/methods",
        "GET /api/reports",
        "POST /api/runs/{run}/predict",
        "POST /api/runs/{run}/explain",
        "GET /api/runs/{run}/samples",
        "GET /api/runs/{run}/samples/{index}",
        "GET /api/runs/{run}",
        "GET /reports/{path}",
    }


@pytest.mark.parametrize(
    ("real_run", "real_image"),
    [(False, False), (True, False), (True, True)],
    ids=["generated", "the-trained-run", "the-trained-run-and-a-digit"],
)
def test_generated_requests_get_no_server_error(operations, real_run, real_image):
    """Whatever run names, files and fields are generated: a documented 2xx/4xx, never a 500. With
    ``real_run`` the run name is the trained run's and with ``real_image`` the uploaded file a digit, so the
    checks past the run lookup and the image decoding are reached with generated values of the other fields."""
    digit = digit_png(0)[0]
    for operation in operations.values():

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case):
            if real_run and "run" in (case.path_parameters or {}):
                case.path_parameters = {**case.path_parameters, "run": RUN}
            if real_image and isinstance(case.body, dict) and "file" in case.body:
                case.body = {**case.body, "file": digit}
            case.call_and_validate(checks=CHECKS)

        check()
