"""The shadow stage (SPEC §7): writes repeated on the shadow, answers compared, a drifted or
failed shadow repaired from the primary; and the runbook's stages end to end. The database
on SQLite and PostgreSQL; a shadow that goes away on PostgreSQL behind a relay."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from app.config import StorageBackend
from app.container import Container
from app.domain.carry import Carried
from app.domain.state import Merged, UserState
from app.main import create_app
from app.repositories.base import StateRepository
from tests.conftest import DATABASES, app_settings, fresh_database
from tests.support.app_client import client_for
from tests.support.relay import relayed

ADMIN = {"Authorization": "Bearer test-admin-token"}
CREDITS = "/api/v1/credits"
CONSENTS = "/api/v1/consents"


@pytest.fixture(params=DATABASES)
async def app(request: pytest.FixtureRequest) -> AsyncIterator[FastAPI]:
    """The application on the memory store, with a fresh database to shadow on."""
    async with fresh_database(request, request.param) as url:
        application = create_app(app_settings("memory", url))
        async with application.router.lifespan_context(application):
            yield application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(app) as client:
        yield client


def container_of(app: FastAPI) -> Container:
    container: Container = app.state.container
    return container


async def flag(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.put("/admin/storage", json=body, headers=ADMIN)
    assert response.status_code == 200, response.text
    view: dict[str, Any] = response.json()
    return view


async def storage(client: httpx.AsyncClient) -> dict[str, Any]:
    view: dict[str, Any] = (await client.get("/admin/storage", headers=ADMIN)).json()
    return view


def held(state: UserState) -> tuple[Any, ...]:
    """What a store holds of a user, keys known claimed or on a row alike (the memory store
    claims every key; SQL keeps a key the service made for a deduction on its row)."""
    keys = {key.key for key in state.keys} | {r.idempotency_key for r in state.ledger}
    return (state.account, state.ledger, state.consent, state.events, keys - {None})


async def same_in_both(container: Container, users: list[str]) -> None:
    memory = await container.states[StorageBackend.MEMORY].read(users)
    database = await container.states[StorageBackend.DATABASE].read(users)
    assert [held(state) for state in memory] == [held(state) for state in database]


async def test_a_new_shadow_is_seeded_then_takes_every_write(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    await client.post(f"{CREDITS}/early/deduct", json={"amount": 2})
    view = await flag(client, {"backend": "memory", "shadow": "database"})
    assert (view["backend"], view["shadow"]) == ("memory", "database")
    assert view["handover"]["accounts"] == 1  # the database was seeded from memory

    await client.post(f"{CREDITS}/early/deduct", json={"amount": 1})
    await client.post(f"{CREDITS}/late/refund", json={"amount": 1})
    await client.post(f"{CREDITS}/late/deduct", json={"amount": 4, "is_guest": False})
    await client.post(f"{CREDITS}/late/upgrade")
    await client.put(f"{CONSENTS}/late", json={"terms_accepted": True})
    await client.patch(f"{CONSENTS}/late", json={"marketing_consent": True})
    await client.get(f"{CONSENTS}/late")
    await same_in_both(container_of(app), ["early", "late"])

    after = await storage(client)
    comparison = after["comparison"]
    assert comparison["compared"] >= 7
    assert (comparison["mismatches"], comparison["consistency"]) == (0, 1.0)
    assert after["repair_queue"] == 0


async def test_a_row_changed_underneath_the_shadow_is_counted_sampled_and_repaired(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    await flag(client, {"backend": "memory", "shadow": "database"})
    await client.post(f"{CREDITS}/drifter/deduct", json={"amount": 2})
    container = container_of(app)
    async with container.engine.begin() as conn:
        await conn.execute(
            text("UPDATE user_credits SET available_credits = 1 WHERE user_id = 'drifter'")
        )

    response = await client.get(f"{CREDITS}/drifter")
    assert response.json()["available_credits"] == 8  # the client sees the primary
    view = await storage(client)
    assert view["comparison"]["mismatches"] == 1
    assert view["comparison"]["consistency"] < 1
    (sample,) = view["comparison"]["samples"]
    assert (sample["user_id"], sample["operation"]) == ("drifter", "read")
    assert (sample["primary"]["available_credits"], sample["shadow"]["available_credits"]) == (
        8,
        1,
    )

    assert await container.shadow.repair_now() == 0
    await same_in_both(container, ["drifter"])
    await client.get(f"{CREDITS}/drifter")
    assert (await storage(client))["comparison"]["mismatches"] == 1  # no new difference


async def test_a_deduction_only_the_shadow_refuses_is_a_mismatch(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    await flag(client, {"backend": "memory", "shadow": "database"})
    await client.get(f"{CREDITS}/poorer")
    async with container_of(app).engine.begin() as conn:
        await conn.execute(
            text("UPDATE user_credits SET available_credits = 0 WHERE user_id = 'poorer'")
        )
    assert (await client.post(f"{CREDITS}/poorer/deduct")).status_code == 200
    (sample,) = (await storage(client))["comparison"]["samples"]
    assert sample["operation"] == "deduct"
    assert sample["shadow"] == {"refused": "insufficient_credits", "available": 0}


@pytest.mark.parametrize(
    "body",
    [
        {"backend": "memory", "shadow": "memory"},
        {"backend": "database", "shadow": "database"},
        {"backend": "memory", "shadow": "redis"},
    ],
    ids=["memory-twice", "database-twice", "unknown"],
)
async def test_a_shadow_that_is_not_the_other_store_is_422(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    before = await storage(client)
    response = await client.put("/admin/storage", json=body, headers=ADMIN)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "validation_error"
    assert await storage(client) == before


async def test_the_runbooks_stages_keep_every_change(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """memory → memory with database shadow → database with memory shadow → database,
    and the rollback from the last stage."""
    users = ["walker", "runner"]
    await client.post(f"{CREDITS}/walker/deduct", json={"amount": 1})
    for stage in (
        {"backend": "memory", "shadow": "database"},
        {"backend": "database", "shadow": "memory"},
        {"backend": "database"},
    ):
        await flag(client, stage)
        await client.post(f"{CREDITS}/walker/deduct", json={"amount": 1})
        await client.post(f"{CREDITS}/runner/deduct", json={"amount": 1})
        assert (await storage(client))["comparison"]["mismatches"] == 0
    assert (await client.get(f"{CREDITS}/walker")).json()["available_credits"] == 6
    assert (await client.get(f"{CREDITS}/runner")).json()["available_credits"] == 7

    await flag(client, {"backend": "memory"})  # roll back, carrying the state
    assert (await client.get(f"{CREDITS}/walker")).json()["available_credits"] == 6
    ledger = (await client.get(f"{CREDITS}/walker/transactions")).json()
    assert [row["amount"] for row in ledger] == [-1, -1, -1, -1]
    await same_in_both(container_of(app), users)


async def test_with_compare_rate_zero_writes_still_reach_the_shadow(
    request: pytest.FixtureRequest,
) -> None:
    async with fresh_database(request, "sqlite") as url:
        application = create_app(app_settings("memory", url, shadow_compare_rate=0.0))
        async with (
            application.router.lifespan_context(application),
            client_for(application) as client,
        ):
            await flag(client, {"backend": "memory", "shadow": "database"})
            await client.post(f"{CREDITS}/quiet/deduct", json={"amount": 3})
            assert (await storage(client))["comparison"]["compared"] == 0
            await same_in_both(container_of(application), ["quiet"])


@pytest.mark.postgres
async def test_a_shadow_that_goes_away_queues_repairs_and_catches_up(
    request: pytest.FixtureRequest,
) -> None:
    async with fresh_database(request, "postgres") as url, relayed(url) as (via, relay):
        settings = app_settings("memory", via, db_breaker_reset_seconds=0.3)
        application = create_app(settings)
        async with (
            application.router.lifespan_context(application),
            client_for(application) as client,
        ):
            await flag(client, {"backend": "memory", "shadow": "database"})
            await relay.cut()
            started = time.monotonic()
            for n in range(5):
                response = await client.post(f"{CREDITS}/offline-{n}/deduct", json={"amount": 2})
                assert response.status_code == 200  # the primary answers
            assert time.monotonic() - started < 30
            assert (await storage(client))["repair_queue"] == 5

            await relay.restore()
            # The background repair retries each second; within a few it has caught up.
            for _ in range(100):
                if not (await storage(client))["repair_queue"]:
                    break
                await asyncio.sleep(0.2)
            assert (await storage(client))["repair_queue"] == 0
            await same_in_both(container_of(application), [f"offline-{n}" for n in range(5)])


class Unmendable:
    """A shadow's state repository whose merges take nothing."""

    def __init__(self, inner: StateRepository) -> None:
        self.user_ids = inner.user_ids
        self.read = inner.read

    async def merge(self, carried: Sequence[Carried]) -> Merged:
        return Merged()


