"""Operations (SPEC §4): health, the admin routes and their token, the runtime storage
toggle, maintenance, the cache admin routes, and the OpenAPI document."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import ValidationError

from app.container import Container
from app.domain.credits import Attempt, Deduct
from app.main import API_PREFIX, API_ROUTERS, create_app
from tests.conftest import _admin, app_settings, fresh_database, run_outside_loop
from tests.support.app_client import client_for, running
from tests.support.relay import Relay, relayed

PGBOUNCER_TIER = True  # also behind PgBouncer in transaction pooling (tests/conftest.py)

ADMIN = {"Authorization": "Bearer test-admin-token"}
CREDITS = "/api/v1/credits"
CONSENTS = "/api/v1/consents"
QUERY = "/api/v1/assistant/query"
ADMIN_ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/admin/storage", None),
    ("PUT", "/admin/storage", {"backend": "memory"}),
    ("POST", "/admin/maintenance/cleanup", None),
    ("DELETE", "/admin/cache", None),
    ("GET", "/admin/cache/stats", None),
    ("POST", "/admin/audit", None),
]


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]


def container_of(app: FastAPI) -> Container:
    container: Container = app.state.container
    return container


async def storage(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/admin/storage", headers=ADMIN)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def switch(
    client: httpx.AsyncClient, backend: str, *, carry_state: bool = False
) -> dict[str, Any]:
    """Flips the flag, by default without carrying the state (tests/test_handover.py)."""
    request = {"backend": backend, "carry_state": carry_state}
    response = await client.put("/admin/storage", json=request, headers=ADMIN)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def stats(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/admin/cache/stats", headers=ADMIN)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def available(client: httpx.AsyncClient, user_id: str) -> int:
    value: int = (await client.get(f"{CREDITS}/{user_id}")).json()["available_credits"]
    return value


async def ask(client: httpx.AsyncClient, user_id: str, query: str) -> dict[str, Any]:
    response = await client.post(QUERY, json={"user_id": user_id, "query": query})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def other(backend: str) -> str:
    return "database" if backend == "memory" else "memory"


class TestHealth:
    async def test_liveness_is_200(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/health")
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}

    async def test_readiness_names_the_store_the_schema_revision_and_the_pool(
        self, client: httpx.AsyncClient, running_app: FastAPI
    ) -> None:
        response = await client.get("/health/ready")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["storage_backend"] == container_of(running_app).settings.storage_backend.value
        database = body["database"]
        assert database["reachable"] is True
        assert database["head"]
        assert database["revision"] == database["head"]
        pool = database["pool"]
        assert {"size", "in_use", "overflow_in_use"} <= set(pool)
        assert all(isinstance(value, int) and value >= 0 for value in pool.values())
        if database["dialect"] == "postgresql":  # the fast path's own connections
            assert database["fast_path"]["size"] == 10
            assert 0 <= database["fast_path"]["busy"] <= database["fast_path"]["open"] <= 10

    async def test_readiness_reports_a_closed_circuit_breaker_on_a_healthy_service(
        self, client: httpx.AsyncClient
    ) -> None:
        body = (await client.get("/health/ready")).json()
        breaker = [value for key, value in body.items() if "breaker" in key.lower()]
        assert breaker, f"no circuit-breaker state in {body}"
        assert "closed" in json.dumps(breaker)


class TestAdminToken:
    @pytest.mark.parametrize(
        "headers",
        [
            pytest.param({}, id="no-token"),
            pytest.param({"Authorization": "Bearer wrong-token"}, id="wrong-token"),
            pytest.param({"Authorization": "Bearer test-admin-token-2"}, id="longer-token"),
            pytest.param({"Authorization": "Basic test-admin-token"}, id="wrong-scheme"),
            pytest.param({"Authorization": "test-admin-token"}, id="no-scheme"),
        ],
    )
    async def test_every_admin_route_refuses_403_without_the_right_bearer_token(
        self, client: httpx.AsyncClient, running_app: FastAPI, headers: dict[str, str]
    ) -> None:
        before = await storage(client)
        for method, path, body in ADMIN_ROUTES:
            response = await client.request(method, path, json=body, headers=headers)
            assert_error(response, 403, "forbidden")
        assert await storage(client) == before

    async def test_a_refused_storage_switch_changes_nothing(
        self, client: httpx.AsyncClient
    ) -> None:
        backend = (await storage(client))["backend"]
        response = await client.put(
            "/admin/storage",
            json={"backend": other(backend)},
            headers={"Authorization": "Bearer nope"},
        )
        assert_error(response, 403, "forbidden")
        assert (await storage(client))["backend"] == backend


@pytest.fixture
async def tokenless_client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The application (memory store) with ADMIN_TOKEN unset."""
    settings = app_settings("memory", f"sqlite+aiosqlite:///{tmp_path}/unused.db", admin_token=None)
    async with running(settings) as (_, client):
        yield client


