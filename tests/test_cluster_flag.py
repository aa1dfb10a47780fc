"""The cluster-wide flag (SPEC §7): stored in the database, followed by every replica
within the poll interval, taken over STORAGE_BACKEND at start-up; replicas in memory
mode each hand their own changes over, on top of what the database holds by then.
Replicas are applications in one process sharing a database (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.config import StorageBackend
from app.container import Container
from app.main import create_app
from tests.conftest import DATABASES, app_settings, fresh_database
from tests.support.app_client import client_for

ADMIN = {"Authorization": "Bearer test-admin-token"}
CREDITS = "/api/v1/credits"
CONSENTS = "/api/v1/consents"
POLL = 0.2

Start = Callable[..., Any]


@pytest.fixture(params=DATABASES)
async def replicas(request: pytest.FixtureRequest) -> AsyncIterator[Start]:
    """Starts replicas (application and client) on one fresh database."""
    async with fresh_database(request, request.param) as url, AsyncExitStack() as stack:

        async def start(backend: str = "memory") -> tuple[FastAPI, httpx.AsyncClient]:
            app = create_app(app_settings(backend, url, storage_flag_poll_seconds=POLL))
            await stack.enter_async_context(app.router.lifespan_context(app))
            client = await stack.enter_async_context(client_for(app))
            return app, client

        yield start


def container_of(app: FastAPI) -> Container:
    container: Container = app.state.container
    return container


async def backend_of(client: httpx.AsyncClient) -> str:
    view = (await client.get("/admin/storage", headers=ADMIN)).json()
    return str(view["backend"])


async def eventually(client: httpx.AsyncClient, backend: str, within: float) -> float:
    """Seconds until the replica serves from `backend`; fails past `within`."""
    started = time.monotonic()
    while await backend_of(client) != backend:
        assert time.monotonic() - started < within, f"still not on {backend}"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_a_replica_follows_a_change_made_on_another_within_the_poll_interval(
    replicas: Start,
) -> None:
    _, first = await replicas()
    _, second = await replicas()
    changed = await first.put("/admin/storage", json={"backend": "database"}, headers=ADMIN)
    assert changed.status_code == 200, changed.text
    # One poll interval, plus the follower's own (empty) hand-over.
    assert await eventually(second, "database", within=POLL + 2) <= POLL + 2

    back = await second.put("/admin/storage", json={"backend": "memory"}, headers=ADMIN)
    assert back.status_code == 200, back.text
    await eventually(first, "memory", within=POLL + 2)


async def test_replicas_in_memory_mode_each_carry_their_changes_none_undone(
    replicas: Start,
) -> None:
    first_app, first = await replicas()
    _, second = await replicas()
    await first.post(f"{CREDITS}/shared/deduct", json={"amount": 5})
    await first.post(f"{CREDITS}/only-first/deduct", json={"amount": 1})
    await first.put(f"{CONSENTS}/only-first", json={"terms_accepted": True})
    await second.post(f"{CREDITS}/shared/deduct", json={"amount": 3})
    await second.post(f"{CREDITS}/only-second/deduct", json={"amount": 2})

    changed = await first.put("/admin/storage", json={"backend": "database"}, headers=ADMIN)
    assert changed.status_code == 200, changed.text
    await eventually(second, "database", within=POLL + 5)

    database = container_of(first_app).states[StorageBackend.DATABASE]
    shared, only_first, only_second = await database.read(["shared", "only-first", "only-second"])
    # Each replica's spending lands once: 10 - 5 - 3.
    assert shared.account is not None and shared.account.available == 2
    assert sorted(row.amount for row in shared.ledger) == [-5, -3]
    assert only_first.account is not None and only_first.account.available == 9
    assert only_first.consent is not None
    assert only_second.account is not None and only_second.account.available == 8
    for client in (first, second):  # both replicas now serve the same state
        assert (await client.get(f"{CREDITS}/shared")).json()["available_credits"] == 2


async def test_a_replica_starting_takes_the_stored_flag_over_its_setting(
    replicas: Start,
) -> None:
    _, first = await replicas()
    await first.put("/admin/storage", json={"backend": "database"}, headers=ADMIN)
    _, late = await replicas("memory")
    assert await backend_of(late) == "database"
