"""Bad input (SPEC §4 input bounds): every refusal is a 4xx with the error body
`{"error": {"code", "message"}}` (422 for validation, which also carries FastAPI's
`detail`), never a 500, and a refused request writes nothing.

Values a store could trip over if they got through (lengths, NUL, non-ASCII text,
out-of-range numbers, non-standard JSON) run on the memory, SQLite and PostgreSQL stores
through `client`. Values of the wrong JSON type, unparsable bodies, unknown routes and
methods never reach a store: they use a cheap in-memory application (`memory_client`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.container import Container
from tests.conftest import app_settings
from tests.support.app_client import running

CREDITS = "/api/v1/credits"
CONSENTS = "/api/v1/consents"
QUERY = "/api/v1/assistant/query"
ADMIN = {"Authorization": "Bearer test-admin-token"}
JSON = {"Content-Type": "application/json"}


def assert_refused(response: httpx.Response, status: int | None = None) -> dict[str, Any]:
    """A 4xx (`status` when given) with the service's error body; 422s keep `detail`."""
    assert 400 <= response.status_code < 500, f"{response.status_code}: {response.text}"
    if status is not None:
        assert response.status_code == status, response.text
    body = response.json()
    error: dict[str, Any] = body["error"]
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["message"], str) and error["message"]
    if response.status_code == 422:
        assert error["code"] in {"validation_error", "invalid_input"}
        assert isinstance(body.get("detail"), list) and body["detail"]
    return error


async def ledger(client: httpx.AsyncClient, user_id: str) -> list[int]:
    response = await client.get(f"{CREDITS}/{user_id}/transactions")
    assert response.status_code == 200, response.text
    return [row["amount"] for row in response.json()]


async def available(client: httpx.AsyncClient, user_id: str) -> int:
    response = await client.get(f"{CREDITS}/{user_id}")
    assert response.status_code == 200, response.text
    value: int = response.json()["available_credits"]
    return value