@pytest.mark.parametrize(
    "token", ["", "   ", "short-secret-15"], ids=["blank", "spaces", "fifteen-characters"]
)
def test_a_blank_or_short_admin_token_refuses_to_start_without_echoing_it(token: str) -> None:
    with pytest.raises(ValidationError) as refused:
        app_settings("memory", "sqlite+aiosqlite:///unused.db", admin_token=token)
    message = str(refused.value)
    assert "ADMIN_TOKEN is set but blank or shorter than 16 characters" in message
    assert token.strip() == "" or token not in message


class TestAdminWithoutToken:
    @pytest.mark.parametrize(
        "headers",
        [
            pytest.param({}, id="no-token"),
            pytest.param(ADMIN, id="the-test-token"),
            pytest.param({"Authorization": "Bearer "}, id="empty-bearer"),
        ],
    )
    async def test_every_admin_route_refuses_403_when_admin_token_is_not_set(
        self, tokenless_client: httpx.AsyncClient, headers: dict[str, str]
    ) -> None:
        for method, path, body in ADMIN_ROUTES:
            response = await tokenless_client.request(method, path, json=body, headers=headers)
            assert_error(response, 403, "forbidden")

    async def test_the_rest_of_the_service_still_works(
        self, tokenless_client: httpx.AsyncClient
    ) -> None:
        assert (await tokenless_client.get("/health")).status_code == 200
        assert (await tokenless_client.get(f"{CREDITS}/someone")).status_code == 200


class TestStorageToggle:
    async def test_get_storage_names_the_configured_backend(
        self, client: httpx.AsyncClient, running_app: FastAPI
    ) -> None:
        view = await storage(client)
        configured = container_of(running_app).settings.storage_backend.value
        assert view["backend"] == configured
        assert view["cache_backend"] == configured

    async def test_switching_sends_later_requests_to_the_chosen_store_without_copying(
        self, client: httpx.AsyncClient
    ) -> None:
        start = (await storage(client))["backend"]
        await client.post(f"{CREDITS}/toggler/deduct", json={"amount": 3})
        await client.put(
            f"{CONSENTS}/toggler", json={"terms_accepted": True, "marketing_consent": True}
        )

        view = await switch(client, other(start))
        assert view["backend"] == other(start)
        assert (await client.get("/health/ready")).json()["storage_backend"] == other(start)
        assert await available(client, "toggler") == 10
        assert (await client.get(f"{CONSENTS}/toggler")).status_code == 404
        await client.post(f"{CREDITS}/toggler/deduct", json={"amount": 1})

        assert (await switch(client, start))["backend"] == start
        assert await available(client, "toggler") == 7
        assert (await client.get(f"{CONSENTS}/toggler")).json()["marketing_consent"] is True
        ledger = (await client.get(f"{CREDITS}/toggler/transactions")).json()
        assert [row["amount"] for row in ledger] == [-3]

        await switch(client, other(start))
        assert await available(client, "toggler") == 9

    async def test_the_query_cache_follows_the_switch(self, client: httpx.AsyncClient) -> None:
        start = (await storage(client))["backend"]
        await client.put(f"{CONSENTS}/traveller", json={"terms_accepted": True})
        assert (await ask(client, "traveller", "rain jacket"))["cached"] is False

        assert (await switch(client, other(start)))["cache_backend"] == other(start)
        await client.put(f"{CONSENTS}/traveller", json={"terms_accepted": True})
        assert (await ask(client, "traveller", "rain jacket"))["cached"] is False

        await switch(client, start)
        assert (await ask(client, "traveller", "rain jacket"))["cached"] is True

    async def test_switching_to_the_active_backend_is_a_harmless_no_op(
        self, client: httpx.AsyncClient
    ) -> None:
        start = (await storage(client))["backend"]
        await client.post(f"{CREDITS}/steady/deduct")
        assert (await switch(client, start))["backend"] == start
        assert await available(client, "steady") == 9

    @pytest.mark.parametrize(
        "body",
        [
            {"backend": "redis"},
            {"backend": "MEMORY"},
            {"backend": ""},
            {"backend": None},
            {"backend": 1},
            {},
            {"backend": "memory", "carry_state": "yes"},
        ],
        ids=["redis", "upper-case", "empty", "null", "number", "missing", "carry-state-text"],
    )
    async def test_an_unknown_backend_is_422_and_changes_nothing(
        self, client: httpx.AsyncClient, body: dict[str, Any]
    ) -> None:
        before = await storage(client)
        response = await client.put("/admin/storage", json=body, headers=ADMIN)
        assert_error(response, 422, "validation_error")
        assert "detail" in response.json()
        assert await storage(client) == before


