"""One truth per user on every path (SPEC revision 3 §7, §9, §10), over HTTP, on SQLite and
PostgreSQL: each sequence issue 26 found where two ways of moving state meet, answered as
the contract now says. Replicas are applications in one process sharing a database; an
outage takes the database away from all of them (tests/support/outage.py)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from app.config import StorageBackend
from app.container import Container
from app.domain.carry import Carried
from app.domain.state import Merged
from app.main import create_app
from app.repositories.base import StateRepository
from tests.conftest import DATABASES, app_settings, plain_dsn
from tests.support.app_client import client_for
from tests.support.outage import DatabaseOutage, downable_database

ADMIN = {"Authorization": "Bearer test-admin-token"}
NDJSON = {**ADMIN, "Content-Type": "application/x-ndjson"}
CREDITS = "/api/v1/credits"
CONSENTS = "/api/v1/consents"
USERS = "/api/v1/users"
ERASURE_KEY = "erasure-key-for-the-tests-0123456789"
SETTINGS: dict[str, Any] = {
    "erasure_key": ERASURE_KEY,
    "storage_flag_poll_seconds": 3600,  # followed when the test says (follow_cluster)
    "db_retry_attempts": 2,
    "db_retry_max_seconds": 0.5,
    "db_retry_initial_backoff": 0.01,
    "db_retry_max_backoff": 0.05,
    "db_breaker_failure_threshold": 2,
    "db_breaker_reset_seconds": 0.2,
    "db_connect_timeout": 1,
}
FALLBACK = {"db_outage_fallback": "memory"}

Start = Callable[..., Awaitable[tuple[FastAPI, httpx.AsyncClient]]]


class Cluster:
    """Replicas on one database that the test can take away."""

    def __init__(self, start: Start, outage: DatabaseOutage, url: str) -> None:
        self.start = start
        self.outage = outage
        self.url = url

    @asynccontextmanager
    async def running(
        self, backend: str = "database", **overrides: Any
    ) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
        """A replica that stops when the block ends (killed, as far as its journal goes)."""
        app = create_app(app_settings(backend, self.url, **{**SETTINGS, **overrides}))
        async with app.router.lifespan_context(app), client_for(app) as client:
            self.outage.attach(app)
            yield app, client

    async def back(self) -> None:
        """The database answers again, and the breakers let calls by."""
        await self.outage.end()
        await asyncio.sleep(SETTINGS["db_breaker_reset_seconds"])


@pytest.fixture(params=DATABASES)
async def cluster(request: pytest.FixtureRequest) -> AsyncIterator[Cluster]:
    async with (
        downable_database(request, request.param) as (url, outage),
        AsyncExitStack() as stack,
    ):

        async def start(
            backend: str = "database", **overrides: Any
        ) -> tuple[FastAPI, httpx.AsyncClient]:
            app = create_app(app_settings(backend, url, **{**SETTINGS, **overrides}))
            await stack.enter_async_context(app.router.lifespan_context(app))
            outage.attach(app)
            client = await stack.enter_async_context(client_for(app))
            return app, client

        yield Cluster(start, outage, url)
        await outage.end()


def container_of(app: FastAPI) -> Container:
    container: Container = app.state.container
    return container


async def balance(client: httpx.AsyncClient, user: str) -> int:
    response = await client.get(f"{CREDITS}/{user}")
    assert response.status_code == 200, response.text
    return int(response.json()["available_credits"])


async def deduct(
    client: httpx.AsyncClient, user: str, amount: int, key: str | None = None
) -> httpx.Response:
    headers = {} if key is None else {"Idempotency-Key": key}
    return await client.post(f"{CREDITS}/{user}/deduct", json={"amount": amount}, headers=headers)


async def audit(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.post("/admin/audit", headers=ADMIN)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def flip(client: httpx.AsyncClient, backend: str, **body: Any) -> httpx.Response:
    return await client.put("/admin/storage", json={"backend": backend, **body}, headers=ADMIN)


async def replayed(app: FastAPI, client: httpx.AsyncClient, seconds: float = 20) -> None:
    """Waits until the outage journal is empty (any call reaching the database replays)."""
    fallback = container_of(app).fallback
    assert fallback is not None
    deadline = time.monotonic() + seconds
    while fallback.depth:
        assert time.monotonic() < deadline, f"journal not replayed: {fallback.figures}"
        await client.get("/api/v1/credits/anyone")
        await asyncio.sleep(0.05)


async def held_nothing_of(client: httpx.AsyncClient, user: str) -> None:
    """Nothing of the user exists where the client's primary store keeps it."""
    export = (await client.get(f"{USERS}/{user}/export")).json()
    assert export == {
        "user_id": user,
        "credits": None,
        "transactions": [],
        "consent": None,
        "consent_history": [],
    }