async def stats(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/admin/cache/stats", headers=ADMIN)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def container_of(app: FastAPI) -> Container:
    container: Container = app.state.container
    return container


@pytest.fixture
async def memory_client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The application on the memory store (it never connects to its database)."""
    settings = app_settings("memory", f"sqlite+aiosqlite:///{tmp_path}/unused.db")
    async with running(settings) as (_, client):
        yield client


# --- user_id ----------------------------------------------------------------------------

USER_ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", CREDITS + "/{}", None),
    ("POST", CREDITS + "/{}/deduct", {"amount": 1}),
    ("POST", CREDITS + "/{}/refund", {"amount": 1}),
    ("POST", CREDITS + "/{}/upgrade", None),
    ("GET", CREDITS + "/{}/transactions", None),
    ("PUT", CONSENTS + "/{}", {"terms_accepted": True}),
    ("GET", CONSENTS + "/{}", None),
    ("PATCH", CONSENTS + "/{}", {"marketing_consent": True}),
]
BAD_PATH_USER_IDS = [
    pytest.param("", id="empty"),
    pytest.param("a" * 129, id="129-chars"),
    pytest.param("a%20b", id="space"),
    pytest.param("a%2Fb", id="encoded-slash"),
    pytest.param("caf%C3%A9", id="unicode-latin"),
    pytest.param("%E7%94%A8%E6%88%B7", id="unicode-cjk"),
    pytest.param("a%00b", id="nul"),
    pytest.param("alice%0A", id="trailing-newline"),
    pytest.param("100%25", id="percent"),
    pytest.param("a%3Fb", id="question-mark"),
]
BAD_BODY_USER_IDS = [
    pytest.param("", id="empty"),
    pytest.param("a" * 129, id="129-chars"),
    pytest.param("a b", id="space"),
    pytest.param("a/b", id="slash"),
    pytest.param("café", id="unicode"),
    pytest.param("a\x00b", id="nul"),
    pytest.param("alice\n", id="trailing-newline"),
]


async def accept_terms(client: httpx.AsyncClient, user_id: str) -> str:
    """Refusals of the assistant below are then about the input alone."""
    response = await client.put(f"{CONSENTS}/{user_id}", json={"terms_accepted": True})
    assert response.status_code == 200, response.text
    return user_id


class TestUserId:
    @pytest.mark.parametrize("user_id", BAD_PATH_USER_IDS)
    async def test_every_user_route_refuses_a_bad_user_id_and_records_nothing(
        self, client: httpx.AsyncClient, running_app: FastAPI, user_id: str
    ) -> None:
        for method, path, body in USER_ROUTES:
            response = await client.request(method, path.format(user_id), json=body)
            assert_refused(response)
        assert await container_of(running_app).storage.stores.consents.page(10, 0) == []

    @pytest.mark.parametrize("user_id", BAD_BODY_USER_IDS)
    async def test_the_assistant_refuses_a_bad_user_id_with_422_and_records_nothing(
        self, client: httpx.AsyncClient, user_id: str
    ) -> None:
        response = await client.post(QUERY, json={"user_id": user_id, "query": "red shoes"})
        assert_refused(response, 422)
        assert (await stats(client))["misses"] == 0, "the refused query reached the cache"

    @pytest.mark.parametrize(
        "body",
        [
            pytest.param({"user_id": None, "query": "red shoes"}, id="null"),
            pytest.param({"user_id": 123, "query": "red shoes"}, id="number"),
            pytest.param({"user_id": ["a"], "query": "red shoes"}, id="list"),
            pytest.param({"query": "red shoes"}, id="missing"),
        ],
    )
    async def test_the_assistant_refuses_a_user_id_that_is_not_text_with_422(
        self, memory_client: httpx.AsyncClient, body: dict[str, Any]
    ) -> None:
        assert_refused(await memory_client.post(QUERY, json=body), 422)

    @pytest.mark.parametrize("is_guest", ["maybe", "2", ""])
    async def test_an_unreadable_is_guest_flag_is_422(
        self, memory_client: httpx.AsyncClient, is_guest: str
    ) -> None:
        response = await memory_client.get(f"{CREDITS}/flagged", params={"is_guest": is_guest})
        assert_refused(response, 422)


# --- amount --------------------------------------------------------------------------------

OUT_OF_RANGE_AMOUNTS = [
    pytest.param(0, id="zero"),
    pytest.param(-1, id="negative"),
    pytest.param(1001, id="1001"),
    pytest.param(10**30, id="beyond-bigint"),
]
AMOUNTS_THAT_ARE_NOT_INTEGERS = [
    pytest.param("abc", id="text"),
    pytest.param("", id="empty-text"),
    pytest.param(1.5, id="fraction"),
    pytest.param(None, id="null"),
    pytest.param([1], id="list"),
    pytest.param({"value": 1}, id="object"),
    pytest.param(False, id="false"),
    pytest.param(True, id="true"),
    pytest.param("5", id="numeric-text"),
]


async def assert_amount_refused(client: httpx.AsyncClient, amount: object) -> None:
    await client.post(f"{CREDITS}/payer/deduct", json={"amount": 3})
    deduct = await client.post(f"{CREDITS}/payer/deduct", json={"amount": amount})
    refund = await client.post(f"{CREDITS}/payer/refund", json={"amount": amount})
    assert_refused(deduct, 422)
    assert_refused(refund, 422)
    assert await ledger(client, "payer") == [-3]


class TestAmount:
    @pytest.mark.parametrize("amount", OUT_OF_RANGE_AMOUNTS)
    async def test_deduct_and_refund_refuse_an_amount_out_of_range_and_change_nothing(
        self, client: httpx.AsyncClient, amount: int
    ) -> None:
        await assert_amount_refused(client, amount)

    @pytest.mark.parametrize("amount", AMOUNTS_THAT_ARE_NOT_INTEGERS)
    async def test_deduct_and_refund_refuse_an_amount_that_is_not_an_integer(
        self, memory_client: httpx.AsyncClient, amount: object
    ) -> None:
        await assert_amount_refused(memory_client, amount)

    async def test_the_largest_amount_is_not_a_validation_error(
        self, client: httpx.AsyncClient
    ) -> None:
        deduct = await client.post(f"{CREDITS}/big/deduct", json={"amount": 1000})
        assert assert_refused(deduct, 402)["code"] == "insufficient_credits"
        refund = await client.post(f"{CREDITS}/big/refund", json={"amount": 1000})
        assert refund.status_code == 200
        assert refund.json()["available_credits"] == 10


# --- description ---------------------------------------------------------------------------


async def assert_description_refused(client: httpx.AsyncClient, description: object) -> None:
    await client.post(f"{CREDITS}/writer/deduct", json={"amount": 2})
    body = {"amount": 1, "description": description}
    assert_refused(await client.post(f"{CREDITS}/writer/deduct", json=body), 422)
    assert_refused(await client.post(f"{CREDITS}/writer/refund", json=body), 422)
    assert await ledger(client, "writer") == [-2]


class TestDescription:
    @pytest.mark.parametrize(
        "description",
        [
            pytest.param("x" * 501, id="501-chars"),
            pytest.param("a\x00b", id="nul"),
            pytest.param("\x00", id="only-nul"),
        ],
    )
    async def test_deduct_and_refund_refuse_a_description_no_store_keeps_and_change_nothing(
        self, client: httpx.AsyncClient, description: str
    ) -> None:
        await assert_description_refused(client, description)

    @pytest.mark.parametrize(
        "description", [123, ["x"], {"x": 1}], ids=["number", "list", "object"]
    )
    async def test_deduct_and_refund_refuse_a_description_that_is_not_text(
        self, memory_client: httpx.AsyncClient, description: object
    ) -> None:
        await assert_description_refused(memory_client, description)

    async def test_a_lone_surrogate_in_the_description_is_422(
        self, client: httpx.AsyncClient
    ) -> None:
        raw = b'{"amount": 1, "description": "\\ud800"}'
        response = await client.post(f"{CREDITS}/surrogate/deduct", content=raw, headers=JSON)
        assert_refused(response, 422)
        assert await ledger(client, "surrogate") == []

    @pytest.mark.parametrize(
        "description",
        [
            pytest.param("d" * 500, id="500-chars"),
            pytest.param("für 5 € — 靴 😀", id="unicode"),
            pytest.param("", id="empty"),
        ],
    )
    async def test_an_acceptable_description_is_stored_as_sent(
        self, client: httpx.AsyncClient, description: str
    ) -> None:
        response = await client.post(
            f"{CREDITS}/noted/deduct", json={"amount": 1, "description": description}
        )
        assert response.status_code == 200, response.text
        rows = (await client.get(f"{CREDITS}/noted/transactions")).json()
        assert rows[0]["description"] == description


# --- Idempotency-Key ---------------------------------------------------------------------------


class TestIdempotencyKey:
    @pytest.mark.parametrize(
        "key",
        [
            pytest.param("k" * 129, id="129-chars"),
            pytest.param("", id="empty"),
            pytest.param("a\x00b", id="nul"),
        ],
    )
    async def test_a_bad_key_is_422_and_charges_or_credits_nothing(
        self, client: httpx.AsyncClient, key: str
    ) -> None:
        headers = {"Idempotency-Key": key}
        deduct = await client.post(f"{CREDITS}/keyed/deduct", json={}, headers=headers)
        refund = await client.post(f"{CREDITS}/keyed/refund", json={"amount": 1}, headers=headers)
        assert_refused(deduct, 422)
        assert_refused(refund, 422)
        assert await ledger(client, "keyed") == []

    async def test_a_key_of_128_chars_is_accepted_and_applied_once(
        self, client: httpx.AsyncClient
    ) -> None:
        headers = {"Idempotency-Key": "k" * 128}
        for _ in range(2):
            response = await client.post(f"{CREDITS}/long-key/deduct", json={}, headers=headers)
            assert response.status_code == 200, response.text
        assert await ledger(client, "long-key") == [-1]


# --- limit ---------------------------------------------------------------------------------------


class TestHistoryLimit:
    @pytest.mark.parametrize("limit", ["0", "501", "-1", "abc", "1.5", ""])
    async def test_a_limit_out_of_bounds_is_422(
        self, memory_client: httpx.AsyncClient, limit: str
    ) -> None:
        response = await memory_client.get(
            f"{CREDITS}/reader/transactions", params={"limit": limit}
        )
        assert_refused(response, 422)

    @pytest.mark.parametrize("limit", ["1", "500"])
    async def test_the_bounds_of_limit_are_accepted(
        self, client: httpx.AsyncClient, limit: str
    ) -> None:
        await client.post(f"{CREDITS}/reader/deduct", json={"amount": 1})
        await client.post(f"{CREDITS}/reader/deduct", json={"amount": 1})
        response = await client.get(f"{CREDITS}/reader/transactions", params={"limit": limit})
        assert response.status_code == 200
        assert len(response.json()) == min(int(limit), 2)


# --- assistant query and context ---------------------------------------------------------------

BAD_QUERIES = [
    pytest.param("", id="empty"),
    pytest.param("   ", id="spaces"),
    pytest.param("\t\n ", id="whitespace"),
    pytest.param("q" * 2001, id="2001-chars"),
    pytest.param("red\x00shoes", id="nul"),
]
QUERIES_THAT_ARE_NOT_TEXT = [
    pytest.param({"query": None}, id="null"),
    pytest.param({"query": 123}, id="number"),
    pytest.param({"query": ["red shoes"]}, id="list"),
    pytest.param({}, id="missing"),
]
CONTEXTS_NO_STORE_KEEPS = [
    pytest.param({"notes": "x" * (8 * 1024 + 1)}, id="over-8KiB"),
    pytest.param(
        {"n": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}, id="34-deep"
    ),
    pytest.param({"tags": [f"t{n:05d}" for n in range(3000)]}, id="over-16KiB-many-items"),
    pytest.param({"k": "a\x00b"}, id="nul-value"),
    pytest.param({"a\x00": 1}, id="nul-key"),
    pytest.param({"a": {"b": [{"c": "\x00"}]}}, id="nested-nul"),
]
RAW_CONTEXTS_NO_STORE_KEEPS = [
    pytest.param('{"max_price": NaN}', id="nan"),
    pytest.param('{"max_price": Infinity}', id="infinity"),
    pytest.param('{"max_price": 1e999}', id="overflowing-float"),
    pytest.param('{"k": "\\ud800"}', id="lone-surrogate"),
]
CONTEXTS_THAT_ARE_NOT_OBJECTS = [
    pytest.param([], id="list"),
    pytest.param("red", id="text"),
    pytest.param(1, id="number"),
    pytest.param(True, id="boolean"),
    pytest.param(None, id="null"),
]


class TestAssistantInput:
    @pytest.mark.parametrize("query", BAD_QUERIES)
    async def test_a_blank_overlong_or_nul_query_is_422_and_charges_nothing(
        self, client: httpx.AsyncClient, query: str
    ) -> None:
        user_id = await accept_terms(client, "asker")
        response = await client.post(QUERY, json={"user_id": user_id, "query": query})
        assert_refused(response, 422)
        assert await ledger(client, user_id) == []

    @pytest.mark.parametrize("fields", QUERIES_THAT_ARE_NOT_TEXT)
    async def test_a_query_that_is_not_text_is_422(
        self, memory_client: httpx.AsyncClient, fields: dict[str, Any]
    ) -> None:
        user_id = await accept_terms(memory_client, "asker")
        assert_refused(await memory_client.post(QUERY, json={"user_id": user_id, **fields}), 422)

    async def test_a_query_of_2000_chars_is_answered(self, client: httpx.AsyncClient) -> None:
        user_id = await accept_terms(client, "asker")
        query = ("red running shoes " * 120)[:2000]
        response = await client.post(QUERY, json={"user_id": user_id, "query": query})
        assert response.status_code == 200, response.text
        assert await ledger(client, user_id) == [-1]

    @pytest.mark.parametrize("context", CONTEXTS_NO_STORE_KEEPS)
    async def test_an_oversized_or_nul_context_is_422_and_charges_nothing(
        self, client: httpx.AsyncClient, context: dict[str, Any]
    ) -> None:
        user_id = await accept_terms(client, "asker")
        body = {"user_id": user_id, "query": "red shoes", "context": context}
        assert_refused(await client.post(QUERY, json=body), 422)
        assert await ledger(client, user_id) == []

    @pytest.mark.parametrize("context", RAW_CONTEXTS_NO_STORE_KEEPS)
    async def test_a_context_that_is_not_strict_json_is_422_and_charges_nothing(
        self, client: httpx.AsyncClient, context: str
    ) -> None:
        user_id = await accept_terms(client, "asker")
        raw = f'{{"user_id": "{user_id}", "query": "red shoes", "context": {context}}}'
        assert_refused(await client.post(QUERY, content=raw.encode(), headers=JSON), 422)
        assert await ledger(client, user_id) == []

    @pytest.mark.parametrize("context", CONTEXTS_THAT_ARE_NOT_OBJECTS)
    async def test_a_context_that_is_not_an_object_is_422(
        self, memory_client: httpx.AsyncClient, context: object
    ) -> None:
        user_id = await accept_terms(memory_client, "asker")
        body = {"user_id": user_id, "query": "red shoes", "context": context}
        assert_refused(await memory_client.post(QUERY, json=body), 422)
        assert await ledger(memory_client, user_id) == []

    async def test_a_context_just_under_8_kib_with_unicode_is_answered(
        self, client: httpx.AsyncClient
    ) -> None:
        user_id = await accept_terms(client, "asker")
        context = {"category": "shoes", "notes": "靴" * 2700}  # 8 100 bytes of UTF-8
        body = {"user_id": user_id, "query": "red shoes", "context": context}
        response = await client.post(QUERY, json=body)
        assert response.status_code == 200, response.text
        assert all(product["category"] == "shoes" for product in response.json()["products"])


# --- bodies that cannot be read, routes and methods that do not exist ----------------------------

BODY_ROUTES = [
    pytest.param("POST", CREDITS + "/u1/deduct", id="deduct"),
    pytest.param("POST", CREDITS + "/u1/refund", id="refund"),
    pytest.param("PUT", CONSENTS + "/u1", id="consent-put"),
    pytest.param("PATCH", CONSENTS + "/u1", id="consent-patch"),
    pytest.param("POST", QUERY, id="assistant"),
    pytest.param("PUT", "/admin/storage", id="admin-storage"),
]
MALFORMED_JSON = [
    pytest.param(b"{bad", id="unquoted"),
    pytest.param(b'{"amount": 1', id="truncated"),
    pytest.param(b'{"amount": 1,}', id="trailing-comma"),
]
# Bodies FastAPI's JSON parsing gives up on with something other than a JSONDecodeError.
UNPARSABLE_BODIES = [
    pytest.param(b"\xff\xfe\x00", id="not-utf8"),
    pytest.param(b'{"amount": ' + b"[" * 5000 + b"]" * 5000 + b"}", id="nested-5000-deep"),
]


class TestUnreadableBodies:
    @pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
    @pytest.mark.parametrize("raw", MALFORMED_JSON)
    async def test_malformed_json_is_refused_with_422(
        self, memory_client: httpx.AsyncClient, method: str, path: str, raw: bytes
    ) -> None:
        response = await memory_client.request(method, path, content=raw, headers=ADMIN | JSON)
        assert_refused(response, 422)

    @pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
    @pytest.mark.parametrize(
        ("content_type", "raw"),
        [
            pytest.param("text/plain", b'{"amount": 1}', id="text-plain"),
            pytest.param("application/x-www-form-urlencoded", b"amount=1", id="form"),
            pytest.param("application/xml", b"<amount>1</amount>", id="xml"),
        ],
    )
    async def test_a_body_that_is_not_json_is_refused_with_422(
        self,
        memory_client: httpx.AsyncClient,
        method: str,
        path: str,
        content_type: str,
        raw: bytes,
    ) -> None:
        headers = ADMIN | {"Content-Type": content_type}
        response = await memory_client.request(method, path, content=raw, headers=headers)
        assert_refused(response, 422)

    @pytest.mark.parametrize(
        ("method", "path"),
        [param for param in BODY_ROUTES if param.id != "deduct"],  # deduct's body is optional
    )
    @pytest.mark.parametrize("raw", [b"[]", b'"text"', b"1", b"null", b""])
    async def test_a_required_body_that_is_not_an_object_is_refused_with_422(
        self, memory_client: httpx.AsyncClient, method: str, path: str, raw: bytes
    ) -> None:
        response = await memory_client.request(method, path, content=raw, headers=ADMIN | JSON)
        assert_refused(response, 422)

    @pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
    @pytest.mark.parametrize("raw", UNPARSABLE_BODIES)
    async def test_a_body_the_parser_gives_up_on_is_refused_with_the_error_body(
        self, memory_client: httpx.AsyncClient, method: str, path: str, raw: bytes
    ) -> None:
        response = await memory_client.request(method, path, content=raw, headers=ADMIN | JSON)
        assert_refused(response)

    @pytest.mark.parametrize("raw", UNPARSABLE_BODIES)
    async def test_a_body_the_parser_gives_up_on_is_422_like_any_malformed_json(
        self, memory_client: httpx.AsyncClient, raw: bytes
    ) -> None:
        response = await memory_client.post(f"{CREDITS}/u1/refund", content=raw, headers=JSON)
        assert_refused(response, 422)

    @pytest.mark.parametrize(
        ("content_type", "raw"),
        [
            pytest.param("application/json", b'{"amount": 5', id="truncated-json"),
            pytest.param("text/plain", b'{"amount": 5}', id="json-as-text-plain"),
            pytest.param("application/x-www-form-urlencoded", b"amount=5", id="form"),
        ],
    )
    async def test_a_refused_body_charges_nothing(
        self, memory_client: httpx.AsyncClient, content_type: str, raw: bytes
    ) -> None:
        headers = {"Content-Type": content_type}
        for action in ("deduct", "refund"):
            response = await memory_client.post(
                f"{CREDITS}/u1/{action}", content=raw, headers=headers
            )
            assert_refused(response, 422)
        assert await ledger(memory_client, "u1") == []


class TestUnknownRoutes:
    @pytest.mark.parametrize(
        "path",
        [
            "/nope",
            "/api/v1",
            "/api/v1/nope",
            "/api/v2/credits/alice",
            "/api/v1/credits/alice/unknown",
            "/api/v1/credit/alice",
            "/admin",
        ],
    )
    async def test_an_unknown_route_is_404_with_the_error_body(
        self, memory_client: httpx.AsyncClient, path: str
    ) -> None:
        error = assert_refused(await memory_client.get(path, headers=ADMIN), 404)
        assert error["code"] == "not_found"

    @pytest.mark.parametrize(
        ("method", "path"),
        [
            ("DELETE", CREDITS + "/alice"),
            ("PUT", CREDITS + "/alice/deduct"),
            ("GET", CREDITS + "/alice/refund"),
            ("DELETE", CONSENTS + "/alice"),
            ("GET", QUERY),
            ("POST", "/health"),
            ("POST", "/admin/cache/stats"),
        ],
    )
    async def test_a_wrong_method_is_405_with_the_error_body_and_the_allowed_methods(
        self, memory_client: httpx.AsyncClient, method: str, path: str
    ) -> None:
        response = await memory_client.request(method, path, headers=ADMIN)
        error = assert_refused(response, 405)
        assert error["code"] == "method_not_allowed"
        assert response.headers.get("allow")