class TestMaintenance:
    async def test_cleanup_returns_the_counts_and_keeps_recent_rows(
        self, client: httpx.AsyncClient
    ) -> None:
        await client.post(f"{CREDITS}/recent/deduct", json={"amount": 2})
        response = await client.post("/admin/maintenance/cleanup", headers=ADMIN)
        assert response.status_code == 200, response.text
        assert response.json() == {
            "transactions_deleted": 0,
            "cache_entries_deleted": 0,
            "skipped": False,
        }
        ledger = (await client.get(f"{CREDITS}/recent/transactions")).json()
        assert [row["amount"] for row in ledger] == [-2]

    async def test_cleanup_deletes_old_ledger_rows_and_expired_cache_entries(
        self, client: httpx.AsyncClient, running_app: FastAPI
    ) -> None:
        stores = container_of(running_app).storage
        long_ago = datetime.now(UTC) - timedelta(days=200)
        await stores.stores.credits.apply("ancient", Deduct(2), Attempt(long_ago, "long-ago"))
        await stores.cache.set(
            hashlib.sha256(b"stale").hexdigest(),
            {"answer": "old", "products": []},
            now=long_ago,
            expires_at=long_ago + timedelta(hours=1),
        )
        await client.post(f"{CREDITS}/ancient/deduct")  # a fresh row, which stays

        response = await client.post("/admin/maintenance/cleanup", headers=ADMIN)
        assert response.json() == {
            "transactions_deleted": 1,
            "cache_entries_deleted": 1,
            "skipped": False,
        }
        ledger = (await client.get(f"{CREDITS}/ancient/transactions")).json()
        # The 200-day-old account was refilled on access: a reset row, then the fresh deduction.
        assert [row["transaction_type"] for row in ledger] == ["deduction", "reset"]
        again = await client.post("/admin/maintenance/cleanup", headers=ADMIN)
        assert again.json() == {
            "transactions_deleted": 0,
            "cache_entries_deleted": 0,
            "skipped": False,
        }


class TestCacheAdmin:
    async def test_stats_count_hits_misses_and_entries(self, client: httpx.AsyncClient) -> None:
        before = await stats(client)
        assert (before["hits"], before["misses"], before["entries"]) == (0, 0, 0)
        await client.put(f"{CONSENTS}/counter", json={"terms_accepted": True})
        await ask(client, "counter", "red running shoes")
        await ask(client, "counter", "RED running shoes")
        after = await stats(client)
        assert (after["hits"], after["misses"], after["entries"]) == (1, 1, 1)

    async def test_clearing_the_cache_makes_the_next_query_a_charged_miss(
        self, client: httpx.AsyncClient
    ) -> None:
        await client.put(f"{CONSENTS}/clearer", json={"terms_accepted": True})
        await ask(client, "clearer", "leather hiking boots")
        assert (await ask(client, "clearer", "leather hiking boots"))["cached"] is True

        response = await client.delete("/admin/cache", headers=ADMIN)
        assert response.status_code == 200, response.text
        assert (await stats(client))["entries"] == 0

        reply = await ask(client, "clearer", "leather hiking boots")
        assert reply["cached"] is False
        assert reply["credits"]["available_credits"] == 8

    async def test_clearing_the_cache_keeps_credits_and_consents(
        self, client: httpx.AsyncClient
    ) -> None:
        await client.put(f"{CONSENTS}/keeper", json={"terms_accepted": True})
        await ask(client, "keeper", "rain jacket")
        await client.delete("/admin/cache", headers=ADMIN)
        assert await available(client, "keeper") == 9
        assert (await client.get(f"{CONSENTS}/keeper")).status_code == 200


