"""Request ids and JSON logs (SPEC §11): every answer, refusals before any route included,
echoes the request's id in `X-Request-ID` (the client's when it is sane, else a fresh
one), and under LOG_FORMAT=json every line the service writes is a JSON object that
carries that id."""

from __future__ import annotations

import json
import logging
import re
import sys
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.container import Container
from app.logs import REQUEST_ID, JsonFormatter
from tests.conftest import app_settings
from tests.support.app_client import running
from tests.support.served import served

CREDITS = "/api/v1/credits"
FRESH_ID = re.compile(r"req-[0-9a-f]{16}-[0-9a-f]+")  # made by the service (app/ids.py)


class TestRequestId:
    async def test_a_fresh_id_is_made_for_each_request(self, client: httpx.AsyncClient) -> None:
        first = (await client.get(f"{CREDITS}/alice")).headers["x-request-id"]
        second = (await client.get(f"{CREDITS}/alice")).headers["x-request-id"]
        assert FRESH_ID.fullmatch(first) and FRESH_ID.fullmatch(second)
        assert first != second

    async def test_a_sane_incoming_id_is_echoed(self, client: httpx.AsyncClient) -> None:
        sent = "trace-7d1c.9f_upstream~42"
        response = await client.get(f"{CREDITS}/alice", headers={"X-Request-ID": sent})
        assert response.headers["x-request-id"] == sent

    @pytest.mark.parametrize("insane", ["x" * 129, "two words", 'quote"d', "tab\there", "é-accent"])
    async def test_an_insane_incoming_id_is_replaced(
        self, client: httpx.AsyncClient, insane: str
    ) -> None:
        response = await client.get(
            f"{CREDITS}/alice", headers={"X-Request-ID": insane.encode("utf-8")}
        )
        assert FRESH_ID.fullmatch(response.headers["x-request-id"])

    async def test_an_id_with_a_newline_is_replaced(self, running_app: FastAPI) -> None:
        """At the ASGI level: a client library would not send it."""
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b""}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/health",
            "raw_path": b"/health",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"x-request-id", b"abc\nx-injected: 1")],
            "server": ("test", 80),
            "client": ("127.0.0.1", 1),
            "app": running_app,
        }
        await running_app(scope, receive, send)
        headers = dict(sent[0]["headers"])
        assert FRESH_ID.fullmatch(headers[b"x-request-id"].decode())
        assert b"x-injected" not in headers

    async def test_a_413_carries_the_id(self, client: httpx.AsyncClient) -> None:
        big = {"terms_accepted": True, "padding": "x" * 70_000}
        response = await client.put("/api/v1/consents/big", json=big)
        assert response.status_code == 413
        assert FRESH_ID.fullmatch(response.headers["x-request-id"])

    async def test_a_generic_500_carries_the_id(
        self, running_app: FastAPI, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        container: Container = running_app.state.container

        async def broken(*_: Any, **__: Any) -> Any:
            raise RuntimeError("boom")

        monkeypatch.setattr(container.services.credits, "get_user_credits", broken)
        transport = httpx.ASGITransport(app=running_app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.get(f"{CREDITS}/x", headers={"X-Request-ID": "the-500"})
        assert response.status_code == 500
        assert response.headers["x-request-id"] == "the-500"


async def test_a_401_carries_the_id(tmp_path: Path) -> None:
    settings = app_settings(
        "memory",
        f"sqlite+aiosqlite:///{tmp_path}/a.db",
        api_auth="token",
        api_tokens="service-token-0123456789",
    )
    async with running(settings) as (_, client):
        response = await client.get(f"{CREDITS}/alice", headers={"X-Request-ID": "no-token"})
    assert response.status_code == 401
    assert response.headers["x-request-id"] == "no-token"


class TestJsonFormatter:
    def test_a_line_is_one_json_object_with_the_request_id_and_the_exception(self) -> None:
        try:
            raise KeyError("the cause")
        except KeyError:
            record = logging.LogRecord(
                "app.test", logging.ERROR, __file__, 1, "failed for %s", ("bob",), sys.exc_info()
            )
        token = REQUEST_ID.set("req-1")
        try:
            line = JsonFormatter().format(record)
        finally:
            REQUEST_ID.reset(token)
        assert "\n" not in line
        parsed = json.loads(line)
        assert parsed["level"] == "ERROR"
        assert parsed["logger"] == "app.test"
        assert parsed["message"] == "failed for bob"
        assert parsed["request_id"] == "req-1"
        assert "KeyError: 'the cause'" in parsed["exception"]
        assert parsed["timestamp"].endswith("+00:00")


def test_the_served_service_writes_json_lines_with_the_echoed_request_id(tmp_path: Path) -> None:
    log = tmp_path / "service.log"
    secret = "a-description-only-the-ledger-may-hold"
    with (
        log.open("w") as stderr,
        served(
            tmp_path / "a.db",
            log=stderr,
            LOG_FORMAT="json",
            LOG_LEVEL="INFO",
            ACCESS_LOG="true",
        ) as service,
    ):
        deduct = urllib.request.Request(
            f"{service.base}{CREDITS}/carol/deduct",
            data=json.dumps({"amount": 1, "description": secret}).encode(),
            headers={"Content-Type": "application/json", "X-Request-ID": "trace-carol"},
            method="POST",
        )
        with urllib.request.urlopen(deduct, timeout=10) as response:
            assert response.headers["X-Request-ID"] == "trace-carol"
        with urllib.request.urlopen(f"{service.base}/health", timeout=10) as response:
            made = response.headers["X-Request-ID"]
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert lines, "the service wrote nothing"
    assert all(
        {"timestamp", "level", "logger", "message", "request_id"} <= set(line) for line in lines
    )
    by_id = {line["request_id"]: line["message"] for line in lines if line["request_id"]}
    assert "/api/v1/credits/carol/deduct" in by_id["trace-carol"]
    assert "/health" in by_id[made]
    assert secret not in log.read_text()


def test_json_logs_keep_the_access_log_off_when_asked(tmp_path: Path) -> None:
    log = tmp_path / "service.log"
    with (
        log.open("w") as stderr,
        served(tmp_path / "a.db", log=stderr, LOG_FORMAT="json", LOG_LEVEL="INFO") as service,
        urllib.request.urlopen(f"{service.base}/health", timeout=10) as response,
    ):
        assert response.status == 200  # served with ACCESS_LOG=false
    loggers = {json.loads(line)["logger"] for line in log.read_text().splitlines() if line}
    assert "uvicorn.error" in loggers  # JSON lines were written
    assert "uvicorn.access" not in loggers
