"""The outage fallback (app/outage/fallback.py) without a real outage: a database store
that is down while the test says so. Every kind of change it serves from memory
reaches the database on replay, once; reads are never replayed."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import get_args

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from app.clock import Clock, utc_now
from app.domain.carry import Carried
from app.domain.consents import ConsentChange, RecordConsent
from app.domain.credits import Attempt, Change, Deduct, Operation, Refund, Reset, Upgrade
from app.domain.privacy import Pseudonyms
from app.domain.state import Merged
from app.errors import IdempotencyKeyReusedError, InsufficientCreditsError, StorageUnavailableError
from app.outage.fallback import OutageFallback
from app.outage.journal import ConsentRecorded, CreditChange, JournalError, OutageJournal
from app.outage.last_known import LastKnown
from app.outage.stores import with_fallback
from app.repositories.base import (
    ConsentRepository,
    CreditRepository,
    Erasures,
    StateRepository,
    Stores,
)
from app.repositories.database import sql_stores
from app.repositories.memory import MemoryData, MemoryStateRepository, memory_stores
from app.repositories.sql.state import SqlStateRepository
from app.schemas import ConsentEvent, CreditTransaction, UserConsent, UserCredits
from app.services.consents import UserConsentService
from app.services.credits import CreditService
from tests.conftest import RETENTION, RULES
from tests.support.clock import FakeClock

EXAMPLES: dict[type, Change] = {
    Deduct: Deduct(3, description="during the outage"),
    Refund: Refund(2),
    Upgrade: Upgrade(),
    Reset: Reset(),
}


class Outage:
    """A store standing in for the database (memory, unless given), down while `down` is
    true."""

    def __init__(self, stores: Stores | None = None, state: StateRepository | None = None) -> None:
        self.down = False
        self.data = MemoryData()
        self.stores = stores or memory_stores(RULES, self.data)
        self.state = state or MemoryStateRepository(self.data, RULES, retention=RETENTION)

    def check(self) -> None:
        if self.down:
            raise StorageUnavailableError("the database is down (test)")


class DownableCredits:
    def __init__(self, outage: Outage) -> None:
        self._outage = outage
        self._inner: CreditRepository = outage.stores.credits

    async def apply(self, user_id: str, operation: Operation, attempt: Attempt) -> UserCredits:
        self._outage.check()
        return await self._inner.apply(user_id, operation, attempt)

    async def history(self, user_id: str, limit: int) -> list[CreditTransaction]:
        self._outage.check()
        return await self._inner.history(user_id, limit)

    async def delete_transactions_before(self, cutoff: datetime) -> int:
        self._outage.check()
        return await self._inner.delete_transactions_before(cutoff)


class DownableConsents:
    def __init__(self, outage: Outage) -> None:
        self._outage = outage
        self._inner: ConsentRepository = outage.stores.consents

    async def apply(
        self, user_id: str, change: ConsentChange, *, now: datetime
    ) -> UserConsent | None:
        self._outage.check()
        return await self._inner.apply(user_id, change, now=now)

    async def history(self, user_id: str) -> list[ConsentEvent]:
        self._outage.check()
        return await self._inner.history(user_id)

    async def get(self, user_id: str) -> UserConsent | None:
        self._outage.check()
        return await self._inner.get(user_id)

    async def page(self, limit: int, offset: int) -> list[UserConsent]:
        self._outage.check()
        return await self._inner.page(limit, offset)

    async def admission(
        self, user_id: str, *, now: datetime
    ) -> tuple[UserConsent | None, UserCredits | None]:
        self._outage.check()
        return await self._inner.admission(user_id, now=now)


class DownableState:
    """The stand-in's users as a whole, as the replay carries into them."""

    def __init__(self, outage: Outage) -> None:
        self._outage = outage
        inner = outage.state
        self.user_ids = inner.user_ids
        self.erasures = inner.erasures
        self.read = inner.read
        self.erase = inner.erase
        self.ledger_figures = inner.ledger_figures
        self.merge_rows = inner.merge_rows
        self.merge_erasures = inner.merge_erasures

    async def merge(self, carried: Sequence[Carried]) -> Merged:
        self._outage.check()
        self.refuse(carried)
        return await self._outage.state.merge(carried)

    def refuse(self, carried: Sequence[Carried]) -> None:
        """What a database that refuses some changes raises for them (none here)."""


