"""Property-based requests over the whole OpenAPI document (schemathesis), against the
service started as it is deployed (`python -m app`, real uvicorn, API_AUTH=token, the admin
token set): whatever the schema lets a client send, and whatever it does not, the answer is
never a 500. SCHEMATHESIS_EXAMPLES sets the examples per operation (25)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.support.served import served

SERVICE_TOKEN = "schemathesis-service-token"
ADMIN_TOKEN = "schemathesis-admin-token"
EXAMPLES = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "25"))


@schemathesis.serializer("application/x-ndjson")
def _ndjson(_: Any, value: Any) -> bytes:
    """The import route's body: whatever was generated, one JSON document per line (a
    list's items each on its own); the stream is then most likely refused with 422."""
    if isinstance(value, bytes):
        return value
    items = value if isinstance(value, list) else [value]
    return "".join(json.dumps(item) + "\n" for item in items).encode()


@pytest.fixture(scope="module")
def served_at(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The service on SQLite in its own process; its base URL."""
    database = tmp_path_factory.mktemp("schemathesis") / "service.db"
    with served(
        database,
        API_AUTH="token",
        API_TOKENS=SERVICE_TOKEN,
        ADMIN_TOKEN=ADMIN_TOKEN,
        ERASURE_KEY="schemathesis-erasure-key-0123456789",
    ) as running:
        yield running.base


def test_no_request_the_schema_describes_is_answered_500(served_at: str) -> None:
    schema = schemathesis.openapi.from_url(f"{served_at}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15  # every route of the document, admin ones included
    for operation in operations:
        token = ADMIN_TOKEN if operation.path.startswith("/admin") else SERVICE_TOKEN
        _fuzz(operation, served_at, {"Authorization": f"Bearer {token}"})


def _fuzz(operation: Any, served: str, headers: dict[str, str]) -> None:
    """EXAMPLES requests generated for one operation, each checked for a 500."""

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=os.environ.get("CI", "").lower() in {"1", "true", "yes"},
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(case=operation.as_strategy())
    def no_server_error(case: Any) -> None:
        case.call_and_validate(base_url=served, headers=headers, checks=[not_a_server_error])

    no_server_error()