async def test_1_a_followers_hand_over_never_undoes_a_later_write(cluster: Cluster) -> None:
    _, a = await cluster.start("memory")
    b_app, b = await cluster.start("memory")
    assert (await deduct(a, "x", 3)).json()["available_credits"] == 7
    assert (await deduct(b, "x", 1)).json()["available_credits"] == 9
    assert (await flip(a, "database")).status_code == 200
    assert (await deduct(a, "x", 4)).json()["available_credits"] == 3  # acknowledged
    assert await container_of(b_app).switching.follow_cluster()
    # Every replica's spending once: 10 - 3 - 1 - 4.
    assert await balance(a, "x") == await balance(b, "x") == 2
    ledger = (await a.get(f"{CREDITS}/x/transactions")).json()
    assert sorted(row["amount"] for row in ledger) == [-4, -3, -1]
    assert (await audit(a))["drifted"] == []


async def test_2_the_database_serves_a_user_only_once_their_journal_is_in_it(
    cluster: Cluster,
) -> None:
    app, client = await cluster.start(**FALLBACK)
    assert await balance(client, "x") == 10
    await cluster.outage.begin()
    assert (await deduct(client, "x", 10)).status_code == 200  # served by the fallback
    await cluster.outage.end()
    again = await deduct(client, "x", 10)
    assert again.status_code in (402, 503), again.text  # never 20 out of 10
    await replayed(app, client)
    assert await balance(client, "x") == 0
    ledger = (await client.get(f"{CREDITS}/x/transactions")).json()
    assert [row["amount"] for row in ledger] == [-10]


async def test_3_a_switch_of_primary_waits_for_the_journal(cluster: Cluster) -> None:
    app, client = await cluster.start(**FALLBACK)
    assert await balance(client, "x") == 10
    assert (await client.put(f"{CONSENTS}/x", json={"terms_accepted": True})).status_code == 200
    await cluster.outage.begin()
    assert (await deduct(client, "x", 4)).status_code == 200
    marketing = {"terms_accepted": True, "marketing_consent": True}
    assert (await client.put(f"{CONSENTS}/x", json=marketing)).status_code == 200
    pending = await flip(client, "memory")
    assert pending.status_code == 409, pending.text  # the journal cannot be replayed now
    assert pending.json()["error"]["code"] == "journal_pending"
    assert (await client.get("/admin/storage", headers=ADMIN)).json()["backend"] == "database"
    await cluster.back()
    switched = await flip(client, "memory")  # replays first, then hands over
    assert switched.status_code == 200, switched.text
    assert container_of(app).fallback.depth == 0  # type: ignore[union-attr]
    assert await balance(client, "x") == 6
    consent = await client.get(f"{CONSENTS}/x")
    assert consent.status_code == 200 and consent.json()["marketing_consent"] is True


async def test_4_a_follower_never_brings_an_erased_user_back(cluster: Cluster) -> None:
    _, a = await cluster.start("memory")
    b_app, b = await cluster.start("memory")
    await deduct(a, "x", 3)
    await b.post(f"{CREDITS}/x/deduct", json={"amount": 1, "description": "B's own words"})
    assert (await b.put(f"{CONSENTS}/x", json={"terms_accepted": True})).status_code == 200
    assert (await flip(a, "database")).status_code == 200
    erased = await a.delete(f"{USERS}/x")
    assert erased.json() == {"erased": True, "ledger_rows_pseudonymised": 1}
    assert await container_of(b_app).switching.follow_cluster()
    for client in (a, b):
        await held_nothing_of(client, "x")
        assert (await client.get(f"{CONSENTS}/x")).status_code == 404
    # Created again before its reset, the id resumes what it had at erasure: 7.
    assert await balance(b, "x") == 7