@pytest.fixture
def outage() -> Outage:
    return Outage()


@pytest.fixture
async def open_fallback(
    tmp_path: Path, outage: Outage
) -> AsyncIterator[Callable[..., OutageFallback]]:
    """Fallbacks journaling in `tmp_path`, replaying into the outage's store unless given
    another, closed after the test."""
    opened: list[OutageFallback] = []

    def open_one(
        *,
        max_changes: int = 100,
        name: str = "journal.db",
        max_users: int = 100,
        erasures: Erasures | None = None,
        database: StateRepository | None = None,
    ) -> OutageFallback:
        fallback = OutageFallback(
            RULES,
            OutageJournal.open(tmp_path / name),
            database or DownableState(outage),
            max_users=max_users,
            max_changes=max_changes,
            snapshot_max_users=100,
            erasures=erasures,
        )
        opened.append(fallback)
        return fallback

    yield open_one
    for fallback in opened:
        await fallback.journal.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fallback(open_fallback: Callable[..., OutageFallback]) -> OutageFallback:
    return open_fallback()


def database_of(outage: Outage) -> Stores:
    return Stores(
        credits=DownableCredits(outage),
        consents=DownableConsents(outage),
        cache=outage.stores.cache,
    )


def served_credits(
    database: Stores, fallback: OutageFallback, *, clock: Clock = utc_now
) -> CreditService:
    """The credit service over `database`, served by `fallback` while it is down."""
    return CreditService(with_fallback(database, fallback).credits, clock=clock)


def test_every_kind_of_credit_change_has_an_example_here() -> None:
    assert set(EXAMPLES) == set(get_args(Change))


@pytest.mark.parametrize("change", EXAMPLES.values(), ids=[kind.__name__ for kind in EXAMPLES])
async def test_a_change_served_during_an_outage_reaches_the_database_once(
    outage: Outage, fallback: OutageFallback, change: Change
) -> None:
    database = database_of(outage)
    clock = FakeClock()
    credits = served_credits(database, fallback, clock=clock)
    reference = CreditService(memory_stores(RULES).credits, clock=clock)
    for service in (credits, reference):
        await service.deduct_credits("traveller", 6)
    clock.advance(minutes=1)  # a change at the account's very first instant is not one here

    outage.down = True
    served = await credits.get_user_credits("traveller")  # a read: nothing to replay
    assert fallback.depth == 0
    attempt = Attempt(clock.now, "during" if isinstance(change, Deduct | Refund) else None)
    await with_fallback(database, fallback).credits.apply("traveller", change, attempt)
    assert fallback.depth == 1
    assert served.available_credits == 4  # as last seen in the database

    outage.down = False
    await fallback.replay()
    await fallback.replay()  # a second replay changes nothing
    await reference.get_user_credits("traveller")
    await reference_apply(reference, change, attempt)
    assert fallback.depth == 0
    assert rows(await database.credits.history("traveller", 50)) == rows(
        await reference.get_transaction_history("traveller", 50)
    )


async def reference_apply(reference: CreditService, change: Change, attempt: Attempt) -> None:
    match change:
        case Deduct(amount, _, description):
            await reference.deduct_credits(
                "traveller", amount, description=description, idempotency_key=attempt.key
            )
        case Refund(amount, description):
            await reference.refund_credits(
                "traveller", amount, description=description, idempotency_key=attempt.key
            )
        case Upgrade():
            await reference.upgrade_to_registered("traveller")
        case Reset():
            await reference.reset_credits("traveller")


def rows(history: list[CreditTransaction]) -> list[tuple[object, ...]]:
    return [(r.transaction_type, r.amount, r.description, r.timestamp) for r in history]


