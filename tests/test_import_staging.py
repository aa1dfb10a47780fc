"""An import (SPEC §7): a stream is spooled while it is validated, then merged batch by
batch. A user's runs land in stream order, whatever the batches; a refused stream merges
nothing, a failed merge keeps the batches before it; imports at once keep apart; a
database lost meanwhile is 503."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from app.config import Settings
from app.db.engine import create_engine
from app.db.guarded import GuardedState
from app.db.resilience import CircuitBreaker, Guard, RetryPolicy
from app.domain.state import Merged, UserState
from app.errors import StorageUnavailableError
from app.repositories.base import StagedBatch, StagedRows, StateRepository
from app.repositories.memory import MemoryData
from app.repositories.postgres import state as pg_state
from app.transfer import imports
from app.transfer.imports import staged
from app.transfer.lines import InvalidStreamError
from tests.conftest import database_state, fresh_database, memory_state
from tests.support.relay import relayed

AT = datetime(2026, 11, 30, 9, tzinfo=UTC)
STORES = ["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches of two users, spooled three lines at a time: a short stream spans many."""
    monkeypatch.setattr(imports, "MERGE_BATCH_SIZE", 2)
    monkeypatch.setattr(imports, "SPOOL_LINES", 3)


@asynccontextmanager
async def repository(request: pytest.FixtureRequest, kind: str) -> AsyncIterator[StateRepository]:
    """The store's users as a whole, on a fresh database of `kind`."""
    async with fresh_database(request, kind) as url:
        engine = create_engine(Settings(database_url=url))
        try:
            yield database_state(engine)
        finally:
            await engine.dispose()


@pytest.fixture(params=STORES)
async def store(request: pytest.FixtureRequest) -> AsyncIterator[StateRepository]:
    if request.param == "memory":
        yield memory_state(MemoryData())
        return
    async with repository(request, request.param) as state:
        yield state


@pytest.fixture
async def postgres(request: pytest.FixtureRequest) -> AsyncIterator[StateRepository]:
    async with repository(request, "postgres") as state:
        yield state


def account(user_id: str, available: int) -> dict[str, Any]:
    return {
        "kind": "account",
        "user_id": user_id,
        "is_guest": True,
        "available_credits": available,
        "max_credits": 10,
        "last_reset_timestamp": AT.isoformat(),
    }


def row(user_id: str, amount: int, key: str | None = None) -> dict[str, Any]:
    return {
        "kind": "ledger",
        "id": 0,
        "user_id": user_id,
        "transaction_type": "deduction",
        "amount": amount,
        "timestamp": (AT + timedelta(seconds=-amount)).isoformat(),
        "idempotency_key": key,
    }


def consent(user_id: str, marketing: bool, at: datetime) -> dict[str, Any]:
    return {
        "kind": "consent",
        "user_id": user_id,
        "terms_accepted": True,
        "marketing_consent": marketing,
        "timestamp": at.isoformat(),
        "updated_at": at.isoformat(),
    }


def ndjson(lines: Sequence[dict[str, Any]]) -> list[bytes]:
    """The lines between a header and a footer that counts them, a chunk per line."""
    kinds = [line["kind"] for line in lines]
    header = {"kind": "header", "format": 1, "store": "test", "exported_at": AT.isoformat()}
    footer = {
        "kind": "footer",
        "accounts": kinds.count("account"),
        "ledger_rows": kinds.count("ledger"),
        "consents": kinds.count("consent"),
    }
    return [json.dumps(line).encode() + b"\n" for line in [header, *lines, footer]]