async def test_5_the_next_outage_starts_from_what_the_database_last_showed(
    cluster: Cluster,
) -> None:
    _, client = await cluster.start(**FALLBACK)
    await deduct(client, "x", 3)
    assert (await client.put(f"{CONSENTS}/y", json={"terms_accepted": True})).status_code == 200
    await cluster.outage.begin()
    assert await balance(client, "x") == 7  # an outage of reads only
    assert (await client.get(f"{CONSENTS}/y")).status_code == 200
    await cluster.back()
    assert (await deduct(client, "x", 7)).json()["available_credits"] == 0
    assert (await client.delete(f"{USERS}/y")).status_code == 200
    await cluster.outage.begin()
    assert (await deduct(client, "x", 7)).status_code == 402
    assert (await client.get(f"{CONSENTS}/y")).status_code == 503  # not known: not served
    await cluster.outage.end()


async def test_5_an_erased_user_is_not_served_by_the_next_outage(cluster: Cluster) -> None:
    _, client = await cluster.start(**FALLBACK)
    assert (await client.put(f"{CONSENTS}/y", json={"terms_accepted": True})).status_code == 200
    await cluster.outage.begin()
    assert (await client.get(f"{CONSENTS}/y")).status_code == 200  # served from memory
    await cluster.back()
    assert (await client.delete(f"{USERS}/y")).status_code == 200  # the first call after
    await cluster.outage.begin()
    assert (await client.get(f"{CONSENTS}/y")).status_code == 503  # not known: not served
    await cluster.back()


async def test_6_a_key_applied_just_before_an_outage_is_a_replay_in_it(
    cluster: Cluster,
) -> None:
    _, client = await cluster.start(**FALLBACK)
    await deduct(client, "x", 7)
    assert (await deduct(client, "x", 3, key="pay-1")).json()["available_credits"] == 0
    await cluster.outage.begin()
    retried = await deduct(client, "x", 3, key="pay-1")
    assert retried.status_code == 200, retried.text
    assert retried.headers["Idempotent-Replayed"] == "true"
    assert retried.json()["available_credits"] == 0
    # A key this replica never saw, that may have been applied elsewhere: 503, not 402.
    unknown = await deduct(client, "x", 3, key="pay-2")
    assert unknown.status_code == 503, unknown.text
    await cluster.back()
    ledger = (await client.get(f"{CREDITS}/x/transactions")).json()
    assert [row["amount"] for row in ledger] == [-3, -7]


class HeldRepair:
    """A shadow whose merges wait until released: a repair held between its read of the
    primary and its merge into the shadow."""

    def __init__(self, inner: StateRepository) -> None:
        self._inner = inner
        self.user_ids = inner.user_ids
        self.erasures = inner.erasures
        self.merge_erasures = inner.merge_erasures
        self.read = inner.read
        self.erase = inner.erase
        self.merging = asyncio.Event()
        self.release = asyncio.Event()

    async def merge(self, carried: list[Carried]) -> Merged:
        self.merging.set()
        await self.release.wait()
        return await self._inner.merge(carried)


async def test_7_a_shadow_repair_in_flight_neither_revives_nor_overwrites(
    cluster: Cluster,
) -> None:
    app, client = await cluster.start("memory")
    assert (await flip(client, "memory", shadow="database")).status_code == 200
    await deduct(client, "gone", 2)
    await deduct(client, "busy", 2)
    container = container_of(app)
    shadow = container.states[StorageBackend.DATABASE]
    held = HeldRepair(shadow)
    container.states[StorageBackend.DATABASE] = held
    container.shadow.repair("gone")
    container.shadow.repair("busy")
    repairing = asyncio.create_task(container.shadow.repair_now())
    await asyncio.wait_for(held.merging.wait(), 10)  # the primary is read; the merge waits
    container.states[StorageBackend.DATABASE] = shadow  # the erasure and the write pass
    assert (await client.delete(f"{USERS}/gone")).status_code == 200
    assert (await deduct(client, "busy", 5)).json()["available_credits"] == 3
    held.release.set()
    await repairing
    await container.shadow.repair_now()
    # Rolled over to the shadow: the erased user is not served, the write stands.
    assert (await flip(client, "database")).status_code == 200
    await held_nothing_of(client, "gone")
    assert await balance(client, "busy") == 3