async def test_consent_changes_served_during_an_outage_reach_the_database_in_order(
    outage: Outage, fallback: OutageFallback
) -> None:
    database = database_of(outage)
    clock = FakeClock()
    consents = UserConsentService(with_fallback(database, fallback).consents, clock=clock)
    outage.down = True
    await consents.record_consent("reader", marketing_consent=False)
    clock.advance(minutes=1)
    await consents.update_marketing_consent("reader", True)
    outage.down = False
    await fallback.replay()
    stored = await database.consents.get("reader")
    assert stored is not None
    assert (stored.terms_accepted, stored.marketing_consent, stored.updated_at) == (
        True,
        True,
        clock.now,
    )


async def test_a_change_journaled_before_its_user_was_erased_is_dropped_on_replay(
    engine: AsyncEngine, open_fallback: Callable[..., OutageFallback]
) -> None:
    """SPEC §10: no row holds an erased user's id. Another replica may erase a user while
    this one still holds the user's changes in its journal; replaying them would bring
    the user back. A change made after the erasure is the user coming back, and lands."""
    pseudonyms = Pseudonyms("an-erasure-key-for-tests")
    state = SqlStateRepository(engine, RULES, retention=RETENTION, pseudonyms=pseudonyms)
    outage = Outage(sql_stores(engine, RULES, pseudonyms=pseudonyms), state)
    database = database_of(outage)
    fallback = open_fallback(database=DownableState(outage))
    clock = FakeClock()
    served = with_fallback(database, fallback)
    credits = CreditService(served.credits, clock=clock)
    consents = UserConsentService(served.consents, clock=clock)
    for user in ("leaver", "stayer"):
        await credits.deduct_credits(user, 2)
    clock.advance(minutes=1)

    outage.down = True
    await credits.deduct_credits("leaver", 1)
    await consents.record_consent("leaver", marketing_consent=True)
    await credits.deduct_credits("stayer", 1)
    outage.down = False
    # Erased elsewhere, at the very instant of the changes: which came first is unknown,
    # and forgetting is the safe side.
    assert await state.erase("leaver", pseudonyms.of("leaver"), clock.now) == 1

    await fallback.replay()
    assert (fallback.depth, fallback.counts.erased, fallback.counts.replayed) == (0, 2, 1)
    leaver, stayer = await state.read(["leaver", "stayer"])
    assert (leaver.account, leaver.ledger, leaver.consent) == (None, (), None)
    assert await database.consents.get("leaver") is None
    assert stayer.account is not None
    assert stayer.account.available == stayer.account.maximum - 3

    clock.advance(minutes=1)
    outage.down = True
    await credits.deduct_credits("leaver", 1)  # after the erasure: the user is back
    outage.down = False
    await fallback.replay()
    assert (fallback.counts.erased, fallback.counts.replayed) == (2, 2)
    (back,) = await state.read(["leaver"])
    assert back.account is not None
    # Resumed as erased (ERASED RESUMES: the spent part as a row), then the new change;
    # the change journaled before the erasure is not among them.
    assert [(row.amount, row.timestamp) for row in back.ledger] == [
        (-2, clock.now),
        (-1, clock.now),
    ]
    assert back.account.available == back.account.maximum - 3


async def test_a_replay_that_meets_the_database_down_again_keeps_the_rest(
    outage: Outage, fallback: OutageFallback
) -> None:
    database = database_of(outage)
    credits = served_credits(database, fallback)
    outage.down = True
    for n in range(3):
        await credits.deduct_credits("patient", 1, idempotency_key=f"k{n}")
    await fallback.replay()  # still down
    assert fallback.depth == 3
    outage.down = False
    await fallback.replay()
    assert [row.amount for row in await database.credits.history("patient", 10)] == [-1] * 3


async def test_a_key_the_database_applied_for_another_request_is_refused_then_or_on_replay(
    outage: Outage, fallback: OutageFallback
) -> None:
    database = database_of(outage)
    credits = served_credits(database, fallback)
    await credits.deduct_credits("twice", 2, idempotency_key="order-1")  # seen by this process
    # Applied through another replica, which this process never saw.
    await outage.stores.credits.apply("twice", Deduct(3), Attempt(utc_now(), "order-2"))
    outage.down = True
    with pytest.raises(
        IdempotencyKeyReusedError
    ):  # known here: refused at once, as the database would
        await credits.deduct_credits("twice", 5, idempotency_key="order-1")
    await credits.deduct_credits("twice", 1, idempotency_key="order-2")  # not known here
    await credits.deduct_credits("twice", 1, idempotency_key="order-3")
    outage.down = False
    await fallback.replay()
    assert (fallback.depth, fallback.journal.dead_letters) == (0, 1)
    [letter] = await fallback.journal.letters(10)
    assert letter.change["key"] == "order-2"
    assert [row.amount for row in await database.credits.history("twice", 10)] == [-1, -3, -2]


