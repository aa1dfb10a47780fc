"""PostgresStateRepository merges as SqlStateRepository does (SPEC §7, MERGE): the same
states merged into two fresh databases, one through each, leave the same users, ledger
(rows, counts and order), claimed keys and consents, and count the same rows added."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import Settings
from app.domain.credits import Account
from app.domain.state import LedgerRecord, Merged, Round, UserState
from app.repositories.base import StagedBatch, StagedRows
from app.repositories.pg_state import PostgresStateRepository
from app.repositories.sql_consents import consents
from app.repositories.sql_credits import accounts, claimed_keys, ledger
from app.repositories.sql_state import SqlStateRepository, marks
from app.schemas import UserConsent
from app.storage.engine import create_engine
from app.storage.guarded import GuardedState
from app.storage.resilience import CircuitBreaker, Guard, RetryPolicy
from tests.conftest import fresh_database

pytestmark = pytest.mark.postgres

AT = datetime(2026, 11, 29, 12, tzinfo=UTC)
LATER = AT + timedelta(hours=1)


class Pair:
    """The reference (SqlStateRepository) and the subject, each on a database of its own."""

    def __init__(self, reference: AsyncEngine, subject: AsyncEngine) -> None:
        self.engines = (reference, subject)
        self.reference = SqlStateRepository(reference)
        self.subject = PostgresStateRepository(subject)

    async def seed(self, states: Sequence[UserState]) -> None:
        """The same held state in both, written by the reference."""
        for engine in self.engines:
            await SqlStateRepository(engine).merge(states)

    async def merge(self, states: Sequence[UserState], round: Round | None = None) -> int:
        """Merges into both; the rows added, which must agree."""
        expected = await self.reference.merge(states, round)
        assert await self.subject.merge(states, round) == expected
        return expected

    async def merge_rows(self, states: Sequence[UserState]) -> Merged:
        """Merges into both as an import's batch of them; what each found must agree."""
        batch, rows = staged(states)
        expected = await self.reference.merge_rows(batch, rows)
        assert await self.subject.merge_rows(batch, rows) == expected
        return expected

    async def assert_same(self, user_ids: Sequence[str]) -> None:
        assert await self.subject.read(user_ids) == await self.reference.read(user_ids)
        assert await _tables(self.engines[1]) == await _tables(self.engines[0])


async def _tables(engine: AsyncEngine) -> dict[str, list[Any]]:
    """Every row of the four tables, but the ledger's own ids, in a fixed order."""
    statements = {
        "accounts": select(accounts).order_by(accounts.c.user_id),
        "ledger": select(*(c for c in ledger.c if c.name != "id")).order_by(ledger.c.id),
        "keys": select(claimed_keys).order_by(*claimed_keys.primary_key.columns),
        "consents": select(consents).order_by(consents.c.user_id),
        "marks": select(marks).order_by(*marks.primary_key.columns),
    }
    async with engine.connect() as conn:
        return {
            name: [tuple(row) for row in await conn.execute(statement)]
            for name, statement in statements.items()
        }


@pytest.fixture
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[Pair]:
    async with (
        fresh_database(request, "postgres") as reference_url,
        fresh_database(request, "postgres") as subject_url,
    ):
        engines = [
            create_engine(Settings(database_url=url)) for url in (reference_url, subject_url)
        ]
        try:
            yield Pair(*engines)
        finally:
            for engine in engines:
                await engine.dispose()


def staged(states: Sequence[UserState]) -> tuple[StagedBatch, StagedRows]:
    """The states as an import's batch of them (app/repositories/base.py, Row)."""
    accounts = [
        (a.user_id, a.is_guest, a.available, a.maximum, a.last_reset)
        for a in (state.account for state in states)
        if a is not None
    ]
    ledger = [
        (r.user_id, r.kind, r.amount, r.timestamp, r.description, r.idempotency_key)
        for state in states
        for r in state.ledger
    ]
    consents = [
        (c.user_id, c.terms_accepted, c.marketing_consent, c.timestamp, c.updated_at, None)
        for c in (state.consent for state in states)
        if c is not None
    ]
    lines = len(accounts) + len(ledger) + len(consents)
    lock = len(accounts) < len(states)
    batch = StagedBatch(0, [state.user_id for state in states], lines, lock, follows=False)
    return batch, (accounts, ledger, consents)