async def test_a_repair_that_did_not_take_keeps_the_user_queued(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    await flag(client, {"backend": "memory", "shadow": "database"})
    await client.post(f"{CREDITS}/stubborn/deduct", json={"amount": 2})
    container = container_of(app)
    async with container.engine.begin() as conn:
        await conn.execute(
            text("UPDATE user_credits SET available_credits = 5 WHERE user_id = 'stubborn'")
        )
    await client.get(f"{CREDITS}/stubborn")
    database = container.states[StorageBackend.DATABASE]
    container.states[StorageBackend.DATABASE] = Unmendable(database)
    assert await container.shadow.repair_now() == 1
    assert (await storage(client))["repair_queue"] == 1
    container.states[StorageBackend.DATABASE] = database
    assert await container.shadow.repair_now() == 0


async def test_a_full_repair_queue_counts_the_users_it_cannot_hold(
    request: pytest.FixtureRequest,
) -> None:
    async with fresh_database(request, "sqlite") as url:
        application = create_app(app_settings("memory", url, shadow_repair_max_users=2))
        async with (
            application.router.lifespan_context(application),
            client_for(application) as client,
        ):
            await flag(client, {"backend": "memory", "shadow": "database"})
            container = container_of(application)
            database = container.states[StorageBackend.DATABASE]
            container.states[StorageBackend.DATABASE] = Unmendable(database)
            for user in ("u1", "u2", "u3", "u4"):
                await client.post(f"{CREDITS}/{user}/deduct", json={"amount": 2})
            async with container.engine.begin() as conn:
                await conn.execute(text("UPDATE user_credits SET available_credits = 1"))
            for user in ("u1", "u2", "u3", "u4", "u3"):
                await client.get(f"{CREDITS}/{user}")
            view = await storage(client)
            assert (view["repair_queue"], view["repair_overflow"]) == (2, 3)
            # Seeded anew, the shadow starts clean.
            container.states[StorageBackend.DATABASE] = database
            await flag(client, {"backend": "memory"})
            await flag(client, {"backend": "memory", "shadow": "database"})
            view = await storage(client)
            assert (view["repair_queue"], view["repair_overflow"]) == (0, 0)
            await same_in_both(container, ["u1", "u2", "u3", "u4"])