async def test_the_consent_history_is_refused_during_an_outage_not_half_told(
    outage: Outage, fallback: OutageFallback
) -> None:
    database = database_of(outage)
    consents = UserConsentService(with_fallback(database, fallback).consents)
    await consents.record_consent("told", terms_accepted=True)
    outage.down = True
    await consents.record_consent("told", terms_accepted=True, marketing_consent=True)
    with pytest.raises(StorageUnavailableError):
        await consents.consent_history("told")
    outage.down = False
    await fallback.replay()
    assert len(await consents.consent_history("told")) == 2


async def test_a_full_journal_refuses_further_writes_and_keeps_serving_reads(
    outage: Outage, open_fallback: Callable[..., OutageFallback]
) -> None:
    fallback = open_fallback(max_changes=2)
    database = database_of(outage)
    stores = with_fallback(database, fallback)
    credits, consents = CreditService(stores.credits), UserConsentService(stores.consents)
    outage.down = True
    await credits.deduct_credits("full", 1)
    await consents.record_consent("full", terms_accepted=True)
    with pytest.raises(StorageUnavailableError):
        await credits.deduct_credits("full", 1)
    with pytest.raises(StorageUnavailableError):
        await consents.record_consent("full", terms_accepted=False)
    assert (await credits.get_user_credits("full")).available_credits == 9  # nothing half-made
    assert fallback.depth == 2
    outage.down = False
    await fallback.replay()
    outage.down = True
    await credits.deduct_credits("full", 1)  # room again once replayed
    assert fallback.depth == 1


class Poisoned(DownableState):
    """A database that refuses one user's changes for good."""

    def refuse(self, carried: Sequence[Carried]) -> None:
        if any(one.user_id == "poison" for one in carried):
            raise ValueError("check constraint violated (test)")


async def test_a_known_users_balance_and_consent_are_honoured_during_an_outage(
    outage: Outage, fallback: OutageFallback
) -> None:
    stores = with_fallback(database_of(outage), fallback)
    credits, consents = CreditService(stores.credits), UserConsentService(stores.consents)
    await credits.deduct_credits("known", 7)
    await consents.record_consent("known", terms_accepted=True)
    outage.down = True
    assert (await credits.get_user_credits("known")).available_credits == 3
    consent = await consents.get_consent("known")
    assert consent is not None and consent.terms_accepted
    with pytest.raises(InsufficientCreditsError):
        await credits.deduct_credits("known", 4)
    assert fallback.unknown_accounts == 0


async def test_a_consent_never_seen_is_unavailable_during_an_outage_not_refused(
    outage: Outage, fallback: OutageFallback, clock: FakeClock
) -> None:
    stores = with_fallback(database_of(outage), fallback)
    consents = UserConsentService(stores.consents, clock=clock)
    assert await consents.get_consent("asked") is None  # the database holds none
    outage.down = True
    with pytest.raises(StorageUnavailableError):
        await consents.get_consent("stranger")
    with pytest.raises(StorageUnavailableError):
        await stores.consents.admission("stranger", now=clock.now)
    with pytest.raises(StorageUnavailableError):
        await consents.update_marketing_consent("stranger", True)
    assert await consents.get_consent("asked") is None  # known to have none: still none
    await consents.record_consent("stranger", terms_accepted=True)  # recorded: known now
    assert (await stores.consents.admission("stranger", now=clock.now))[0] is not None


async def test_an_account_never_seen_starts_with_a_full_budget_and_is_counted(
    outage: Outage, fallback: OutageFallback
) -> None:
    credits = served_credits(database_of(outage), fallback)
    outage.down = True
    assert (await credits.get_user_credits("stranger")).available_credits == 10
    await credits.deduct_credits("stranger", 1)
    assert (fallback.unknown_accounts, fallback.figures["unknown_accounts"]) == (1, 1)