def row(
    user_id: str,
    amount: int,
    *,
    key: str | None = None,
    at: datetime = AT,
    description: str | None = None,
) -> LedgerRecord:
    kind = "deduction" if amount < 0 else "refund"
    return LedgerRecord(user_id, kind, amount, at, description, key)


def account(user_id: str, available: int, *, guest: bool = True, at: datetime = AT) -> Account:
    return Account(user_id, guest, available, 10 if guest else 50, at)


def consent(user_id: str, marketing: bool, updated: datetime) -> UserConsent:
    return UserConsent(
        user_id=user_id,
        terms_accepted=True,
        marketing_consent=marketing,
        timestamp=AT,
        updated_at=updated,
    )


def incoming() -> list[UserState]:
    """Equal rows twice and interleaved, a key on two rows, descriptions and none, an
    account without a ledger, a user with only a consent."""
    return [
        UserState(
            "ann",
            account("ann", 6),
            (
                row("ann", -1),
                row("ann", -2, key="k1", description="shoes"),
                row("ann", -1),
                row("ann", 1, key="k1"),
            ),
            consent("ann", True, LATER),
        ),
        UserState("bob", account("bob", 50, guest=False)),
        UserState(
            "cy",
            account("cy", 8, at=LATER),
            (row("cy", -1, at=LATER), row("cy", -1, at=LATER), row("cy", -1, key="c")),
        ),
        UserState("dee", consent=consent("dee", False, AT)),
    ]


USERS = ["ann", "bob", "cy", "dee", "nobody"]


async def test_into_empty_stores_every_row_counted_and_in_the_same_order(pair: Pair) -> None:
    assert await pair.merge(incoming()) == 7
    await pair.assert_same(USERS)


async def test_a_second_merge_of_the_same_states_adds_nothing(pair: Pair) -> None:
    await pair.merge(incoming())
    assert await pair.merge(incoming()) == 0
    await pair.assert_same(USERS)


async def test_into_held_state_only_the_lacking_copies_are_added_and_later_consents_win(
    pair: Pair,
) -> None:
    await pair.seed(
        [
            # One of ann's two equal rows, and a row only this store holds.
            UserState(
                "ann",
                account("ann", 9),
                (row("ann", -1), row("ann", -5)),
                consent("ann", False, AT),
            ),
            # A consent later than the incoming one, which must stay.
            UserState("dee", consent=consent("dee", True, LATER)),
            UserState("eve", account("eve", 3), (row("eve", -7, key="e"),)),
        ]
    )
    assert await pair.merge(incoming()) == 6
    await pair.assert_same([*USERS, "eve"])
    subject = {state.user_id: state for state in await pair.subject.read(USERS)}
    assert subject["ann"].consent == consent("ann", True, LATER)
    assert subject["dee"].consent == consent("dee", True, LATER)
    assert subject["ann"].account == account("ann", 6)
    assert [r.amount for r in subject["ann"].ledger] == [-1, -5, -1, -2, 1]


def accounted() -> list[UserState]:
    """incoming() but its user with only a consent: an import's batch of users that each
    come with an account, which is copied straight into a store that holds none of them."""
    return [state for state in incoming() if state.account is not None]


async def test_an_import_batch_copied_into_empty_stores_is_what_the_merge_leaves(
    pair: Pair,
) -> None:
    assert await pair.merge_rows(accounted()) == Merged(7)
    await pair.assert_same(USERS)


