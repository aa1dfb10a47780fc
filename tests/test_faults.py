"""Faults against a real PostgreSQL server that these tests stop, start and sabotage.

A dedicated throwaway cluster (not the shared test server), since it goes down here.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from app.db.resilience import CircuitBreaker, Guard, RetryPolicy
from tests.conftest import _server_or_skip, app_settings, plain_dsn, run_outside_loop
from tests.support.app_client import running
from tests.support.postgres import PostgresServer, PostgresUnavailable, start_local_cluster
from tests.support.served import Served, served

pytestmark = pytest.mark.postgres

BUDGET = 1_000_000  # traffic never runs out of credits
REQUEST_BOUND = 5.0  # seconds: past this a request counts as hung
FAULT_SETTINGS: dict[str, Any] = {
    "db_retry_attempts": 4,
    "db_retry_max_seconds": 1.5,
    "db_retry_initial_backoff": 0.02,
    "db_retry_max_backoff": 0.2,
    "db_breaker_failure_threshold": 3,
    "db_breaker_reset_seconds": 0.5,
    "db_connect_timeout": 2,
    "registered_max_credits": BUDGET,
}


@pytest.fixture(scope="module")
def fault_server() -> Iterator[PostgresServer]:
    server = _server_or_skip(start_local_cluster, "PostgreSQL", PostgresUnavailable)
    yield server
    server.stop()


@pytest.fixture
def fault_url(fault_server: PostgresServer) -> Iterator[str]:
    name = f"fault_{uuid.uuid4().hex[:12]}"

    async def admin(statement: str) -> None:
        connection = await asyncpg.connect(plain_dsn(fault_server.admin_url))
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    run_outside_loop(admin(f"CREATE DATABASE {name}"))
    yield fault_server.url_for(name)
    run_outside_loop(admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@asynccontextmanager
async def started(url: str, **overrides: Any) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    async with running(app_settings("database", url, **{**FAULT_SETTINGS, **overrides})) as pair:
        yield pair


@pytest.fixture
async def service(fault_url: str) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    async with started(fault_url) as pair:
        yield pair


class Traffic:
    """Deductions with unique Idempotency-Keys; remembers what each answer said."""

    def __init__(self, client: httpx.AsyncClient, users: list[str]) -> None:
        self.client = client
        self.users = users
        self.statuses: Counter[int] = Counter()
        self.acknowledged: dict[str, str] = {}  # key -> user
        self.unanswered: dict[str, str] = {}  # key -> user, for 503s (outcome unknown)
        self.slowest = 0.0
        self.retry_after_seen = False

    async def deduct(self, user: str, key: str) -> int:
        started_at = time.monotonic()
        async with asyncio.timeout(REQUEST_BOUND):
            response = await self.client.post(
                f"/api/v1/credits/{user}/deduct",
                json={"amount": 1, "is_guest": False},
                headers={"Idempotency-Key": key},
            )
        self.slowest = max(self.slowest, time.monotonic() - started_at)
        self.statuses[response.status_code] += 1
        if response.status_code == 200:
            self.acknowledged[key] = user
            self.unanswered.pop(key, None)
        elif response.status_code == 503:
            self.retry_after_seen |= int(response.headers.get("Retry-After", "0")) >= 1
            assert response.json()["error"]["code"] == "storage_unavailable"
            self.unanswered[key] = user
        return response.status_code

    async def run(self, seconds: float, pause: float = 0.01) -> None:
        deadline = time.monotonic() + seconds

        async def worker(user: str) -> None:
            while time.monotonic() < deadline:
                await self.deduct(user, uuid.uuid4().hex)
                await asyncio.sleep(pause)

        await asyncio.gather(*(worker(user) for user in self.users))

    async def replay_unanswered(self) -> None:
        for key, user in list(self.unanswered.items()):
            assert await self.deduct(user, key) == 200


async def assert_ledger_matches(client: httpx.AsyncClient, traffic: Traffic) -> None:
    """Every acknowledged deduction is in the ledger exactly once, and the ledger
    invariant holds for every user touched."""
    charged = Counter(traffic.acknowledged.values())
    for user in traffic.users:
        account = (await client.get(f"/api/v1/credits/{user}?is_guest=false")).json()
        ledger = (await client.get(f"/api/v1/credits/{user}/transactions?limit=500")).json()
        deductions = [row for row in ledger if row["transaction_type"] == "deduction"]
        assert len(deductions) == charged[user], user
        assert account["available_credits"] == BUDGET + sum(row["amount"] for row in ledger)


class TestDatabaseStoppedAndStarted:
    async def test_requests_get_503_while_down_and_succeed_again_after_without_a_restart(
        self, service: tuple[FastAPI, httpx.AsyncClient], fault_server: PostgresServer
    ) -> None:
        app, client = service
        traffic = Traffic(client, [f"shopper-{n}" for n in range(4)])
        await traffic.run(0.5)
        assert traffic.statuses[200] > 0

        await asyncio.to_thread(fault_server.pause)
        try:
            await traffic.run(1.5)
            ready = await client.get("/health/ready")
            live = await client.get("/health")
        finally:
            await asyncio.to_thread(fault_server.resume)
        assert (ready.status_code, live.status_code) == (503, 200)
        assert ready.json()["database"]["reachable"] is False
        assert traffic.statuses[503] > 0 and traffic.retry_after_seen
        assert app.state.container.breaker.state.value in {"open", "half_open"}

        recovered_by = time.monotonic() + 15
        while await traffic.deduct("shopper-0", uuid.uuid4().hex) != 200:
            assert time.monotonic() < recovered_by, "no recovery after the database came back"
            await asyncio.sleep(0.1)
        await traffic.run(0.3)
        await traffic.replay_unanswered()

        assert set(traffic.statuses) <= {200, 503}, traffic.statuses
        assert traffic.slowest < REQUEST_BOUND
        assert (await client.get("/health/ready")).status_code == 200
        await assert_ledger_matches(client, traffic)


class TestBackendsTerminated:
    async def test_killed_connections_are_retried_and_nothing_is_charged_twice(
        self, service: tuple[FastAPI, httpx.AsyncClient], fault_url: str
    ) -> None:
        _, client = service
        traffic = Traffic(client, [f"buyer-{n}" for n in range(4)])
        database = fault_url.rsplit("/", 1)[1]
        killer = await asyncpg.connect(plain_dsn(fault_url))
        kills = 0

        async def terminate_backends() -> None:
            nonlocal kills
            for _ in range(8):
                await asyncio.sleep(0.15)
                kills += await killer.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = $1 AND pid <> pg_backend_pid()",
                    database,
                )

        try:
            await asyncio.gather(traffic.run(1.5, pause=0.002), terminate_backends())
        finally:
            await killer.close()
        assert kills > 0
        assert set(traffic.statuses) == {200}, traffic.statuses  # every one through retries
        await assert_ledger_matches(client, traffic)


class TestPoolExhaustion:
    async def test_a_request_waits_at_most_the_pool_timeout_then_gets_503(
        self, fault_url: str
    ) -> None:
        small_pool = {"db_pool_size": 1, "db_max_overflow": 0, "db_pool_timeout": 0.5}
        async with started(fault_url, **small_pool) as (app, client):
            engine = app.state.container.engine
            async with engine.connect() as held:
                await held.execute(text("SELECT 1"))
                began = time.monotonic()
                async with asyncio.timeout(REQUEST_BOUND):
                    response = await client.get("/api/v1/credits/waiting")
                waited = time.monotonic() - began
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "storage_unavailable"
            assert "Retry-After" in response.headers
            assert 0.4 < waited < 3
            assert (await client.get("/api/v1/credits/waiting")).status_code == 200
            assert app.state.container.breaker.state.value == "closed"


class TestDeadlocks:
    async def test_a_deadlock_victim_is_retried_and_both_transactions_complete(
        self, service: tuple[FastAPI, httpx.AsyncClient]
    ) -> None:
        app, client = service
        for user in ("left", "right"):
            assert (await client.get(f"/api/v1/credits/{user}")).status_code == 200
        engine = app.state.container.engine
        guard = Guard(
            CircuitBreaker(failure_threshold=5, reset_timeout=1),
            RetryPolicy(attempts=3, max_seconds=10, initial_backoff=0.01, max_backoff=0.05),
        )
        both_hold_one = asyncio.Barrier(2)
        attempts: Counter[str] = Counter()

        async def lock_in_order(first: str, second: str) -> None:
            async def unit() -> None:
                attempts[first] += 1
                async with engine.begin() as connection:
                    lock = "UPDATE user_credits SET updated_at = now() WHERE user_id = :u"
                    await connection.execute(text(lock), {"u": first})
                    if attempts[first] == 1:
                        await both_hold_one.wait()
                    await connection.execute(text(lock), {"u": second})

            await guard.run(unit)

        await asyncio.gather(lock_in_order("left", "right"), lock_in_order("right", "left"))
        assert sorted(attempts.values()) == [1, 2]  # exactly one victim, retried once


async def wait_for(condition: Any, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


class TestMemoryFallback:
    async def test_changes_made_during_an_outage_are_replayed_exactly_once_after_it(
        self, fault_url: str, fault_server: PostgresServer
    ) -> None:
        async with started(fault_url, db_outage_fallback="memory") as (app, client):
            fallback = app.state.container.fallback
            user = "/api/v1/credits/traveller"
            body = {"amount": 2, "is_guest": False}
            first = await client.post(f"{user}/deduct", json={"amount": 1, "is_guest": False})
            assert first.status_code == 200

            await asyncio.to_thread(fault_server.pause)
            try:
                for n in range(5):
                    response = await client.post(
                        f"{user}/deduct",
                        json=body,
                        headers={"Idempotency-Key": f"trip-{n}"},
                    )
                    assert response.status_code == 200, response.text
                repeat = await client.post(
                    f"{user}/deduct", json=body, headers={"Idempotency-Key": "trip-0"}
                )
                assert repeat.status_code == 200
                consent = await client.put(
                    "/api/v1/consents/traveller",
                    json={"terms_accepted": True, "marketing_consent": True},
                )
                assert consent.status_code == 200
                ready = await client.get("/health/ready")
                assert (ready.status_code, ready.json()["mode"]) == (200, "memory fallback")
                assert ready.json()["fallback"]["journal_depth"] == fallback.depth >= 6
            finally:
                await asyncio.to_thread(fault_server.resume)

            async def drained() -> bool:
                await client.get("/api/v1/consents/traveller")  # any call that reaches the database
                return bool(fallback.depth == 0)

            await wait_for(drained)
            await fallback.replay()  # a second replay changes nothing
            ledger = (await client.get(f"{user}/transactions")).json()
            assert [row["amount"] for row in ledger] == [-2] * 5 + [-1]
            assert (await client.get(user)).json()["available_credits"] == BUDGET - 11
            consent_row = (await client.get("/api/v1/consents/traveller")).json()
            assert consent_row["marketing_consent"] is True
            ready = (await client.get("/health/ready")).json()
            assert (ready["mode"], ready["fallback"]["journal_depth"]) == ("database", 0)

    async def test_a_replayed_deduction_that_no_longer_fits_is_clamped_to_what_is_left(
        self, fault_url: str, fault_server: PostgresServer
    ) -> None:
        async with (
            started(fault_url, db_outage_fallback="memory") as (app, client),
            started(fault_url) as (_, other_replica),
        ):
            fallback = app.state.container.fallback
            user = "/api/v1/credits/spender"
            assert (await client.get(user)).json()["available_credits"] == 10
            spent = await other_replica.post(f"{user}/deduct", json={"amount": 7})
            assert spent.status_code == 200

            await asyncio.to_thread(fault_server.pause)
            try:  # this replica last saw 10, not the 7 spent on the other: it allows 5
                response = await client.post(f"{user}/deduct", json={"amount": 5})
                assert response.status_code == 200
            finally:
                await asyncio.to_thread(fault_server.resume)

            async def drained() -> bool:
                await client.get(user)
                return bool(fallback.depth == 0)

            await wait_for(drained)
            assert (await client.get(user)).json()["available_credits"] == 0
            ledger = (await client.get(f"{user}/transactions")).json()
            assert [row["amount"] for row in ledger] == [-3, -7]
            assert "clamped from 5" in ledger[0]["description"]
            assert (await client.get("/health/ready")).json()["fallback"]["clamped"] == 1


JOURNALED = {
    "DB_OUTAGE_FALLBACK": "memory",
    "DB_RETRY_ATTEMPTS": "2",
    "DB_RETRY_MAX_SECONDS": "1",
    "DB_BREAKER_FAILURE_THRESHOLD": "2",
    "DB_BREAKER_RESET_SECONDS": "0.5",
    "DB_CONNECT_TIMEOUT": "2",
    "REGISTERED_MAX_CREDITS": str(BUDGET),
}


def journal_settings(path: Path) -> dict[str, str]:
    return {**JOURNALED, "OUTAGE_JOURNAL_PATH": str(path)}


def replayed_all(server: Served, seconds: float = 30) -> dict[str, int]:
    """Waits until the service's journal is empty; its /health/ready figures then."""
    deadline = time.monotonic() + seconds
    while True:
        figures: dict[str, int] = httpx.get(f"{server.base}/health/ready").json()["fallback"]
        if figures["journal_depth"] == 0:
            return figures
        assert time.monotonic() < deadline, f"journal not replayed: {figures}"
        time.sleep(0.2)