async def test_changes_journaled_before_a_crash_land_once_after_restarts(
    outage: Outage, open_fallback: Callable[..., OutageFallback], tmp_path: Path
) -> None:
    database = database_of(outage)
    crashed = open_fallback()
    stores = with_fallback(database, crashed)
    credits, consents = CreditService(stores.credits), UserConsentService(stores.consents)
    await credits.deduct_credits("kept", 2)
    outage.down = True
    for n in range(3):
        await credits.deduct_credits("kept", 1, idempotency_key=f"k{n}")
    await credits.deduct_credits("kept", 1)  # no client key: the service's own
    await consents.record_consent("kept", terms_accepted=True, marketing_consent=True)
    await crashed.journal.close()  # the process dies: nothing replayed, the journal kept

    restarted = open_fallback()
    await restarted.start()  # the database is still down
    assert restarted.depth == 5
    assert (await restarted.memory.credits.history("kept", 10))[0].amount == -1
    outage.down = False
    shutil.copy(tmp_path / "journal.db", tmp_path / "image.db")  # as if killed mid-replay
    shutil.copy(tmp_path / "journal.db-wal", tmp_path / "image.db-wal")
    await restarted.replay()
    assert restarted.depth == 0
    again = open_fallback(name="image.db")  # the same changes, replayed once more
    await again.replay()
    assert again.counts.replayed == 5
    ledger = await database.credits.history("kept", 10)
    assert [row.amount for row in ledger] == [-1, -1, -1, -1, -2]
    consent = await database.consents.get("kept")
    assert consent is not None and consent.marketing_consent
    assert len(await database.consents.history("kept")) == 1  # recorded once, not twice


async def test_a_reset_replayed_again_after_a_crash_refills_once(
    outage: Outage, open_fallback: Callable[..., OutageFallback], tmp_path: Path
) -> None:
    """A reset has no key: the replay finds it by the account's reset instant."""
    database = database_of(outage)
    clock = FakeClock()
    fallback = open_fallback()
    credits = served_credits(database, fallback, clock=clock)
    await credits.deduct_credits("refilled", 6)
    outage.down = True
    clock.advance(minutes=1)
    await credits.reset_credits("refilled")
    image = tmp_path / "image.db"
    shutil.copy(tmp_path / "journal.db", image)  # the journal before the replay marks it
    shutil.copy(tmp_path / "journal.db-wal", tmp_path / "image.db-wal")
    outage.down = False
    await fallback.replay()
    clock.advance(minutes=1)
    await credits.deduct_credits("refilled", 4)  # spent after the replay
    again = open_fallback(name="image.db")
    await again.replay()
    assert (await database.credits.history("refilled", 10))[0].amount == -4
    assert (await credits.get_user_credits("refilled")).available_credits == 6


async def test_a_torn_last_record_is_dropped_and_the_intact_ones_replay(
    outage: Outage, open_fallback: Callable[..., OutageFallback], tmp_path: Path
) -> None:
    database = database_of(outage)
    writing = open_fallback()
    credits = served_credits(database, writing)
    outage.down = True
    for n in range(3):  # three commits, the last one torn below
        await credits.deduct_credits("torn", 1, idempotency_key=f"t{n}")
    shutil.copy(tmp_path / "journal.db", tmp_path / "torn.db")
    wal = (tmp_path / "journal.db-wal").read_bytes()
    (tmp_path / "torn.db-wal").write_bytes(wal[:-100])  # power lost mid-write
    outage.down = False
    survivor = open_fallback(name="torn.db")
    assert survivor.depth == 2
    await survivor.replay()
    assert [row.amount for row in await database.credits.history("torn", 10)] == [-1, -1]


