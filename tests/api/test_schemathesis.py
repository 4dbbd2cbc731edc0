"""Property-based run over the app's own OpenAPI schema: no input makes the server fail.

Checks: no 5xx, responses match their documented schema, status codes and content types are documented,
and schema-invalid input is rejected. Not checked: acceptance of every schema-valid request (a valid
profile id may simply not exist: 404; a schema-valid profile may have nothing to plan from: 422) and
Starlette's ``Allow`` header on 405 for paths with one route per method.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from api.app import create_app

REPO = Path(__file__).resolve().parents[2]


def _app(tmp: Path, **options):
    tmp.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "configs" / "profiles" / "synthetic-vicuna-7b-h100.json", tmp / "syn.json")
    return create_app(tmp, **options)


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory):
    return schemathesis.openapi.from_asgi("/openapi.json", _app(tmp_path_factory.mktemp("profiles")))


@pytest.fixture(scope="module")
def locked_api_schema(tmp_path_factory: pytest.TempPathFactory):
    """Writes need a token the generated requests do not have: every POST is a documented 401."""
    app = _app(tmp_path_factory.mktemp("locked"), api_key="not-sent")
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")
locked_schema = schemathesis.pytest.from_fixture("locked_api_schema")
CHECKS = [
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
    content_type_conformance,
    negative_data_rejection,
]


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_error(case) -> None:
    case.call_and_validate(checks=CHECKS)


@pytest.mark.slow
@locked_schema.include(method="POST").parametrize()
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_error_with_writes_locked(case) -> None:
    case.call_and_validate(checks=CHECKS)