async def chunks(parts: Sequence[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def imported(target: StateRepository, lines: Sequence[dict[str, Any]]) -> Any:
    async with staged(chunks(ndjson(lines)), target) as validated:
        return await validated.merge()


def users(count: int, prefix: str = "u") -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    for number in range(count):
        user_id = f"{prefix}{number}"
        lines += [account(user_id, number % 10), row(user_id, -1, f"k{number}")]
    return lines


@pytest.mark.usefixtures("small_batches")
async def test_a_users_runs_land_in_stream_order_across_batches(store: StateRepository) -> None:
    report = await imported(
        store,
        [
            account("ann", 9),
            row("ann", -1),
            account("bob", 5),
            account("cy", 4),
            account("ann", 3),  # ann again, in the batch after her first run's
            row("ann", -2),
            consent("ann", True, AT),
            account("bob", 8),
            account("bob", 2),  # a second account in one run: the later stands
            consent("cy", True, AT),
            consent("cy", False, AT + timedelta(minutes=1)),
        ],
    )
    assert report.verification.mismatches == 0
    ann, bob, cy = await store.read(["ann", "bob", "cy"])
    # Her second run's change lands on top of what her first left (SPEC §7 rev. 3: the
    # store holds a change the run lacks, her first -1); a run without changes of its
    # own, as bob's, takes its account.
    assert ann.account is not None and ann.account.available == 7
    assert [entry.amount for entry in ann.ledger] == [-1, -2]
    assert ann.consent is not None and ann.consent.marketing_consent
    assert bob.account is not None and bob.account.available == 2
    assert cy.consent is not None and not cy.consent.marketing_consent
    assert report.body()["accounts"] == 3 and report.body()["ledger_rows"] == 2


@pytest.mark.usefixtures("small_batches")
async def test_an_import_across_many_batches_carries_every_user(store: StateRepository) -> None:
    report = await imported(store, users(25))
    assert report.body()["accounts"] == 25
    assert report.body()["ledger_rows_added"] == 25
    held = await store.read([f"u{number}" for number in range(25)])
    assert [state.account.available for state in held if state.account] == [
        number % 10 for number in range(25)
    ]
    assert all(len(state.ledger) == 1 for state in held)


@pytest.mark.usefixtures("small_batches")
async def test_a_stream_refused_at_its_end_merges_nothing(store: StateRepository) -> None:
    parts = ndjson(users(12))
    parts[-1] = b'{"kind": "footer", "accounts": 12, "ledger_rows": 11, "consents": 0}\n'
    with pytest.raises(InvalidStreamError) as refused:
        async with staged(chunks(parts), store) as validated:
            await validated.merge()
    assert refused.value.line == len(parts)
    assert await store.read(["u0", "u11"]) == [UserState("u0"), UserState("u11")]


@pytest.mark.usefixtures("small_batches")
@pytest.mark.postgres
async def test_a_merge_failing_midway_keeps_the_batches_before_it(
    postgres: StateRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    applied = 0
    copy = pg_state._copied

    async def failing_third(*args: Any) -> Merged | None:
        """The third batch fails once its rows are in, inside its transaction."""
        nonlocal applied
        applied += 1
        number = applied
        copied = await copy(*args)
        if number == 3:
            raise RuntimeError("the database went away")
        return copied

    monkeypatch.setattr(pg_state, "_copied", failing_third)
    with pytest.raises(RuntimeError):
        await imported(postgres, users(12))
    # The batches merged before it stand, each its own unit of work; the rest is not.
    merged = [state for state in await postgres.read(["u0", "u11"]) if state.account]
    assert [state.user_id for state in merged] == ["u0"]


@pytest.mark.usefixtures("small_batches")
@pytest.mark.postgres
async def test_two_imports_at_once_keep_apart(postgres: StateRepository) -> None:
    first, second = await asyncio.gather(
        imported(postgres, users(9, "a")), imported(postgres, users(9, "b"))
    )
    assert first.verification.mismatches == second.verification.mismatches == 0
    held = await postgres.read([f"{prefix}{n}" for prefix in "ab" for n in range(9)])
    assert all(state.account is not None and len(state.ledger) == 1 for state in held)


@pytest.mark.usefixtures("small_batches")
@pytest.mark.postgres
async def test_two_imports_of_the_same_users_at_once_add_each_row_once(
    postgres: StateRepository,
) -> None:
    # Both find the users new; the second's copy waits for the first's keys, fails on
    # them, and its batch is merged as any other.
    first, second = await asyncio.gather(imported(postgres, users(9)), imported(postgres, users(9)))
    assert first.verification.mismatches == second.verification.mismatches == 0
    held = await postgres.read([f"u{n}" for n in range(9)])
    assert [state.account.available for state in held if state.account] == list(range(9))
    assert [len(state.ledger) for state in held] == [1] * 9


@pytest.mark.usefixtures("small_batches")
@pytest.mark.postgres
async def test_the_database_lost_mid_import_is_unavailable_with_nothing_merged(
    request: pytest.FixtureRequest,
) -> None:
    parts = ndjson(users(12))

    async with fresh_database(request, "postgres") as url, relayed(url) as (through, relay):

        async def cut_midway() -> AsyncIterator[bytes]:
            for number, part in enumerate(parts):
                if number == len(parts) // 2:
                    await relay.cut()
                yield part

        engine = create_engine(Settings(database_url=through))
        policy = RetryPolicy(attempts=3, max_seconds=5, initial_backoff=0.01, max_backoff=0.05)
        state = GuardedState(
            database_state(engine),
            Guard(CircuitBreaker(failure_threshold=5, reset_timeout=1.0), policy),
        )
        try:
            with pytest.raises(StorageUnavailableError):
                async with staged(cut_midway(), state) as validated:
                    await validated.merge()
        finally:
            await engine.dispose()
        await relay.restore()
        direct = create_engine(Settings(database_url=url))
        try:
            held = await database_state(direct).read(["u0", "u11"])
        finally:
            await direct.dispose()
    assert held == [UserState("u0"), UserState("u11")]


class SlowFirstMerge:
    """The memory store, whose first merge takes a while."""

    def __init__(self) -> None:
        self.inner = memory_state(MemoryData())
        self.merges = 0

    async def merge_rows(self, batch: StagedBatch, rows: StagedRows) -> Merged:
        self.merges += 1
        if self.merges == 1:
            await asyncio.sleep(0.05)
        return await self.inner.merge_rows(batch, rows)


@pytest.mark.usefixtures("small_batches")
async def test_a_batch_naming_a_user_of_the_batch_before_waits_for_it() -> None:
    target = SlowFirstMerge()
    lines = [account("ann", 9), account("bob", 5), account("cy", 4), account("ann", 3)]
    await imported(target, lines)  # type: ignore[arg-type]
    ann, cy = await target.inner.read(["ann", "cy"])
    assert ann.account is not None and ann.account.available == 3
    assert cy.account is not None


class FailingOnce:
    """The memory store, whose first merge fails as a connection lost mid-merge."""

    def __init__(self) -> None:
        self.inner = memory_state(MemoryData())
        self.failed = False

    async def merge_rows(self, batch: StagedBatch, rows: StagedRows) -> Merged:
        if not self.failed:
            self.failed = True
            raise ConnectionResetError("lost")
        return await self.inner.merge_rows(batch, rows)


@pytest.mark.usefixtures("small_batches")
async def test_a_batch_whose_merge_failed_once_is_merged_by_the_retry() -> None:
    target = FailingOnce()
    policy = RetryPolicy(attempts=2, max_seconds=5, initial_backoff=0, max_backoff=0)
    breaker = CircuitBreaker(failure_threshold=5, reset_timeout=1.0)
    state = GuardedState(target, Guard(breaker, policy))  # type: ignore[arg-type]
    report = await imported(state, users(5))
    assert target.failed and report.verification.mismatches == 0
    held = await target.inner.read([f"u{number}" for number in range(5)])
    assert [len(user.ledger) for user in held] == [1] * 5
