"""What every request meets before a route (SPEC §4 limits, §8 headers): bodies past
MAX_BODY_BYTES refused before they are parsed, bodies that stop arriving refused, an
encoded `/` routed nowhere, private responses not cached, and an unexpected fault a
generic 500. On every store where a store is involved."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.api.limits import RequestLimits
from app.container import Container

ADMIN = {"Authorization": "Bearer test-admin-token"}
CREDITS = "/api/v1/credits"
CONSENTS = "/api/v1/consents"
QUERY = "/api/v1/assistant/query"
LIMIT = 65536


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


class TestBodySize:
    async def test_a_declared_oversize_body_is_413_and_nothing_is_recorded(
        self, client: httpx.AsyncClient
    ) -> None:
        body = {"terms_accepted": True, "padding": "x" * LIMIT}
        assert_error(await client.put(f"{CONSENTS}/big", json=body), 413, "payload_too_large")
        assert (await client.get(f"{CONSENTS}/big")).status_code == 404

    async def test_an_admin_route_refuses_it_before_the_token_is_checked(
        self, client: httpx.AsyncClient
    ) -> None:
        body = json.dumps({"backend": "memory", "padding": "x" * LIMIT})
        response = await client.put("/admin/storage", content=body)  # no token
        assert_error(response, 413, "payload_too_large")

    async def test_a_streamed_oversize_body_is_413_as_it_passes_the_limit(
        self, client: httpx.AsyncClient
    ) -> None:
        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"amount": 1, "description": "'
            for _ in range(20):
                yield b"x" * 4096
            yield b'"}'

        response = await client.post(
            f"{CREDITS}/streamer/deduct",
            content=chunks(),
            headers={"Content-Type": "application/json"},
        )
        assert_error(response, 413, "payload_too_large")
        assert (await client.get(f"{CREDITS}/streamer")).json()["available_credits"] == 10

    async def test_a_body_within_the_limit_is_served(self, client: httpx.AsyncClient) -> None:
        body = {"user_id": "fits", "query": "red shoes", "context": {"notes": "x" * 8000}}
        await client.put(f"{CONSENTS}/fits", json={"terms_accepted": True})
        assert (await client.post(QUERY, json=body)).status_code == 200


class TestPaths:
    @pytest.mark.parametrize("encoded", ["%2F", "%2f"])
    async def test_an_encoded_slash_reaches_no_other_route(
        self, client: httpx.AsyncClient, encoded: str
    ) -> None:
        response = await client.post(f"{CREDITS}/x{encoded}upgrade")
        assert_error(response, 404, "not_found")
        account = (await client.get(f"{CREDITS}/x")).json()
        assert (account["is_guest"], account["max_credits"]) == (True, 10)


class TestHeaders:
    @pytest.mark.parametrize("path", [f"{CREDITS}/h", "/admin/storage"])
    async def test_private_responses_are_not_stored_or_sniffed(
        self, client: httpx.AsyncClient, path: str
    ) -> None:
        response = await client.get(path, headers=ADMIN)
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["x-content-type-options"] == "nosniff"
        error = await client.get(f"{CREDITS}/bad%20id")
        assert error.headers["cache-control"] == "no-store"


class TestFaults:
    async def test_an_unexpected_value_error_is_a_generic_500(
        self, running_app: FastAPI, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        container: Container = running_app.state.container

        async def broken(*_: Any, **__: Any) -> Any:
            raise ValueError("Invalid isoformat string: 'garbage-ts' at /srv/db")

        monkeypatch.setattr(container.services.credits, "get_user_credits", broken)
        transport = httpx.ASGITransport(app=running_app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.get(f"{CREDITS}/victim")
        assert_error(response, 500, "internal_error")
        assert "garbage" not in response.text and "/srv" not in response.text

    async def test_a_context_nested_past_the_stack_is_422(self, client: httpx.AsyncClient) -> None:
        await client.put(f"{CONSENTS}/deep", json={"terms_accepted": True})
        nested = "[" * 960 + "]" * 960
        body = f'{{"user_id": "deep", "query": "shoes", "context": {{"n": {nested}}}}}'
        response = await client.post(
            QUERY, content=body, headers={"Content-Type": "application/json"}
        )
        assert_error(response, 422, "validation_error")


async def test_a_body_that_stops_arriving_is_408() -> None:
    """At the ASGI level: a client that sends part of a body and then nothing."""
    read: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            read.append(message["body"])
            if not message.get("more_body"):
                break

    messages = [{"type": "http.request", "body": b'{"amount"', "more_body": True}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    limits = RequestLimits(app, max_body_bytes=LIMIT, body_timeout=0.1)
    headers = [(b"transfer-encoding", b"chunked")]  # a real half-sent body is framed
    scope = {"type": "http", "path": f"{CREDITS}/slow/deduct", "raw_path": b"", "headers": headers}
    await asyncio.wait_for(limits(scope, receive, send), 5)
    assert sent[0]["status"] == 408
    assert json.loads(sent[1]["body"])["error"]["code"] == "request_timeout"
    assert read == [b'{"amount"']
