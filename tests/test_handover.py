"""The hand-over (SPEC §7): `PUT /admin/storage` carries credits and consents to the new
primary, verified, with no acknowledged write lost; a failed verification or a second
change leaves the flag. Each way, with the database on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select

from app.config import StorageBackend
from app.container import Container
from app.domain.carry import Carried
from app.domain.state import Merged, UserState, verified
from app.main import create_app
from app.models import CreditTransactionRow, UserCreditsRow, table
from app.repositories.base import StateRepository
from tests.conftest import DATABASES, app_settings, fresh_database
from tests.support.app_client import client_for
from tests.support.relay import relayed

ADMIN = {"Authorization": "Bearer test-admin-token"}
CREDITS = "/api/v1/credits"
CONSENTS = "/api/v1/consents"
DIRECTIONS = [("memory", "database"), ("database", "memory")]


@pytest.fixture(params=DATABASES)
async def database_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def app_on(request: pytest.FixtureRequest, database_kind: str) -> AsyncIterator[Any]:
    """Starts the application on a fresh database with the given primary."""
    async with fresh_database(request, database_kind) as url:
        contexts: list[Any] = []

        async def started(backend: str) -> tuple[FastAPI, httpx.AsyncClient]:
            app = create_app(app_settings(backend, url))
            context = app.router.lifespan_context(app)
            await context.__aenter__()
            contexts.append(context)
            return app, client_for(app)

        yield started
        for context in reversed(contexts):
            await context.__aexit__(None, None, None)


def container_of(app: FastAPI) -> Container:
    container: Container = app.state.container
    return container


async def put_storage(client: httpx.AsyncClient, body: dict[str, Any]) -> httpx.Response:
    return await client.put("/admin/storage", json=body, headers=ADMIN)


async def seed(client: httpx.AsyncClient) -> None:
    """Users with every kind of change: deductions, a refund, an upgrade, consents."""
    assert (await client.post(f"{CREDITS}/ann/deduct", json={"amount": 3})).status_code == 200
    await client.post(
        f"{CREDITS}/ann/refund", json={"amount": 1}, headers={"Idempotency-Key": "ann-refund"}
    )
    await client.post(f"{CREDITS}/bob/deduct", json={"amount": 2, "is_guest": False})
    await client.post(f"{CREDITS}/cy/deduct", json={"amount": 4})
    await client.post(f"{CREDITS}/cy/upgrade")
    await client.put(f"{CONSENTS}/ann", json={"terms_accepted": True, "marketing_consent": True})
    await client.put(f"{CONSENTS}/dee", json={"terms_accepted": True})
    patched = await client.patch(f"{CONSENTS}/dee", json={"marketing_consent": True})
    assert patched.json()["marketing_consent"] is True


async def picture(client: httpx.AsyncClient, users: Sequence[str]) -> dict[str, Any]:
    """What a client sees of each user: account, ledger (without ids), consent."""
    seen: dict[str, Any] = {}
    for user in users:
        credits = (await client.get(f"{CREDITS}/{user}")).json()
        ledger = (await client.get(f"{CREDITS}/{user}/transactions")).json()
        consent = await client.get(f"{CONSENTS}/{user}")
        seen[user] = (
            credits,
            [{k: v for k, v in row.items() if k != "id"} for row in ledger],
            consent.json() if consent.status_code == 200 else consent.status_code,
        )
    return seen


USERS = ["ann", "bob", "cy", "dee"]


@pytest.mark.parametrize(("start", "goal"), DIRECTIONS)
async def test_a_hand_over_carries_accounts_ledgers_and_consents(
    app_on: Any, start: str, goal: str
) -> None:
    _, client = await app_on(start)
    await seed(client)
    before = await picture(client, USERS)

    response = await put_storage(client, {"backend": goal})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["backend"] == goal
    assert body["handover"]["mismatches"] == 0
    assert body["handover"]["accounts"] == 4  # dee's opened by the picture's read
    assert body["handover"]["consents"] == 2
    # ann: deduction and refund; bob: deduction; cy: deduction and upgrade.
    assert body["handover"]["ledger_rows"] == 5

    assert await picture(client, USERS) == before
    # The refund's key came along: repeating the refund credits nothing again.
    await client.post(f"{CREDITS}/ann/deduct", json={"amount": 5})
    repeated = await client.post(
        f"{CREDITS}/ann/refund", json={"amount": 1}, headers={"Idempotency-Key": "ann-refund"}
    )
    assert repeated.json()["available_credits"] == 3

    # And back: what changed on the new primary comes home too.
    after = await picture(client, USERS)
    assert (await put_storage(client, {"backend": start})).status_code == 200
    assert await picture(client, USERS) == after


async def test_the_database_sees_the_handed_over_rows(app_on: Any) -> None:
    app, client = await app_on("memory")
    await seed(client)
    assert (await put_storage(client, {"backend": "database"})).status_code == 200
    async with container_of(app).engine.connect() as conn:
        balance = await conn.scalar(
            select(table(UserCreditsRow).c.available_credits).where(
                table(UserCreditsRow).c.user_id == "ann"
            )
        )
        rows = await conn.scalar(select(func.count()).select_from(table(CreditTransactionRow)))
    assert (balance, rows) == (8, 5)


async def test_the_storage_view_names_the_flag_and_when_it_last_changed(app_on: Any) -> None:
    _, client = await app_on("memory")
    before = (await client.get("/admin/storage", headers=ADMIN)).json()
    assert before["backend"] == "memory"
    assert before["shadow"] is None
    assert before["repair_queue"] == 0
    assert before["comparison"] == {
        "compared": 0,
        "mismatches": 0,
        "consistency": 1.0,
        "samples": [],
    }
    assert (await put_storage(client, {"backend": "database"})).status_code == 200
    after = (await client.get("/admin/storage", headers=ADMIN)).json()
    assert datetime.fromisoformat(after["changed_at"]) > datetime.fromisoformat(
        before["changed_at"]
    )


async def test_carry_state_false_flips_without_copying(app_on: Any) -> None:
    _, client = await app_on("memory")
    await client.post(f"{CREDITS}/solo/deduct", json={"amount": 3})
    response = await put_storage(client, {"backend": "database", "carry_state": False})
    assert response.status_code == 200
    assert "handover" not in response.json()
    assert (await client.get(f"{CREDITS}/solo")).json()["available_credits"] == 10


async def test_a_merge_keeps_the_old_primarys_account_and_the_later_consent(
    app_on: Any,
) -> None:
    _, client = await app_on("memory")
    # The database knows an older state of the user, and a later consent.
    await client.post(f"{CREDITS}/both/deduct", json={"amount": 1})
    await client.put(f"{CONSENTS}/both", json={"terms_accepted": True})
    assert (await put_storage(client, {"backend": "database"})).status_code == 200
    await client.put(f"{CONSENTS}/both", json={"terms_accepted": True, "marketing_consent": True})
    assert (
        await put_storage(client, {"backend": "memory", "carry_state": False})
    ).status_code == 200
    # Memory moves on without the database's consent change.
    await client.post(f"{CREDITS}/both/deduct", json={"amount": 2})

    response = await put_storage(client, {"backend": "database"})
    assert response.status_code == 200, response.text
    assert response.json()["handover"]["ledger_rows_added"] == 1
    assert (await client.get(f"{CREDITS}/both")).json()["available_credits"] == 7
    ledger = (await client.get(f"{CREDITS}/both/transactions")).json()
    assert [row["amount"] for row in ledger] == [-2, -1]  # no row twice
    assert (await client.get(f"{CONSENTS}/both")).json()["marketing_consent"] is True


@pytest.mark.parametrize(("start", "goal"), DIRECTIONS)
async def test_no_acknowledged_deduction_is_lost_racing_a_hand_over(
    app_on: Any, start: str, goal: str
) -> None:
    app, client = await app_on(start)
    users = [f"racer-{n}" for n in range(60)]
    # Enough users that the copy takes a while, so writes land in every phase of it.
    for n in range(400):
        await client.post(f"{CREDITS}/bystander-{n}/deduct")
    for user in users:
        await client.get(f"{CREDITS}/{user}")

    async def deduct(n: int) -> None:
        await asyncio.sleep(0.002 * (n % 50))
        response = await client.post(f"{CREDITS}/{users[n % len(users)]}/deduct")
        assert response.status_code == 200, response.text

    switch = asyncio.create_task(put_storage(client, {"backend": goal}))
    # 5 deductions for each user, within a budget of 10: every one is acknowledged.
    await asyncio.gather(*(deduct(n) for n in range(300)))
    response = await switch
    assert response.status_code == 200, response.text
    assert response.json()["backend"] == goal

    container = container_of(app)
    states = await container.states[StorageBackend(goal)].read(users)
    for state in states:
        assert state.account is not None
        assert state.account.available == 5, state.user_id
        deductions = [row for row in state.ledger if row.kind == "deduction"]
        assert len(deductions) == 5, state.user_id


class Faulty:
    """A store's state repository that loses the first ledger row of every user it
    merges, and whose VERIFY finds so: every carried row must be held afterwards."""

    def __init__(self, inner: StateRepository) -> None:
        self._inner = inner
        self.user_ids = inner.user_ids
        self.erasures = inner.erasures
        self.merge_erasures = inner.merge_erasures
        self.read = inner.read

    async def merge(self, carried: Sequence[Carried]) -> Merged:
        lossy = [replace(one, credits=one.credits[1:]) for one in carried]
        merged = await self._inner.merge(lossy)
        expected = [
            UserState(one.user_id, ledger=tuple(c.row for c in one.credits if c.row))
            for one in carried
        ]
        held = await self.read([one.user_id for one in carried])
        return Merged(merged.tally, verified(expected, held))


@pytest.mark.parametrize(("start", "goal"), DIRECTIONS)
async def test_a_verification_mismatch_is_409_and_leaves_the_flag(
    app_on: Any, start: str, goal: str
) -> None:
    app, client = await app_on(start)
    await seed(client)
    container = container_of(app)
    target = StorageBackend(goal)
    container.states[target] = Faulty(container.states[target])

    response = await put_storage(client, {"backend": goal})
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert error["code"] == "handover_failed"
    report = error["details"]["handover"]
    assert report["mismatches"] == 3  # every user with a ledger
    assert {sample["user_id"] for sample in report["samples"]} == {"ann", "bob", "cy"}
    assert "ledger row(s) missing" in report["samples"][0]["differences"][0]
    assert (await client.get("/admin/storage", headers=ADMIN)).json()["backend"] == start
    # Writes were released and still go to the old primary.
    deducted = await client.post(f"{CREDITS}/ann/deduct")
    assert deducted.json()["available_credits"] == 7


class Slow:
    """A state repository whose merge waits until released."""

    def __init__(self, inner: StateRepository) -> None:
        self._inner = inner
        self.user_ids = inner.user_ids
        self.erasures = inner.erasures
        self.merge_erasures = inner.merge_erasures
        self.read = inner.read
        self.merging = asyncio.Event()
        self.release = asyncio.Event()

    async def merge(self, carried: Sequence[Carried]) -> Merged:
        self.merging.set()
        await self.release.wait()
        return await self._inner.merge(carried)


async def test_a_second_change_during_a_hand_over_is_409_and_reads_go_on(
    app_on: Any,
) -> None:
    app, client = await app_on("memory")
    await seed(client)
    container = container_of(app)
    slow = Slow(container.states[StorageBackend.DATABASE])
    container.states[StorageBackend.DATABASE] = slow

    first = asyncio.create_task(put_storage(client, {"backend": "database"}))
    await asyncio.wait_for(slow.merging.wait(), 10)
    second = await put_storage(client, {"backend": "database", "carry_state": False})
    assert second.status_code == 409
    assert second.json()["error"]["code"] == "handover_in_progress"
    # Reads and writes are served while the copy runs.
    assert (await client.get(f"{CONSENTS}/ann")).status_code == 200
    assert (await client.post(f"{CREDITS}/ann/deduct")).json()["available_credits"] == 7
    slow.release.set()
    assert (await first).status_code == 200
    assert (await client.get(f"{CREDITS}/ann")).json()["available_credits"] == 7


@pytest.mark.postgres
async def test_a_hand_over_from_a_database_gone_is_503_quickly_and_leaves_the_flag(
    request: pytest.FixtureRequest,
) -> None:
    async with fresh_database(request, "postgres") as url, relayed(url) as (via, relay):
        app = create_app(app_settings("postgres", via, db_breaker_reset_seconds=0.3))
        async with (
            app.router.lifespan_context(app),
            client_for(app, raise_app_exceptions=False) as client,
        ):
            await seed(client)
            await relay.cut()
            started = time.monotonic()
            response = await put_storage(client, {"backend": "memory"})
            assert time.monotonic() - started < 10
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "storage_unavailable"
            view = (await client.get("/admin/storage", headers=ADMIN)).json()
            assert view["backend"] == "database"
            await relay.restore()
