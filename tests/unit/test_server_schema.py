"""schemathesis against the live OpenAPI document of a real ``ttenv serve``: generated requests
(valid and invalid) for every operation, with a valid token; no 5xx, every answer's status,
content type, headers and body as the document says.

The server has an EMPTY image dir and tiny quotas, so no generated request can ever start a VM:
a create fails on its image (404), its quota (409) or its schema (422). ``EXAMPLES`` per
operation and mode gives well over 1000 cases in total (counted and asserted at the end).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from helpers.server import Server, start_server

if TYPE_CHECKING:
    from schemathesis.specs.openapi.schemas import OpenApiCase

EXAMPLES = 90  # per operation (hypothesis max_examples); with the explicit examples and coverage cases ~1475
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
_count = {"cases": 0}
_lock = threading.Lock()


@pytest.fixture(scope="module")
def schema_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("schema")
    (tmp / "images").mkdir()
    server = start_server(
        tmp,
        tmp / "images",
        options=["--cpu-total", "1", "--mem-total", "256", "--disk-total", "1", "--log-level", "warning"],
    )
    try:
        yield server
    finally:
        server.cleanup()
        assert not (server.state / "envs").exists() or list((server.state / "envs").iterdir()) == []


@pytest.fixture(scope="module")
def api(schema_server: Server) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{schema_server.url}/v1/openapi.json")


schema = schemathesis.pytest.from_fixture("api")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_generated_requests(case: OpenApiCase, schema_server: Server) -> None:
    with _lock:
        _count["cases"] += 1
    case.call_and_validate(base_url=schema_server.url, headers=schema_server.headers(), checks=CHECKS, timeout=60)


def test_enough_cases_ran_and_nothing_was_created(schema_server: Server) -> None:
    """Runs after the generated tests (file order): they made at least 1000 requests and left no ENV."""
    assert _count["cases"] >= 1000, _count
    assert schema_server.backend().list_envs() == []
    assert not Path(schema_server.state / "envs").exists() or list((schema_server.state / "envs").iterdir()) == []
    print(f"schemathesis: {_count['cases']} generated requests")