async def test_a_change_the_database_refuses_for_good_becomes_a_dead_letter(
    outage: Outage, open_fallback: Callable[..., OutageFallback]
) -> None:
    fallback = open_fallback(database=Poisoned(outage))
    database = database_of(outage)
    credits = served_credits(database, fallback)
    outage.down = True
    for user in ("before", "poison", "after"):
        await credits.deduct_credits(user, 1)
    outage.down = False
    await fallback.replay()
    assert (fallback.depth, fallback.counts.replayed, fallback.journal.dead_letters) == (0, 2, 1)
    for user in ("before", "after"):
        assert [row.amount for row in await database.credits.history(user, 10)] == [-1]
    [letter] = await fallback.journal.letters(10)
    assert letter.change["user_id"] == "poison"
    assert letter.reason.startswith("ValueError: check constraint violated")
    assert await fallback.journal.forget(letter.seq)
    assert fallback.journal.dead_letters == 0


async def test_an_unreadable_record_becomes_a_dead_letter_and_the_rest_replay(
    outage: Outage, open_fallback: Callable[..., OutageFallback], tmp_path: Path
) -> None:
    """A record no version of the journal wrote: set aside at start and at replay, and
    the records around it, one in the format before msgspec, replay in order."""
    database = database_of(outage)
    left = OutageJournal.open(tmp_path / "left.db")
    at = datetime.fromisoformat("2026-03-01T12:30:00+00:00")  # just before the older one
    await left.append(CreditChange("reader", Deduct(1), Attempt(at, "new")))
    await left.close()
    older = (
        '{"kind":"credit","user_id":"reader","change":{"type":"Deduct","amount":2,'
        '"is_guest":true,"description":null},"at":"2026-03-01T12:30:05.123456+00:00",'
        '"key":"old","own_key":false}'
    )
    garbage = ["not json", '{"kind":"credit","user_id":"reader"}']
    with sqlite3.connect(tmp_path / "left.db") as connection:
        connection.executemany(
            "INSERT INTO changes (body) VALUES (?)", [(text,) for text in [*garbage, older]]
        )
    restarted = open_fallback(name="left.db")
    outage.down = True
    await restarted.start()  # the unreadable records are not served
    served = await restarted.memory.credits.history("reader", 10)
    assert (restarted.depth, [row.amount for row in served]) == (4, [-2, -1])
    outage.down = False
    await restarted.replay()
    assert (restarted.depth, restarted.journal.dead_letters) == (0, 2)
    ledger = await database.credits.history("reader", 10)
    assert [row.amount for row in ledger] == [-2, -1]
    letters = await restarted.journal.letters(10)
    assert [letter.change for letter in letters] == [
        {"unreadable": "not json"},
        json.loads(garbage[1]),
    ]
    assert all(letter.reason.startswith("unreadable record: ") for letter in letters)


async def test_a_change_the_journal_cannot_keep_is_refused_and_undone(
    outage: Outage, fallback: OutageFallback, monkeypatch: pytest.MonkeyPatch
) -> None:
    credits = served_credits(database_of(outage), fallback)
    outage.down = True
    await credits.deduct_credits("disk", 1)

    def disk_full(texts: list[str]) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(fallback.journal, "_insert", disk_full)
    with pytest.raises(StorageUnavailableError):
        await credits.deduct_credits("disk", 2)
    assert (await credits.get_user_credits("disk")).available_credits == 9
    assert fallback.depth == 1


async def test_concurrent_changes_are_journaled_in_the_order_they_were_made(
    outage: Outage, fallback: OutageFallback
) -> None:
    database = database_of(outage)
    credits = served_credits(database, fallback)
    outage.down = True
    await asyncio.gather(*(credits.refund_credits("busy", n + 1) for n in range(40)))
    served = [row.amount for row in await fallback.memory.credits.history("busy", 100)]
    outage.down = False
    await fallback.replay()
    assert [row.amount for row in await database.credits.history("busy", 100)] == served


async def test_a_second_process_on_the_same_journal_takes_the_next_slot(
    tmp_path: Path,
) -> None:
    first = OutageJournal.open(tmp_path / "j.db")
    second = OutageJournal.open(tmp_path / "j.db")
    try:
        assert (first.path.name, second.path.name) == ("j.db", "j.1.db")
        with pytest.raises(JournalError, match="held by another process"):
            OutageJournal.open(tmp_path / "j.db", exact=True)
    finally:
        await first.close()
        await second.close()