_HELD_KEY = """
INSERT INTO credit_idempotency_keys (user_id, idempotency_key, created_at, operation)
VALUES ('cy', 'c', '2026-11-28T12:00:00+00:00', 'refund')
"""


@pytest.mark.parametrize(
    "held",
    [
        # ann's ledger rows without her account: one of her two equal rows, and one more.
        [UserState("ann", ledger=(row("ann", -1), row("ann", -7)))],
        [UserState("cy", account("cy", 2))],
        [UserState("ann", consent=consent("ann", False, LATER + timedelta(hours=1)))],
        _HELD_KEY,
    ],
    ids=["ledger rows", "an account", "a later consent", "a claimed key"],
)
async def test_an_import_batch_of_users_the_store_holds_something_of_is_merged(
    pair: Pair, held: list[UserState] | str
) -> None:
    if isinstance(held, str):
        for engine in pair.engines:
            async with engine.begin() as conn:
                await conn.exec_driver_sql(held)
    else:
        await pair.seed(held)
    merged = await pair.merge_rows(accounted())
    assert merged.mismatched == {}
    await pair.assert_same(USERS)
    assert await pair.merge_rows(accounted()) == Merged(0)


async def test_a_failed_merge_leaves_nothing_behind_not_even_staged_rows(pair: Pair) -> None:
    broken = [UserState("zed", account("zed", 1), (row("zed", 0),))]  # amount 0: refused
    with pytest.raises(asyncpg.CheckViolationError, match="amount_non_zero"):
        await pair.subject.merge(broken)
    assert await pair.merge(incoming()) == 7
    await pair.assert_same([*USERS, "zed"])


async def test_user_ids_pages_the_same_users_with_an_account_or_a_consent(pair: Pair) -> None:
    await pair.merge([*incoming(), UserState("eve", consent=consent("eve", True, AT))])

    async def pages(repository: SqlStateRepository | PostgresStateRepository) -> list[list[str]]:
        return [page async for page in repository.user_ids(2)]

    assert await pages(pair.subject) == await pages(pair.reference)
    assert await pages(pair.subject) == [["ann", "bob"], ["cy", "dee"], ["eve"]]


async def test_in_a_round_the_lowest_balance_any_replica_carried_wins(pair: Pair) -> None:
    first, second = Round(7, "replica-a"), Round(7, "replica-b")
    await pair.merge(incoming(), first)
    await pair.merge(
        [UserState("ann", account("ann", 2)), UserState("cy", account("cy", 9))], second
    )
    await pair.assert_same(USERS)
    subject = {state.user_id: state for state in await pair.subject.read(USERS)}
    assert subject["ann"].account == account("ann", 2)  # replica-b's, lower
    assert subject["cy"].account == account("cy", 8, at=LATER)  # replica-a's stays
    # A replica carrying again in the same round replaces its own mark, not the others'.
    await pair.merge([UserState("ann", account("ann", 1))], first)
    await pair.assert_same(USERS)


# VERIFY inside the database (merge_verified) finds what reading back finds: a store made
# to lose a row, bend a balance, a maximum and a tier, and drop a consent, by triggers
# installed in both databases, is found wrong in the same users, in the same words.
_LOSSY = [
    """
    CREATE FUNCTION lossy_ledger() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.description = 'lost' THEN RETURN NULL; END IF;
        RETURN NEW;
    END $$
    """,
    """
    CREATE TRIGGER lossy_ledger BEFORE INSERT ON credit_transactions
       FOR EACH ROW EXECUTE FUNCTION lossy_ledger()
    """,
    """
    CREATE FUNCTION bent_accounts() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.user_id = 'bent' THEN
            NEW.available_credits := NEW.available_credits + 1;
            NEW.max_credits := NEW.max_credits + 1;
            NEW.is_guest := NOT NEW.is_guest;
        END IF;
        IF NEW.user_id = 'lower' THEN
            NEW.available_credits := NEW.available_credits - 1;
        END IF;
        RETURN NEW;
    END $$
    """,
    """
    CREATE TRIGGER bent_accounts BEFORE INSERT OR UPDATE ON user_credits
       FOR EACH ROW EXECUTE FUNCTION bent_accounts()
    """,
    """
    CREATE FUNCTION dropped_consents() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.user_id = 'shy' THEN RETURN NULL; END IF;
        RETURN NEW;
    END $$
    """,
    """
    CREATE TRIGGER dropped_consents BEFORE INSERT OR UPDATE ON user_consents
       FOR EACH ROW EXECUTE FUNCTION dropped_consents()
    """,
]