async def test_8_keys_history_and_erasures_travel(cluster: Cluster) -> None:
    _, client = await cluster.start("memory")
    assert (await deduct(client, "x", 3, key="k")).status_code == 200
    await client.put(f"{CONSENTS}/x", json={"terms_accepted": True})
    await client.patch(f"{CONSENTS}/x", json={"marketing_consent": True})
    await deduct(client, "y", 1)
    assert (await flip(client, "database")).status_code == 200
    reused = await deduct(client, "x", 5, key="k")
    assert reused.status_code == 422, reused.text  # not a 200 replay
    assert reused.json()["error"]["code"] == "idempotency_key_reused"
    assert len((await client.get(f"{CONSENTS}/x/history")).json()) == 2

    backup = (await client.get("/admin/state/export", headers=ADMIN)).content  # y in it
    assert (await client.delete(f"{USERS}/y")).status_code == 200
    after = (await client.get("/admin/state/export", headers=ADMIN)).content
    kinds = [json.loads(line)["kind"] for line in after.splitlines()]
    assert {"key", "consent_event", "erasure"} <= set(kinds)
    # An old backup imported again does not bring the erased user back.
    imported = await client.post("/admin/state/import", content=backup, headers=NDJSON)
    assert imported.status_code == 200, imported.text
    await held_nothing_of(client, "y")
    # Into an empty store: the same keys, history and erasures.
    assert (await flip(client, "memory", carry_state=False)).status_code == 200
    restored = await client.post(
        "/admin/state/import", params={"store": "memory"}, content=after, headers=NDJSON
    )
    assert restored.status_code == 200, restored.text
    assert (await deduct(client, "x", 5, key="k")).status_code == 422
    assert len((await client.get(f"{CONSENTS}/x/history")).json()) == 2
    await held_nothing_of(client, "y")  # memory held y still: the restore erased it there
    again = await client.delete(f"{USERS}/y")  # erased before, in the restored store
    assert again.json() == {"erased": True, "ledger_rows_pseudonymised": 0}
    assert (
        await client.post(
            "/admin/state/import", params={"store": "memory"}, content=after, headers=NDJSON
        )
    ).json()["ledger_rows_added"] == 0


async def test_9_an_erasure_on_memory_is_recorded_for_every_later_hand_over(
    cluster: Cluster,
) -> None:
    # Found by the system model: a replica on memory erases a user the database holds
    # nothing of; another replica's later write of the user, on the database, must stand
    # when the first replica's hand-over carries its erasure record there.
    a_app, a = await cluster.start("memory")
    b_app, b = await cluster.start("memory")
    await deduct(a, "x", 2)
    await deduct(b, "x", 1)
    assert (await b.delete(f"{USERS}/x")).status_code == 200
    assert (await flip(a, "database")).status_code == 200
    await held_nothing_of(a, "x")  # a's change was made before the erasure
    assert (await deduct(a, "x", 3)).json()["available_credits"] == 7  # the user is back
    assert await container_of(b_app).switching.follow_cluster()
    ledger = (await a.get(f"{CREDITS}/x/transactions")).json()
    assert [row["amount"] for row in ledger] == [-3]
    assert await balance(b, "x") == 7
    assert container_of(a_app).carried.erased == 1  # a's change, dropped


async def test_8_an_import_carrying_an_erasure_erases_the_user_held(cluster: Cluster) -> None:
    _, a = await cluster.start("database")
    _, b = await cluster.start("memory")
    await deduct(a, "y", 2)
    await deduct(b, "y", 1)  # in b's memory, which a's erasure cannot reach
    assert (await a.delete(f"{USERS}/y")).status_code == 200
    export = (await a.get("/admin/state/export", headers=ADMIN)).content
    imported = await b.post("/admin/state/import", content=export, headers=NDJSON)
    assert imported.status_code == 200, imported.text
    assert imported.json()["users_erased"] == 1
    await held_nothing_of(b, "y")
    again = await b.delete(f"{USERS}/y")
    assert again.json() == {"erased": True, "ledger_rows_pseudonymised": 0}


async def test_a_retried_erasure_after_a_lost_answer_is_200_and_an_unknown_id_404(
    cluster: Cluster,
) -> None:
    _, client = await cluster.start()
    await deduct(client, "x", 1)
    assert (await client.delete(f"{USERS}/x")).json()["ledger_rows_pseudonymised"] == 1
    again = await client.delete(f"{USERS}/x")
    assert (again.status_code, again.json()) == (
        200,
        {"erased": True, "ledger_rows_pseudonymised": 0},
    )
    assert (await client.delete(f"{USERS}/never")).status_code == 404