def test_the_snapshot_keeps_the_users_seen_last() -> None:
    seen = LastKnown(max_users=2)
    for user_id in ("a", "b", "c"):
        seen.saw_consent(user_id, None)
    seen.saw_consent("b", None)
    assert (len(seen), seen.of("a"), seen.of("b") is not None) == (2, None, True)


async def test_the_replay_command_replays_a_journal_left_behind_once(tmp_path: Path) -> None:
    left = OutageJournal.open(tmp_path / "left.db")
    at = FakeClock().now
    for n in range(2):
        change = CreditChange("orphan", Deduct(1), Attempt(at, f"left-{n}"))
        await left.append(change)
    await left.close()
    database = tmp_path / "service.db"

    def replay(path: Path) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "DATABASE_URL": f"sqlite+aiosqlite:///{database}"}
        command = [sys.executable, "-m", "app", "journal", "replay", str(path)]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)

    first = await asyncio.to_thread(replay, tmp_path / "left.db")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["replayed"] == 2
    second = await asyncio.to_thread(replay, tmp_path / "left.db")
    assert (second.returncode, json.loads(second.stdout)["replayed"]) == (0, 0)
    with sqlite3.connect(database) as rows:
        ledger = rows.execute(
            "SELECT amount FROM credit_transactions WHERE user_id = 'orphan'"
        ).fetchall()
    assert ledger == [(-1,), (-1,)]
    missing = await asyncio.to_thread(replay, tmp_path / "nothing.db")
    assert (missing.returncode, missing.stderr.strip()) == (
        2,
        f"no journal at {tmp_path / 'nothing.db'}",
    )