def lossy_incoming() -> list[UserState]:
    return [
        *incoming(),
        UserState(
            "lossy",
            account("lossy", 5),
            (row("lossy", -2, description="lost"), row("lossy", -3), row("lossy", -1)),
        ),
        UserState("bent", account("bent", 4)),
        UserState("lower", account("lower", 4), (row("lower", -1, description="lost"),)),
        UserState("shy", account("shy", 9), consent=consent("shy", True, AT)),
    ]


@pytest.mark.parametrize("in_round", [False, True])
async def test_verify_in_the_database_finds_what_reading_back_finds(
    pair: Pair, in_round: bool
) -> None:
    for engine in pair.engines:
        async with engine.begin() as conn:
            for statement in _LOSSY:
                await conn.exec_driver_sql(statement)
    round = Round(3, "replica-a") if in_round else None
    states = lossy_incoming()
    expected = await pair.reference.merge_verified(states, round)
    found = await pair.subject.merge_verified(states, round)
    assert found.mismatched == expected.mismatched
    assert found.mismatched == {
        "lossy": ["1 ledger row(s) missing: ledger sum -4, expected -6"],
        "bent": [
            "balance 5, expected 4",
            "maximum 11, expected 10",
            "tier registered, expected guest",
        ],
        "lower": [
            *([] if in_round else ["balance 3, expected 4"]),
            "1 ledger row(s) missing: ledger sum 0, expected -1",
        ],
        "shy": ["consent differs"],
    }
    # Merged again (the triggers bend what they bent once more), still the same found.
    again = await pair.reference.merge_verified(states, round)
    assert (await pair.subject.merge_verified(states, round)).mismatched == again.mismatched
    assert set(again.mismatched) == set(found.mismatched)


async def test_an_import_batch_copied_is_verified_as_reading_back_verifies(pair: Pair) -> None:
    for engine in pair.engines:
        async with engine.begin() as conn:
            for statement in _LOSSY:
                await conn.exec_driver_sql(statement)
    merged = await pair.merge_rows([s for s in lossy_incoming() if s.account is not None])
    assert merged.mismatched == {
        "lossy": ["1 ledger row(s) missing: ledger sum -4, expected -6"],
        "bent": [
            "balance 5, expected 4",
            "maximum 11, expected 10",
            "tier registered, expected guest",
        ],
        "lower": ["balance 3, expected 4", "1 ledger row(s) missing: ledger sum 0, expected -1"],
        "shy": ["consent differs"],
    }


async def test_a_pooled_connection_closed_while_idle_is_a_fault_retried_on_another(
    request: pytest.FixtureRequest,
) -> None:
    async with fresh_database(request, "postgres") as url:
        engine = create_engine(Settings(database_url=url, db_pool_pre_ping=False))
        try:
            async with engine.connect() as conn:  # the pool's one idle connection, closed
                raw = await conn.get_raw_connection()
                await raw.driver_connection.close()
            policy = RetryPolicy(attempts=2, max_seconds=5, initial_backoff=0, max_backoff=0)
            breaker = CircuitBreaker(failure_threshold=5, reset_timeout=1.0)
            state = GuardedState(PostgresStateRepository(engine), Guard(breaker, policy))
            assert await state.read(["ann"]) == [UserState("ann")]
        finally:
            await engine.dispose()