async def test_11_a_process_started_in_an_outage_knows_the_keys_its_replay_landed(
    cluster: Cluster, tmp_path: Path
) -> None:
    # Found by the system model: a replica stopped in an outage and started again knew no
    # key of its users, so a key the database had applied, retried in the next outage,
    # was charged as new (and, reused for another amount, its change dead-lettered on
    # replay after a 200).
    journal = {**FALLBACK, "outage_journal_path": tmp_path / "journal.db"}
    async with cluster.running(**journal) as (_, first):
        assert (await deduct(first, "x", 2, key="pay-1")).json()["available_credits"] == 8
        await cluster.outage.begin()
        assert (await deduct(first, "x", 1)).json()["available_credits"] == 7  # journaled
    await cluster.back()
    app, client = await cluster.start(**journal)
    await replayed(app, client)  # lands x, as the database now holds them
    await cluster.outage.begin()
    retried = await deduct(client, "x", 2, key="pay-1")
    assert (retried.status_code, retried.headers.get("Idempotent-Replayed")) == (200, "true")
    assert retried.json()["available_credits"] == 7
    assert (await deduct(client, "x", 3, key="pay-1")).status_code == 422
    await cluster.back()
    assert await balance(client, "x") == 7
    fallback = container_of(app).fallback
    assert fallback is not None and fallback.journal.dead_letters == 0


async def test_12_a_user_whose_changes_wait_is_served_by_the_database_once_it_answers(
    cluster: Cluster,
) -> None:
    # Found by the system model: after an outage, until a replay ran (the periodic one,
    # or one a call the database answered set off), a replica served a user with changes
    # in its journal from its fallback store, which knows nothing written since: another
    # replica's key, reused, was charged as new, and dead-lettered on replay after a 200.
    slow = {**FALLBACK, "outage_replay_retry_seconds": 3600}
    a_app, a = await cluster.start(**slow)
    _, b = await cluster.start(**slow)
    await cluster.outage.begin()
    assert (await deduct(a, "x", 1)).json()["available_credits"] == 9  # in a's journal
    await cluster.back()
    assert (await deduct(b, "x", 2, key="pay-1")).json()["available_credits"] == 8
    reused = await deduct(a, "x", 3, key="pay-1")
    assert reused.status_code == 422, reused.text
    retried = await deduct(a, "x", 2, key="pay-1")
    assert (retried.status_code, retried.headers.get("Idempotent-Replayed")) == (200, "true")
    assert retried.json()["available_credits"] == 7  # both changes, each once
    fallback = container_of(a_app).fallback
    assert fallback is not None and (fallback.depth, fallback.journal.dead_letters) == (0, 0)


@pytest.mark.postgres
async def test_10_a_connection_lost_under_a_replay_keeps_the_change_journaled(
    request: pytest.FixtureRequest,
) -> None:
    # Found by the system model: the database went away while a replay's merge waited in
    # its transaction; asyncpg, failing to roll back on the closed connection, raised an
    # InterfaceError the replay took for a refusal, and moved the acknowledged change to
    # the dead letters (lost to the balance).
    async with (
        downable_database(request, "postgres") as (url, outage),
        AsyncExitStack() as stack,
    ):
        app = create_app(app_settings("database", url, **SETTINGS, **FALLBACK))
        await stack.enter_async_context(app.router.lifespan_context(app))
        client = await stack.enter_async_context(client_for(app))
        fallback = container_of(app).fallback
        assert fallback is not None
        await deduct(client, "x", 1)
        await outage.begin()
        assert (await deduct(client, "x", 2, key="in-the-outage")).status_code == 200
        await outage.end()
        holder = await asyncpg.connect(plain_dsn(url))
        holding = holder.transaction()
        await holding.start()
        await holder.execute("SELECT 1 FROM user_credits WHERE user_id = 'x' FOR UPDATE")
        await asyncio.sleep(SETTINGS["db_breaker_reset_seconds"])
        replay = asyncio.create_task(fallback.replay())  # waits for the row
        await asyncio.sleep(0.5)
        await outage.begin()  # every connection through the relay reset, the holder's too
        await replay
        assert (fallback.depth, fallback.journal.dead_letters) == (1, 0)
        await outage.end()
        holder.terminate()
        await asyncio.sleep(SETTINGS["db_breaker_reset_seconds"])
        await replayed(app, client)
        assert await balance(client, "x") == 7
        ledger = (await client.get(f"{CREDITS}/x/transactions")).json()
        assert sorted(row["amount"] for row in ledger) == [-2, -1]
        again = await deduct(client, "x", 2, key="in-the-outage")
        assert again.headers.get("Idempotent-Replayed") == "true"