def test_a_journal_that_cannot_be_made_says_where_and_why(tmp_path: Path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    with pytest.raises(JournalError) as refused:
        OutageJournal.open(blocked / "j.db")
    assert str(refused.value).startswith(f"outage journal {blocked / 'j.db'}: [Errno")


class Broken(Exception):
    """A driver error of a database that cannot take changes (a table missing)."""

    sqlstate = "42P01"


class Unmigrated(DownableState):
    def refuse(self, carried: Sequence[Carried]) -> None:
        raise Broken('relation "credit_transactions" does not exist')


async def test_a_database_that_cannot_take_changes_pauses_the_replay_moving_nothing_aside(
    outage: Outage, open_fallback: Callable[..., OutageFallback]
) -> None:
    fallback = open_fallback(database=Unmigrated(outage))
    database = database_of(outage)
    credits = served_credits(database, fallback)
    outage.down = True
    for user in ("one", "two"):
        await credits.deduct_credits(user, 1)
    outage.down = False
    await fallback.replay()
    assert (fallback.depth, fallback.journal.dead_letters) == (2, 0)


async def test_a_later_consent_in_the_database_stands_over_a_replayed_earlier_one(
    outage: Outage, fallback: OutageFallback, clock: FakeClock
) -> None:
    database = database_of(outage)
    consents = UserConsentService(with_fallback(database, fallback).consents, clock=clock)
    outage.down = True
    await consents.record_consent("changed", terms_accepted=True, marketing_consent=True)
    outage.down = False
    clock.advance(minutes=5)  # another replica records the user's later choice first
    await database.consents.apply("changed", RecordConsent(True, False, "1"), now=clock.now)
    await fallback.replay()
    stored = await database.consents.get("changed")
    assert stored is not None and (stored.marketing_consent, stored.updated_at) == (
        False,
        clock.now,
    )
    assert fallback.depth == 0


async def test_a_marketing_change_held_on_replay_keeps_the_event_it_was_acknowledged_with(
    outage: Outage, fallback: OutageFallback, clock: FakeClock
) -> None:
    """The journal keeps a change of marketing alone with its consent's terms, so a later
    consent in the database standing over it still leaves its event in the history."""
    database = database_of(outage)
    consents = UserConsentService(with_fallback(database, fallback).consents, clock=clock)
    first = await consents.record_consent("held", marketing_consent=False)
    clock.advance(minutes=1)
    outage.down = True
    changed = await consents.update_marketing_consent("held", True)
    outage.down = False
    clock.advance(minutes=5)  # another replica records the user's later choice first
    await database.consents.apply("held", RecordConsent(True, False, "1"), now=clock.now)
    await fallback.replay()
    history = await database.consents.history("held")
    assert [(e.terms_accepted, e.marketing_consent, e.terms_version) for e in history] == [
        (True, False, "1"),
        (True, True, "1"),
        (True, False, "1"),
    ]
    assert [e.recorded_at for e in history] == [clock.now, changed.updated_at, first.timestamp]
    assert fallback.depth == 0


async def test_a_service_that_never_started_replays_nothing_at_shutdown(
    outage: Outage, fallback: OutageFallback
) -> None:
    database = database_of(outage)
    credits = served_credits(database, fallback)
    outage.down = True
    await credits.deduct_credits("waiting", 1)
    outage.down = False
    await fallback.close()  # its database was not ready: start() never ran
    assert fallback.depth == 1
    assert await database.credits.history("waiting", 10) == []


async def test_a_closed_journal_refuses_an_append(fallback: OutageFallback) -> None:
    await fallback.journal.close()
    with pytest.raises(JournalError, match="closed"):
        fallback.journal.append(ConsentRecorded("late", True, False, "1", FakeClock().now))


async def test_a_full_fallback_store_answers_as_the_database_would_503(
    outage: Outage, open_fallback: Callable[..., OutageFallback]
) -> None:
    fallback = open_fallback(max_users=1)
    stores = with_fallback(database_of(outage), fallback)
    credits, consents = CreditService(stores.credits), UserConsentService(stores.consents)
    outage.down = True
    await credits.deduct_credits("first", 1)
    with pytest.raises(StorageUnavailableError):
        await credits.deduct_credits("second", 1)
    with pytest.raises(StorageUnavailableError):
        await consents.record_consent("second", terms_accepted=True)


async def test_the_ledger_is_not_half_told_during_an_outage(
    outage: Outage, fallback: OutageFallback
) -> None:
    credits = served_credits(database_of(outage), fallback)
    await credits.deduct_credits("told", 1)
    outage.down = True
    await credits.deduct_credits("told", 1)
    with pytest.raises(StorageUnavailableError):
        await credits.get_transaction_history("told")


class Listed:
    """Erasures as the database lists them: pseudonyms with when, in commit order."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, datetime]] = []

    async def erased_at(self, user_id: str) -> datetime | None:
        return None

    async def erased_since(self, after: datetime) -> list[tuple[str, datetime]]:
        return sorted((row for row in self.rows if row[1] > after), key=lambda row: row[1])

    def pseudonym(self, user_id: str) -> str:
        return f"erased-{user_id}"


async def test_the_snapshot_drops_users_erased_elsewhere_also_when_committed_late(
    open_fallback: Callable[..., OutageFallback],
) -> None:
    erasures = Listed()
    fallback = open_fallback(erasures=erasures)
    for user in ("ann", "bob", "cyd"):
        fallback.last_known.saw_consent(user, None)
    later = utc_now() + timedelta(seconds=1)
    erasures.rows.append(("erased-ann", later))
    assert await fallback.forget_erased() == 1
    # Stamped before ann's erasure, committed after the round that found it.
    erasures.rows.append(("erased-bob", later - timedelta(seconds=30)))
    assert await fallback.forget_erased() == 1
    # cyd seen again; the same erasures found again drop nothing and count nothing.
    assert await fallback.forget_erased() == 0
    assert fallback.last_known.of("cyd") is not None
    assert (fallback.last_known.of("ann"), fallback.last_known.of("bob")) == (None, None)
    assert fallback.figures["snapshot_erased"] == 2
    # Erased again later (came back, then erased anew): dropped again.
    fallback.last_known.saw_consent("ann", None)
    erasures.rows.append(("erased-ann", later + timedelta(seconds=5)))
    assert await fallback.forget_erased() == 1
    # An eraser whose clock runs an hour ahead hides none of the erasures made after it.
    erasures.rows.append(("erased-nobody-here", later + timedelta(hours=1)))
    assert await fallback.forget_erased() == 0
    erasures.rows.append(("erased-cyd", later + timedelta(seconds=10)))
    assert await fallback.forget_erased() == 1
    assert fallback.last_known.of("cyd") is None