# --- the OpenAPI document ------------------------------------------------------------------

SPEC_ROUTES = [
    ("get", "/api/v1/credits/{user_id}"),
    ("post", "/api/v1/credits/{user_id}/deduct"),
    ("post", "/api/v1/credits/{user_id}/refund"),
    ("post", "/api/v1/credits/{user_id}/upgrade"),
    ("get", "/api/v1/credits/{user_id}/transactions"),
    ("put", "/api/v1/consents/{user_id}"),
    ("get", "/api/v1/consents/{user_id}"),
    ("patch", "/api/v1/consents/{user_id}"),
    ("post", "/api/v1/assistant/query"),
    ("get", "/health"),
    ("get", "/health/ready"),
    ("get", "/admin/storage"),
    ("put", "/admin/storage"),
    ("post", "/admin/maintenance/cleanup"),
    ("delete", "/admin/cache"),
    ("get", "/admin/cache/stats"),
    ("post", "/admin/audit"),
]
DOCUMENTED_ERRORS = [
    ("post", "/api/v1/credits/{user_id}/deduct", "402"),
    ("get", "/api/v1/consents/{user_id}", "404"),
    ("patch", "/api/v1/consents/{user_id}", "404"),
    ("post", "/api/v1/assistant/query", "402"),
    ("post", "/api/v1/assistant/query", "403"),
    *[(method, path, "403") for method, path in SPEC_ROUTES if path.startswith("/admin")],
    *[(method, path, "422") for method, path in SPEC_ROUTES if path.startswith("/api/v1")],
]