async def ledger_of(url: str, user_id: str) -> list[tuple[int, str | None]]:
    connection = await asyncpg.connect(plain_dsn(url))
    try:
        rows = await connection.fetch(
            "SELECT amount, idempotency_key FROM credit_transactions WHERE user_id = $1 "
            "ORDER BY id",
            user_id,
        )
        balance = await connection.fetchval(
            "SELECT available_credits FROM user_credits WHERE user_id = $1", user_id
        )
    finally:
        await connection.close()
    return [(balance, None), *((row["amount"], row["idempotency_key"]) for row in rows)]


class TestOutageJournal:
    """SPEC §9 with real processes killed by SIGKILL and a real server stopped."""

    def test_changes_acknowledged_before_a_kill_land_once_after_restarts(
        self, fault_url: str, fault_server: PostgresServer, tmp_path: Path
    ) -> None:
        settings = journal_settings(tmp_path / "outage-journal.db")
        credits, body = "/api/v1/credits/kept", {"amount": 1, "is_guest": False}
        with served(fault_url, **settings) as first, httpx.Client(base_url=first.base) as api:
            assert api.post(f"{credits}/deduct", json={**body, "amount": 2}).status_code == 200
            consent = {"terms_accepted": True, "marketing_consent": False}
            assert api.put("/api/v1/consents/kept", json=consent).status_code == 200
            fault_server.pause()
            try:
                for n in range(10):
                    keyed = api.post(
                        f"{credits}/deduct", json=body, headers={"Idempotency-Key": f"k{n}"}
                    )
                    assert keyed.status_code == 200, keyed.text
                assert api.post(f"{credits}/deduct", json=body).status_code == 200  # own key
                assert api.get(credits).json()["available_credits"] == BUDGET - 13
                marketing = api.patch("/api/v1/consents/kept", json={"marketing_consent": True})
                assert marketing.status_code == 200  # known: seen in the database before
                assert api.get("/api/v1/consents/never-seen").status_code == 503
                ready = api.get("/health/ready").json()
                assert (ready["mode"], ready["fallback"]["journal_depth"]) == (
                    "memory fallback",
                    12,
                )
                first.kill()
            finally:
                fault_server.resume()

        with served(fault_url, **settings) as second:
            assert replayed_all(second)["replayed"] == 12
        ledger = run_outside_loop(ledger_of(fault_url, "kept"))
        assert ledger[0] == (BUDGET - 13, None)
        assert [amount for amount, _ in ledger[1:]] == [-2] + [-1] * 11
        keys = [key for _, key in ledger[2:12]]
        assert keys == [f"k{n}" for n in range(10)]

        with served(fault_url, **settings) as third:
            assert replayed_all(third)["replayed"] == 0
            consent_now = httpx.get(f"{third.base}/api/v1/consents/kept").json()
            assert consent_now["marketing_consent"] is True
        assert run_outside_loop(ledger_of(fault_url, "kept")) == ledger

    def test_two_replicas_journals_replay_concurrently_into_one_database(
        self, fault_url: str, fault_server: PostgresServer, tmp_path: Path
    ) -> None:
        replicas = [journal_settings(tmp_path / f"replica-{n}.db") for n in range(2)]
        credits = "/api/v1/credits/shared"
        with served(fault_url, **replicas[0]) as one, served(fault_url, **replicas[1]) as two:
            for replica in (one, two):  # each sees the account at its full 10
                assert httpx.get(f"{replica.base}{credits}").json()["available_credits"] == 10
            fault_server.pause()
            try:
                for name, replica in (("a", one), ("b", two)):
                    for n in range(6):  # together 12 of the 10 there are
                        spent = httpx.post(
                            f"{replica.base}{credits}/deduct",
                            json={"amount": 1},
                            headers={"Idempotency-Key": f"{name}{n}"},
                        )
                        assert spent.status_code == 200, spent.text
                    replica.kill()
            finally:
                fault_server.resume()
        with served(fault_url, **replicas[0]) as one, served(fault_url, **replicas[1]) as two:
            figures = [replayed_all(one), replayed_all(two)]
        assert sum(f["replayed"] for f in figures) == 12
        assert sum(f["clamped"] for f in figures) == 2
        ledger = run_outside_loop(ledger_of(fault_url, "shared"))
        assert ledger[0] == (0, None)
        keys = [key for _, key in ledger[1:]]
        assert len(keys) == len(set(keys)) == 10  # each change at most once, none twice
        assert sum(amount for amount, _ in ledger[1:]) == -10  # the ledger sums

    async def test_a_change_the_database_refuses_becomes_a_dead_letter_and_the_rest_land(
        self, fault_url: str, fault_server: PostgresServer
    ) -> None:
        refuse = """
            CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.user_id = 'poison' THEN RAISE EXCEPTION 'refused (test)'; END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER refuse_poison BEFORE INSERT ON credit_transactions
                FOR EACH ROW EXECUTE FUNCTION refuse_poison();
        """
        async with started(fault_url, db_outage_fallback="memory") as (app, client):
            connection = await asyncpg.connect(plain_dsn(fault_url))
            try:
                await connection.execute(refuse)
            finally:
                await connection.close()
            await asyncio.to_thread(fault_server.pause)
            try:
                for user in ("before", "poison", "after"):
                    spent = await client.post(f"/api/v1/credits/{user}/deduct", json={"amount": 1})
                    assert spent.status_code == 200, spent.text
            finally:
                await asyncio.to_thread(fault_server.resume)
            fallback = app.state.container.fallback

            async def drained() -> bool:
                await client.get("/api/v1/credits/before")
                return bool(fallback.depth == 0)

            await wait_for(drained)
            ready = (await client.get("/health/ready")).json()["fallback"]
            assert (ready["dead_letters"], ready["replayed"]) == (1, 2)
            for user in ("before", "after"):
                ledger = (await client.get(f"/api/v1/credits/{user}/transactions")).json()
                assert [row["amount"] for row in ledger] == [-1]
            admin = {"Authorization": "Bearer test-admin-token"}
            letters = (await client.get("/admin/outage/dead-letters", headers=admin)).json()
            [letter] = letters["dead_letters"]
            assert letter["change"]["user_id"] == "poison"
            assert "refused (test)" in letter["reason"]
            forgotten = await client.delete(
                f"/admin/outage/dead-letters/{letter['seq']}", headers=admin
            )
            assert forgotten.status_code == 200
            again = await client.delete(
                f"/admin/outage/dead-letters/{letter['seq']}", headers=admin
            )
            assert (again.status_code, again.json()["error"]["code"]) == (
                404,
                "dead_letter_not_found",
            )