@pytest.fixture(scope="module")
def openapi(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The document as served at /openapi.json (no store is needed to serve it)."""
    url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('openapi')}/unused.db"
    app = create_app(app_settings("memory", url))

    async def fetch() -> httpx.Response:  # no lifespan: nothing connects
        async with client_for(app) as client:
            return await client.get("/openapi.json")

    response = run_outside_loop(fetch())
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    return document


def resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = document["components"]["schemas"][name]
    return schema


class TestOpenAPI:
    @pytest.mark.parametrize(("method", "path"), SPEC_ROUTES)
    def test_every_route_of_the_contract_is_documented(
        self, openapi: dict[str, Any], method: str, path: str
    ) -> None:
        assert method in openapi["paths"].get(path, {}), f"{method.upper()} {path} is missing"

    @pytest.mark.parametrize(("method", "path", "status"), DOCUMENTED_ERRORS)
    def test_error_responses_are_documented_with_the_error_body(
        self, openapi: dict[str, Any], method: str, path: str, status: str
    ) -> None:
        responses = openapi["paths"][path][method]["responses"]
        assert status in responses, f"{method.upper()} {path} does not document {status}"
        if status == "422":
            return  # FastAPI's own validation schema or the error body: either is fine
        schema = resolve(openapi, responses[status]["content"]["application/json"]["schema"])
        error = resolve(openapi, schema["properties"]["error"])
        assert {"code", "message"} <= set(error["properties"])

    def test_the_deduct_route_documents_the_idempotency_key_header(
        self, openapi: dict[str, Any]
    ) -> None:
        parameters = openapi["paths"]["/api/v1/credits/{user_id}/deduct"]["post"]["parameters"]
        headers = {p["name"]: p for p in parameters if p["in"] == "header"}
        assert "Idempotency-Key" in headers

    def test_the_api_routes_are_documented_as_include_router_documents_them(
        self, openapi: dict[str, Any]
    ) -> None:
        """The API routes are added to the application directly (app/main.py), for speed;
        the document must not tell the difference."""
        included = FastAPI(title=openapi["info"]["title"], version=openapi["info"]["version"])
        for router in API_ROUTERS:
            included.include_router(router, prefix=API_PREFIX)
        expected = included.openapi()
        api_paths = {
            path: item for path, item in openapi["paths"].items() if path in expected["paths"]
        }
        assert api_paths == expected["paths"]
        for name, schema in expected["components"]["schemas"].items():
            assert openapi["components"]["schemas"][name] == schema

    def test_the_admin_routes_declare_bearer_authentication(self, openapi: dict[str, Any]) -> None:
        schemes = openapi["components"]["securitySchemes"].values()
        assert any(s.get("type") == "http" and s.get("scheme") == "bearer" for s in schemes)
        assert openapi["paths"]["/admin/storage"]["get"].get("security")


@pytest.fixture
async def proxied_app(request: pytest.FixtureRequest) -> AsyncIterator[tuple[FastAPI, Relay]]:
    """The application on PostgreSQL, reached through a relay the test can cut."""
    async with fresh_database(request, "postgres") as url, relayed(url) as (via, relay):
        app = create_app(app_settings("postgres", via, db_breaker_reset_seconds=0.3))
        async with app.router.lifespan_context(app):
            yield app, relay


STORE_ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", f"{CREDITS}/outage", None),
    ("POST", f"{CREDITS}/outage/deduct", {}),
    ("GET", f"{CREDITS}/outage/transactions", None),
    ("PUT", f"{CONSENTS}/outage", {"terms_accepted": True}),
    ("POST", QUERY, {"user_id": "outage", "query": "red shoes"}),
    ("POST", "/admin/maintenance/cleanup", None),
]


async def assert_unavailable_quickly(client: httpx.AsyncClient) -> None:
    for method, path, body in STORE_ROUTES:
        started = time.monotonic()
        response = await client.request(method, path, json=body, headers=ADMIN)
        assert time.monotonic() - started < 10, f"{method} {path} hung"
        assert_error(response, 503, "storage_unavailable")
        assert int(response.headers["Retry-After"]) > 0


async def eventually_served(client: httpx.AsyncClient, path: str) -> httpx.Response:
    """The first 200 within 10 s: an open circuit breaker lets a probe through after its
    reset timeout (shortened in `proxied_app`)."""
    deadline = time.monotonic() + 10
    while True:
        response = await client.get(path)
        if response.status_code == 200 or time.monotonic() > deadline:
            assert response.status_code == 200, f"never recovered: {response.text}"
            return response
        assert_error(response, 503, "storage_unavailable")
        await asyncio.sleep(0.1)


@pytest.mark.postgres
class TestDatabaseOutage:
    async def test_store_routes_answer_503_with_retry_after_while_the_database_is_gone(
        self, proxied_app: tuple[FastAPI, Relay]
    ) -> None:
        app, proxy = proxied_app
        async with client_for(app, raise_app_exceptions=False) as client:
            assert (await client.post(f"{CREDITS}/outage/deduct")).status_code == 200
            await proxy.cut()
            await assert_unavailable_quickly(client)
            assert (await client.get("/health")).status_code == 200
            ready = await client.get("/health/ready")
            assert ready.status_code == 503
            assert ready.json()["database"]["reachable"] is False

            await proxy.restore()
            response = await eventually_served(client, f"{CREDITS}/outage")
            assert response.json()["available_credits"] == 9
            assert (await client.get("/health/ready")).status_code == 200

    async def test_store_routes_answer_503_when_the_database_refuses_connections(
        self, request: pytest.FixtureRequest, proxied_app: tuple[FastAPI, Relay]
    ) -> None:
        app, _ = proxied_app
        name = container_of(app).engine.url.database
        await _admin(
            request.getfixturevalue("postgres_server"),
            f"ALTER DATABASE {name} ALLOW_CONNECTIONS false",
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'",
        )
        async with client_for(app, raise_app_exceptions=False) as client:
            assert (await client.get("/health/ready")).status_code == 503
            await assert_unavailable_quickly(client)


class TestSwitchingToADatabaseThatIsDown:
    async def test_the_switch_is_refused_503_and_the_memory_store_keeps_serving(
        self, tmp_path: Path
    ) -> None:
        with socket.socket() as probe:  # a port nothing listens on
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        url = f"postgresql+asyncpg://nobody@127.0.0.1:{port}/nothing"
        app = create_app(app_settings("memory", url))
        async with (
            app.router.lifespan_context(app),
            client_for(app, raise_app_exceptions=False) as client,
        ):
            await client.post(f"{CREDITS}/stayer/deduct")
            ready = await client.get("/health/ready")
            assert ready.status_code == 200
            assert ready.json()["database"]["reachable"] is False

            started = time.monotonic()
            response = await client.put(
                "/admin/storage", json={"backend": "database"}, headers=ADMIN
            )
            assert time.monotonic() - started < 10
            assert_error(response, 503, "storage_unavailable")
            assert "Retry-After" in response.headers
            assert (await storage(client))["backend"] == "memory"
            assert await available(client, "stayer") == 9
